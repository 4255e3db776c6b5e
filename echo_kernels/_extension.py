"""The compiled extension echo_kernels._C (csrc/) and the Python side of its ops.

Importing `_C` registers `torch.ops.echo_kernels.orthogonal_product` and its backward with the
dispatcher: a CPU kernel always, a CUDA kernel when the package was built with the CUDA part. This
module adds what torch.compile, opcheck, checkpointing and FSDP need to see one op: the fake (meta)
implementations and the autograd formula.

If the extension is missing (not built, or built against another torch), `LOAD_ERROR` says why and
the ops fall back to the reference; echo_kernels.backend warns once per device type when that
happens, and `python -m echo_kernels.info` prints it.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.echo_kernels.*)

    LOADED = True
    LOAD_ERROR: str | None = None
except (ImportError, OSError) as error:  # not built, or built for another torch/Python
    LOADED = False
    LOAD_ERROR = f"{type(error).__name__}: {error}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.echo_kernels.<op> has a kernel for dispatch_key ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"echo_kernels::{op}", dispatch_key)


# Read once: the registrations are made when _C is imported, and torch.compile traces `serves`.
_CPU = has_kernel("orthogonal_product", "CPU")
_CUDA = has_kernel("orthogonal_product", "CUDA")


def cuda_compiled() -> bool:
    """True when the extension was built with its CUDA part."""
    return _CUDA


def serves(device: torch.device) -> bool:
    """Whether the compiled orthogonal_product runs tensors on `device`."""
    return (device.type == "cpu" and _CPU) or (device.type == "cuda" and _CUDA)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(**tensors):
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise RuntimeError(f"orthogonal_product: tensors must be on one device: {listed}")


if LOADED:

    @torch.library.register_fake("echo_kernels::orthogonal_product")
    def _orthogonal_product_fake(thetas, pairs, R, givens_first=True):
        _check_devices(thetas=thetas, pairs=pairs, R=R)
        torch._check(
            R.dim() >= 2 and R.shape[-1] == R.shape[-2] and pairs.shape == (thetas.shape[-1], 2),
            lambda: f"orthogonal_product: R {tuple(R.shape)} must be (..., h, h) and pairs "
            f"{tuple(pairs.shape)} (N, 2) with N = thetas.shape[-1]",
        )
        batch = torch.broadcast_shapes(thetas.shape[:-1], R.shape[:-2])
        h = R.shape[-1]
        return R.new_empty((*batch, h, h), dtype=torch.promote_types(thetas.dtype, R.dtype))

    @torch.library.register_fake("echo_kernels::orthogonal_product_backward")
    def _orthogonal_product_backward_fake(grad, thetas, pairs, M, givens_first):
        _check_devices(grad=grad, thetas=thetas, pairs=pairs, M=M)
        compute = _compute_dtype(M.dtype)
        n = thetas.shape[-1]
        return M.new_empty((*M.shape[:-2], n), dtype=compute), M.new_empty(M.shape, dtype=compute)

    def _setup_context(ctx, inputs, output):
        thetas, pairs, R, givens_first = inputs
        ctx.save_for_backward(thetas, pairs, output)  # M: the backward undoes the rotations from it
        ctx.givens_first = givens_first
        ctx.R_shape = R.shape
        ctx.R_dtype = R.dtype

    def _backward(ctx, grad):
        thetas, pairs, M = ctx.saved_tensors
        grad_thetas, grad_R = torch.ops.echo_kernels.orthogonal_product_backward(
            grad, thetas, pairs, M, ctx.givens_first
        )
        # Leading dims that were broadcast are summed back (a plain reduction: deterministic).
        grad_thetas = grad_thetas.sum_to_size(thetas.shape).to(thetas.dtype) if ctx.needs_input_grad[0] else None
        grad_R = grad_R.sum_to_size(ctx.R_shape).to(ctx.R_dtype) if ctx.needs_input_grad[2] else None
        return grad_thetas, None, grad_R, None

    torch.library.register_autograd(
        "echo_kernels::orthogonal_product", _backward, setup_context=_setup_context
    )
