"""rotary_orthogonal: y = RoPE(x @ M), the residual-stream rotary of Echo (docs/model.md, Rotary embedding).

The Triton kernel (echo_kernels.kernels.rotary) is reached three ways, cheapest first:

- eager, no gradient wanted: the raw launcher, nothing around it;
- eager, with gradients: a `torch.autograd.Function` around the launchers (a few microseconds,
  where the custom op's Python autograd costs tens);
- under torch.compile (or when called as `torch.ops.echo_kernels.rotary_orthogonal`): the
  `torch.library.custom_op` with its fake and its autograd, so the graph sees through it. Its
  backward is a custom op too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, reference
from .backend import register_kernel, triton_interpreted, use_kernel

try:
    from .kernels import rotary as _kernels
except ImportError:  # no triton on this platform: the reference serves every call
    _kernels = None


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
    # float64 has no kernel: it is the reference's (and gradcheck's) precision.
    if x.dtype in _KERNEL_DTYPES and use_kernel("rotary_orthogonal", x.device):
        return _dispatch(x, M, w, s, offset, layout)
    return reference.rotary_orthogonal(x, M, w, s, offset, layout)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _split_s(s: Tensor | float) -> tuple[Optional[Tensor], float]:
    """The custom op's schema takes s as an optional tensor plus a float used when it is None."""
    return (s, 0.0) if isinstance(s, Tensor) else (None, float(s))


def _dispatch(x: Tensor, M: Tensor, w: Tensor, s: Tensor | float, offset: int, layout: str) -> Tensor:
    s_tensor, s_value = _split_s(s)
    if torch.compiler.is_compiling():
        return torch.ops.echo_kernels.rotary_orthogonal(x, M, w, s_tensor, s_value, offset, layout)
    inputs = (x, M, w) if s_tensor is None else (x, M, w, s_tensor)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _RotaryOrthogonal.apply(x, M, w, s_tensor, s_value, offset, layout)
    return _kernels.rotary_forward(x, M, w, s_tensor, s_value, offset, layout)


def _grads(dy, x, M, w, s_tensor, s_value, offset, layout, needs):
    """Gradients of (x, M, w, s) for the autograd paths; None where not needed or s is a float."""
    dx, dM, dw, ds = _kernels.rotary_backward(dy, x, M, w, s_tensor, s_value, offset, layout)
    ds = ds.reshape(s_tensor.shape).to(s_tensor.dtype) if s_tensor is not None else None
    return tuple(g if need else None for g, need in zip((dx, dM, dw, ds), needs))


class _RotaryOrthogonal(torch.autograd.Function):
    """Eager autograd straight onto the launchers."""

    @staticmethod
    def forward(ctx, x, M, w, s_tensor, s_value, offset, layout):
        ctx.save_for_backward(x, M, w, s_tensor)
        ctx.args = (s_value, offset, layout)
        return _kernels.rotary_forward(x, M, w, s_tensor, s_value, offset, layout)

    @staticmethod
    def backward(ctx, dy):
        x, M, w, s_tensor = ctx.saved_tensors
        grads = _grads(dy, x, M, w, s_tensor, *ctx.args, ctx.needs_input_grad[:4])
        return *grads, None, None, None


# --------------------------------------------------------------------------------------------------
# torch.library registration: torch.compile, opcheck, and explicit torch.ops calls
# --------------------------------------------------------------------------------------------------

if _kernels is not None:

    @torch.library.custom_op("echo_kernels::rotary_orthogonal", mutates_args=())
    def _rotary_op(
        x: Tensor, M: Tensor, w: Tensor, s: Optional[Tensor], s_value: float, offset: int, layout: str
    ) -> Tensor:
        """y = RoPE(x @ M); s is the scale tensor, or None to use s_value."""
        return _kernels.rotary_forward(x, M, w, s, s_value, offset, layout)

    @_rotary_op.register_fake
    def _(x, M, w, s, s_value, offset, layout):
        return torch.empty_like(x)  # the launcher allocates y the same way

    @torch.library.custom_op("echo_kernels::rotary_orthogonal_backward", mutates_args=())
    def _rotary_backward_op(
        dy: Tensor, x: Tensor, M: Tensor, w: Tensor, s: Optional[Tensor], s_value: float, offset: int, layout: str
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(dx, dM, dw, ds): ds is a 0-d float32 tensor, the gradient of the scale."""
        return _kernels.rotary_backward(dy, x, M, w, s, s_value, offset, layout)

    @_rotary_backward_op.register_fake
    def _(dy, x, M, w, s, s_value, offset, layout):
        return (
            torch.empty_like(x),
            M.new_empty(M.shape),
            w.new_empty(w.shape),
            x.new_empty((), dtype=torch.float32),
        )

    def _setup_context(ctx, inputs, output):
        x, M, w, s, s_value, offset, layout = inputs
        ctx.save_for_backward(x, M, w, s)
        ctx.args = (s_value, offset, layout)

    def _backward(ctx, dy):
        x, M, w, s = ctx.saved_tensors
        s_value, offset, layout = ctx.args
        dx, dM, dw, ds = torch.ops.echo_kernels.rotary_orthogonal_backward(dy, x, M, w, s, s_value, offset, layout)
        ds = ds.reshape(s.shape).to(s.dtype) if s is not None else None
        return dx, dM, dw, ds, None, None, None

    _rotary_op.register_autograd(_backward, setup_context=_setup_context)

    def _serves(device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())

    register_kernel("rotary_orthogonal", _serves, auto_on_cpu=False)
