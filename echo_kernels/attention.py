"""echo_attention: rotary + Givens rotation, clamped relative bias and sliding window (ECHO_SPEC 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, reference
from .backend import use_kernel


def echo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    M: Tensor,
    w: Tensor,
    s: Tensor | float,
    bias: Tensor | None,
    *,
    window: int | tuple[int, int] | None = None,
    causal: bool = False,
    q_offset: int = 0,
    k_offset: int = 0,
    key_padding_mask: Tensor | None = None,
    layout: str = "half_split",
) -> Tensor:
    """softmax(RoPE(q) M (RoPE(k) M)^T / sqrt(h) + bias[clamp(i - j) + n - 1] + masks) @ v.

    q: (B, H, Tq, h); k, v: (B, H, Tk, h); M: (h, h); w: (h/2,); s: scalar;
    bias: (2n-1, H) or None; window: None (global), an int w (|i - j| <= w) or (left, right)
    (key j kept iff i - left <= j <= i + right); key_padding_mask: (B, Tk) bool, True = padded.
    Query i sits at position q_offset + i, key j at k_offset + j. Returns (B, H, Tq, h) in q's
    dtype; a query with no key left gives zeros.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, h), got {tuple(t.shape)}")
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    if h % 2:
        raise ValueError(f"head width h must be even, got {h}")
    checks.shape("k", k, (B, H, None, h), f"(B, H, Tk, h) = ({B}, {H}, Tk, {h})")
    checks.shape("v", v, (B, H, Tk, h), f"(B, H, Tk, h) = ({B}, {H}, {Tk}, {h})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    checks.floating("M", M)
    checks.shape("M", M, (h, h), f"(h, h) = ({h}, {h})")
    checks.floating("w", w)
    checks.shape("w", w, (h // 2,), f"(h/2,) = ({h // 2},)")
    checks.scale("s", s)
    if bias is not None:
        checks.floating("bias", bias)
        if bias.dim() != 2 or bias.shape[1] != H or bias.shape[0] % 2 == 0:
            raise ValueError(f"bias must have shape (2n-1, H) with H = {H}, got {tuple(bias.shape)}")
    checks.window(window)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    checks.non_negative_int("q_offset", q_offset)
    checks.non_negative_int("k_offset", k_offset)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = padded), got {key_padding_mask.dtype}")
        checks.shape("key_padding_mask", key_padding_mask, (B, Tk), f"(B, Tk) = ({B}, {Tk})")
    checks.layout(layout)
    checks.same_device(q=q, k=k, v=v, M=M, w=w, s=s, bias=bias, key_padding_mask=key_padding_mask)
    if isinstance(window, list):
        window = tuple(window)
    if use_kernel("echo_attention", q.device):
        raise NotImplementedError  # the Triton kernel registers itself here
    return reference.echo_attention(
        q, k, v, M, w, s, bias, window=window, causal=causal, q_offset=q_offset, k_offset=k_offset,
        key_padding_mask=key_padding_mask, layout=layout,
    )
