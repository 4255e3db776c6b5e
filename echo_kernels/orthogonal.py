"""orthogonal_product: the Givens-orthogonal matrix M = G_1 ... G_N R or R G_1 ... G_N
(docs/model.md, Givens-orthogonal matrix).

Read in the order every op file of the package keeps: the public function, its dispatch, then the
registration of its kernel. The kernel is the compiled extension's `torch.ops.echo_kernels.orthogonal_product`
(csrc/: C++ on the CPU, CUDA on the GPU; echo_kernels._extension loads it), which runs where it serves
the tensors' device, else the reference (see echo_kernels.backend).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import _extension, checks, reference
from .backend import register_kernel, use_kernel, warn_once
from .kernel_op import KernelOp


def orthogonal_product(thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool = True) -> Tensor:
    """M = G_1 ... G_N R if givens_first else R G_1 ... G_N.

    thetas: (..., N) angles; pairs: (N, 2) int64, i != j, both in [0, h); R: (..., h, h).
    Leading dims of thetas and R broadcast. Returns M: (broadcast(...), h, h) in the promoted dtype
    of thetas and R; float16/bfloat16 are computed in float32.
    """
    checks.floating("thetas", thetas)
    checks.floating("R", R)
    checks.same_device(thetas=thetas, pairs=pairs, R=R)
    if R.dim() < 2 or R.shape[-1] != R.shape[-2]:
        raise ValueError(f"R must have shape (..., h, h), got {tuple(R.shape)}")
    if thetas.dim() < 1:
        raise ValueError("thetas must have shape (..., N), got a 0-d tensor")
    _check_pairs(pairs, thetas.shape[-1], R.shape[-1])
    try:
        torch.broadcast_shapes(thetas.shape[:-1], R.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"leading dims of thetas {tuple(thetas.shape[:-1])} and R {tuple(R.shape[:-2])} do not broadcast"
        ) from None
    return _dispatch(thetas, pairs, R, bool(givens_first))


# pairs tensors whose values were checked: id -> (weak reference, version counter, N, h). A fixed
# index buffer is checked once, not copied to the host on every call.
_checked_pairs: dict[int, tuple[weakref.ref, int, int, int]] = {}


def _check_pairs(pairs: Tensor, n: int, h: int) -> None:
    if torch.compiler.is_compiling():
        # Values cannot be read while tracing; the compiled op checks them itself.
        if not isinstance(pairs, Tensor) or pairs.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"pairs must be an int64 tensor, got {getattr(pairs, 'dtype', type(pairs))}")
        checks.shape("pairs", pairs, (n, 2), f"(N, 2) with N = thetas.shape[-1] = {n}")
        return
    try:
        version = pairs._version
    except (AttributeError, RuntimeError):  # not a tensor, or an inference tensor: check every time
        checks.index_pairs(pairs, n, h)
        return
    seen = _checked_pairs.get(id(pairs))
    if seen is not None and seen[0]() is pairs and seen[1:] == (version, n, h):
        return
    checks.index_pairs(pairs, n, h)
    key = id(pairs)
    _checked_pairs[key] = (weakref.ref(pairs, lambda _: _checked_pairs.pop(key, None)), version, n, h)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

MAX_H = 256  # the widest R the compiled op takes (csrc/orthogonal.h: kMaxH)


def _dispatch(thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool) -> Tensor:
    """The compiled extension or the reference (echo_kernels.backend decides)."""
    if use_kernel("orthogonal_product", R.device) and _kernel_takes(R.shape[-1]):
        return _OP(thetas, pairs, R, givens_first)
    return reference.orthogonal_product(thetas, pairs, R, givens_first)


def _kernel_takes(h: int) -> bool:
    """Whether the compiled op takes R of width h; warns once when it does not."""
    if h <= MAX_H:
        return True
    warn_once("orthogonal_product width", f"echo_kernels: the compiled orthogonal_product "
              f"takes h <= {MAX_H}; h = {h} runs the reference", stacklevel=4)
    return False


# --------------------------------------------------------------------------------------------------
# Registration: the extension's ops, with their fakes and autograd
# --------------------------------------------------------------------------------------------------


def _forward(thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool) -> Tensor:
    return torch.ops.echo_kernels.orthogonal_product(thetas, pairs, R, givens_first)


def _forward_fake(thetas, pairs, R, givens_first=True):
    _check_devices(thetas=thetas, pairs=pairs, R=R)
    torch._check(
        R.dim() >= 2 and R.shape[-1] == R.shape[-2] and pairs.shape == (thetas.shape[-1], 2),
        lambda: f"orthogonal_product: R {tuple(R.shape)} must be (..., h, h) and pairs "
        f"{tuple(pairs.shape)} (N, 2) with N = thetas.shape[-1]",
    )
    batch = torch.broadcast_shapes(thetas.shape[:-1], R.shape[:-2])
    h = R.shape[-1]
    return R.new_empty((*batch, h, h), dtype=torch.promote_types(thetas.dtype, R.dtype))


def _backward(grad: Tensor, thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool, M: Tensor
              ) -> tuple[Tensor, Tensor]:
    """(d thetas, dR) in the compute dtype, M's leading dims: the backward undoes the rotations from M."""
    return torch.ops.echo_kernels.orthogonal_product_backward(grad, thetas, pairs, M, givens_first)


def _backward_fake(grad, thetas, pairs, M, givens_first):
    _check_devices(grad=grad, thetas=thetas, pairs=pairs, M=M)
    compute = torch.float64 if M.dtype == torch.float64 else torch.float32
    n = thetas.shape[-1]
    return M.new_empty((*M.shape[:-2], n), dtype=compute), M.new_empty(M.shape, dtype=compute)


def _check_devices(**tensors):
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise RuntimeError(f"orthogonal_product: tensors must be on one device: {listed}")


register_kernel("orthogonal_product", _extension.serves, auto_on_cpu=True)
if _extension.LOADED:
    _OP = KernelOp("orthogonal_product", _forward, _backward, forward_fake=_forward_fake,
                   backward_fake=_backward_fake, differentiable=("thetas", "R"), save_outputs=True,
                   defined_by_extension=True)
