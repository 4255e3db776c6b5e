"""rotary_orthogonal: y = RoPE(x @ M), the residual-stream rotary of Echo (docs/model.md, Rotary embedding).

Read in the order every op file of the package keeps: the public function, its dispatch, then the
registration of its kernel (the Triton kernel of echo_kernels.kernels.rotary) as a KernelOp.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, reference
from .backend import TRITON_IMPORT_ERROR, register_kernel, triton_serves, use_kernel
from .kernel_op import KernelOp


def rotary_orthogonal(
    x: Tensor, M: Tensor, w: Tensor, s: Tensor | float = 1.0, offset: int = 0, layout: str = "half_split"
) -> Tensor:
    """y = RoPE(x @ M) at positions offset + t, written in `layout` ("half_split" or "interleaved").

    x: (B, T, H, h), any strides (a transpose(1, 2) view of (B, H, T, h) is read in place);
    M: (h, h); w: (h/2,) frequencies; s: scale of the positions, a float or a tensor of shape () or (1,).
    Returns y: (B, T, H, h) in x's dtype, laid out like x where x is dense.
    """
    checks.floating("x", x)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must have shape (B, T, H, h) with h even, got {tuple(x.shape)}")
    h = x.shape[-1]
    checks.floating("M", M)
    checks.shape("M", M, (h, h), f"(h, h) = ({h}, {h})")
    checks.floating("w", w)
    checks.shape("w", w, (h // 2,), f"(h/2,) = ({h // 2},)")
    checks.scale("s", s)
    checks.non_negative_int("offset", offset)
    checks.layout(layout)
    checks.same_device(x=x, M=M, w=w, s=s)
    return _dispatch(x, M, w, s, offset, layout)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dispatch(x: Tensor, M: Tensor, w: Tensor, s: Tensor | float, offset: int, layout: str) -> Tensor:
    """The Triton kernel or the reference (echo_kernels.backend decides)."""
    # float64 has no kernel: it is the reference's (and gradcheck's) precision.
    if x.dtype not in _KERNEL_DTYPES or not use_kernel("rotary_orthogonal", x.device):
        return reference.rotary_orthogonal(x, M, w, s, offset, layout)
    # The op's schema takes s as an optional tensor plus a float used when it is None.
    s_tensor, s_value = (s, 0.0) if isinstance(s, Tensor) else (None, float(s))
    return _OP(x, M, w, s_tensor, s_value, offset, layout)


# --------------------------------------------------------------------------------------------------
# Registration: the launchers of the kernel, as the op echo_kernels::rotary_orthogonal
# --------------------------------------------------------------------------------------------------


def _forward(x: Tensor, M: Tensor, w: Tensor, s: Optional[Tensor], s_value: float, offset: int,
             layout: str) -> Tensor:
    """y = RoPE(x @ M); s is the scale tensor, or None to use s_value."""
    return _kernels.rotary_forward(x, M, w, s, s_value, offset, layout)


def _forward_fake(x, M, w, s, s_value, offset, layout):
    return torch.empty_like(x)  # the launcher allocates y the same way


def _backward(dy: Tensor, x: Tensor, M: Tensor, w: Tensor, s: Optional[Tensor], s_value: float, offset: int,
              layout: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dM, dw, ds): ds is float32, shaped like s (0-d when s is None: the gradient of s_value)."""
    dx, dM, dw, ds = _kernels.rotary_backward(dy, x, M, w, s, s_value, offset, layout)
    return dx, dM, dw, ds.reshape(s.shape) if s is not None else ds


def _backward_fake(dy, x, M, w, s, s_value, offset, layout):
    ds_shape = s.shape if s is not None else ()
    return (torch.empty_like(x), M.new_empty(M.shape), w.new_empty(w.shape),
            x.new_empty(ds_shape, dtype=torch.float32))


register_kernel("rotary_orthogonal", triton_serves, auto_on_cpu=False)
if TRITON_IMPORT_ERROR is None:
    from .kernels import rotary as _kernels

    _OP = KernelOp("rotary_orthogonal", _forward, _backward, forward_fake=_forward_fake,
                   backward_fake=_backward_fake, differentiable=("x", "M", "w", "s"))
