"""rotary_orthogonal: y = RoPE(x @ M), the residual-stream rotary of Echo (ECHO_SPEC 3)."""

from __future__ import annotations

from torch import Tensor

from . import checks, reference
from .backend import use_kernel


def rotary_orthogonal(
    x: Tensor, M: Tensor, w: Tensor, s: Tensor | float = 1.0, offset: int = 0, layout: str = "half_split"
) -> Tensor:
    """y = RoPE(x @ M) at positions offset + t, written in `layout` ("half_split" or "interleaved").

    x: (B, T, H, h); M: (h, h); w: (h/2,) frequencies; s: scalar scale of the positions.
    Returns y: (B, T, H, h) in x's dtype.
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
    if use_kernel("rotary_orthogonal", x.device):
        raise NotImplementedError  # the Triton kernel registers itself here
    return reference.rotary_orthogonal(x, M, w, s, offset, layout)
