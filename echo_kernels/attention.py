"""echo_attention: rotary + Givens rotation, clamped relative bias and sliding window (docs/model.md,
Attention).

Two orders of rotation: "m_then_rope" (the default, RoPE(q M) . RoPE(k M)) and "rope_then_m"
(RoPE(q) M . RoPE(k) M). M=None is the identity, for which the two agree: the model passes it in the
default order, having folded M into its q and k projections. The kernels serve M=None and
"rope_then_m"; "m_then_rope" with an M is computed as q M and k M in PyTorch (autograd takes dM
from there), then the M=None kernel.

CUDA tensors run the Triton kernels (echo_kernels.kernels.attention and .attention_backward); CPU
tensors run the blocked CPU path (echo_kernels.kernels.attention_cpu) under ECHO_BACKEND=auto, the
reference under =reference, and the Triton kernels through the interpreter under =triton with
TRITON_INTERPRET=1 (tests). The window is the band (left, right) of echo_kernels.reference.window_bounds
on every path, ints where an unbounded side is reference.UNBOUNDED.

Read in the order every op file of the package keeps: the public function, its dispatch, then the
registration of the kernels as a KernelOp.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import checks, reference
from .backend import TRITON_IMPORT_ERROR, register_kernel, requested_backend, triton_serves, use_kernel
from .kernel_op import KernelOp
from .kernels import ATTENTION_HEAD_WIDTHS, attention_cpu


def echo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    M: Tensor | None,
    w: Tensor | None,
    s: Tensor | float,
    bias: Tensor | None,
    *,
    window: int | tuple[int, int] | None = None,
    causal: bool = False,
    q_offset: int = 0,
    k_offset: int = 0,
    key_padding_mask: Tensor | None = None,
    layout: str = "half_split",
    rotation: str = "m_then_rope",
    keys_rotated: bool = False,
) -> Tensor:
    """softmax(q' k'^T / sqrt(h) + bias[clamp(i - j) + n - 1] + masks) @ v, where

        q' = RoPE(q M), k' = RoPE(k M)     rotation = "m_then_rope" (the default)
        q' = RoPE(q) M, k' = RoPE(k) M     rotation = "rope_then_m"

    q: (B, H, Tq, h); k, v: (B, H, Tk, h); M: (h, h), or None for the identity (plain RoPE in
    either order: what the model passes once M is folded into its projections); w: (h/2,), or None
    for no RoPE (q and k given rotated already: then q' = q M, k' = k M in either order, and s is
    unused); s: a float or a tensor of shape () or (1,); bias: (2n-1, H) or None; window: None (global),
    an int w (|i - j| <= w) or (left, right) (key j kept iff i - left <= j <= i + right);
    key_padding_mask: (B, Tk) bool, True = padded; keys_rotated: k is k' already (rotated at its
    positions k_offset + j in `layout`, as `rotation` says, by this M: RoPE(k M) or RoPE(k) M), as a
    decoding cache keeps the keys it stores, and only q is rotated (by w, s and M; with w None, q' = q M).
    Query i sits at position q_offset + i, key j at k_offset + j. Returns (B, H, Tq, h) in q's
    dtype; a query with no key left gives zeros.

    The Triton kernels are built for h in (32, 64, 128); other even widths up to 128 run on them
    zero-padded to the next of those (same result, the cost of the wider head); wider heads are refused
    there with a ValueError, as is a launch any of whose tensors would span 2**31 elements or more (the
    kernels' offsets are int32; docs/model.md, "Registration").

    With bf16 or fp16 inputs the Triton kernels add the bias rounded to that dtype (forward and backward
    alike), as an additive mask in that dtype would be for torch's scaled_dot_product_attention.

    Masked keys contribute nothing even where their values are NaN or inf (0 * NaN would be NaN):
    the reference and CPU paths leave them out exactly; the Triton kernels (and the CPU path under
    torch.compile, which cannot branch on data) never let a padded key's k or v into a product, but a
    non-finite k or v at a key past the band (a causal future key, say) that shares a key tile with
    keys the same query tile attends still reaches that tile's queries.
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
    if M is not None:
        checks.floating("M", M)
        checks.shape("M", M, (h, h), f"(h, h) = ({h}, {h})")
    if w is not None:
        checks.floating("w", w)
        checks.shape("w", w, (h // 2,), f"(h/2,) = ({h // 2},)")
    checks.scale("s", s)
    if bias is not None:
        checks.floating("bias", bias)
        if bias.dim() != 2 or bias.shape[1] != H or bias.shape[0] % 2 == 0:
            raise ValueError(f"bias must have shape (2n-1, H) with H = {H}, got {tuple(bias.shape)}")
    checks.window(window)
    for name, flag in (("causal", causal), ("keys_rotated", keys_rotated)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    checks.non_negative_int("q_offset", q_offset)
    checks.non_negative_int("k_offset", k_offset)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = padded), "
                             f"got {key_padding_mask.dtype}")
        checks.shape("key_padding_mask", key_padding_mask, (B, Tk), f"(B, Tk) = ({B}, {Tk})")
    checks.layout(layout)
    checks.rotation(rotation)
    checks.same_device(q=q, k=k, v=v, M=M, w=w, s=s, bias=bias, key_padding_mask=key_padding_mask)
    if max(q_offset + Tq, k_offset + Tk) > reference.UNBOUNDED:
        raise ValueError(f"positions must stay below 2**30 (the kernels' unbounded window side), "
                         f"got q_offset + Tq = {q_offset + Tq}, k_offset + Tk = {k_offset + Tk}")
    left, right = reference.window_bounds(window, causal)
    return _dispatch(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
                     rotation, keys_rotated)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def _dispatch(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout, rotation,
              keys_rotated):
    """The Triton kernels, the blocked CPU path or the reference (echo_kernels.backend decides)."""
    if use_kernel("echo_attention", q.device):
        return _kernel_attention(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset,
                                 layout, rotation, keys_rotated)
    if q.device.type == "cpu" and requested_backend() == "auto":
        return attention_cpu.attention(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset,
                                       k_offset, layout, rotation, keys_rotated)
    return reference.echo_attention(q, k, v, M, w, s, bias, window=(left, right), q_offset=q_offset,
                                    k_offset=k_offset, key_padding_mask=key_padding_mask, layout=layout,
                                    rotation=rotation, keys_rotated=keys_rotated)


def _kernel_attention(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
                      rotation, keys_rotated):
    """The op's arguments from echo_attention's: s a tensor, M folded in or passed, heads widened."""
    if not isinstance(s, Tensor):
        s = torch.tensor(float(s), dtype=torch.float32, device=q.device)
    if w is None:  # angle 0 everywhere: the "interleaved" layout writes each pair back in place
        w, layout = torch.zeros(q.shape[-1] // 2, dtype=torch.float32, device=q.device), "interleaved"
    if M is not None and rotation == "m_then_rope":
        # RoPE(q M) . RoPE(k M): the kernels rotate what they are given, and autograd takes dM from here
        M = M.to(q.dtype)
        q, k, M = q @ M, k if keys_rotated else k @ M, None
    h, width = q.shape[-1], kernel_head_width(q.shape[-1])
    if width != h:
        q, k, v, M, w = _widen_heads(q, k, v, M, w, layout, width, keys_rotated)
    out, _ = _OP(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
                 keys_rotated)
    return out[..., :h] if width != h else out


def kernel_head_width(h: int) -> int:
    """The head width of the Triton kernels that serves h: the smallest of ATTENTION_HEAD_WIDTHS >= h."""
    for width in ATTENTION_HEAD_WIDTHS:
        if width >= h:
            return width
    raise ValueError(f"head width h = {h} is wider than the Triton attention kernels serve (h <= "
                     f"{ATTENTION_HEAD_WIDTHS[-1]}; built for {', '.join(map(str, ATTENTION_HEAD_WIDTHS))}); "
                     "use fewer, narrower heads, or ECHO_BACKEND=reference for the plain-PyTorch path")


def _widen_heads(q, k, v, M, w, layout: str, width: int, keys_rotated: bool = False):
    """q, k, v (..., h), M (h, h) and w (h/2,) zero-padded to head width `width`, computing the same
    attention: RoPE pairs (x[2m], x[2m+1]) are read from q and k, so they are padded at the end (the
    new pairs are zeros at angle 0); M acts on RoPE's output, whose "half_split" layout puts a pair's
    halves at m and width/2 + m, so M's rows and columns go where h's outputs land, and so do rotated
    keys' entries (keys_rotated). q is scaled so that the kernels' 1/sqrt(width) is 1/sqrt(h). The padding
    goes through autograd, which slices the gradients back."""
    h = q.shape[-1]
    pad = (0, width - h)
    q = torch.nn.functional.pad(q * math.sqrt(width / h), pad)
    v = torch.nn.functional.pad(v, pad)
    w = torch.nn.functional.pad(w, (0, (width - h) // 2))
    if keys_rotated or M is not None:  # where h's outputs land among width's
        half = torch.arange(h // 2, device=q.device)
        outputs = (torch.cat([half, width // 2 + half]) if layout == "half_split"
                   else torch.arange(h, device=q.device))
    if keys_rotated:
        k = k.new_zeros((*k.shape[:-1], width)).index_copy(-1, outputs, k)
    else:
        k = torch.nn.functional.pad(k, pad)
    if M is not None:
        M = M.new_zeros(width, h).index_copy(0, outputs, M)
        M = M.new_zeros(width, width).index_copy(1, outputs, M)
    return q, k, v, M, w


# --------------------------------------------------------------------------------------------------
# Registration: the launchers of the kernels, as the op echo_kernels::echo_attention
# --------------------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, M: Optional[Tensor], w: Tensor, s: Tensor,
             bias: Optional[Tensor], key_padding_mask: Optional[Tensor], left: int, right: int, q_offset: int,
             k_offset: int, layout: str, keys_rotated: bool) -> tuple[Tensor, Tensor]:
    """(out (B, H, Tq, h), lse (B, H, Tq) fp32), in the "rope_then_m" order (M=None: RoPE only);
    left/right: the band of reference.window_bounds; keys_rotated: k is k' = RoPE(k) M already."""
    return _kernels.forward(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
                            keys_rotated)


def _forward_fake(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
                  keys_rotated):
    B, H, Tq, h = q.shape
    return q.new_empty((B, H, Tq, h)), q.new_empty((B, H, Tq), dtype=torch.float32)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, M: Optional[Tensor], w: Tensor, s: Tensor,
              bias: Optional[Tensor], key_padding_mask: Optional[Tensor], left: int, right: int,
              q_offset: int, k_offset: int, layout: str, keys_rotated: bool, out: Tensor, lse: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dM, dw, ds, dbias); dM and dbias are empty (0,) when there is no M / bias table."""
    dq, dk, dv, dM, dw, ds, dbias = _kernels_backward.backward(
        dout, q, k, v, out, lse, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
        keys_rotated)
    dM = dM if dM is not None else q.new_empty((0,))
    dbias = dbias if dbias is not None else q.new_empty((0,))
    return dq, dk, dv, dM, dw, ds.reshape(s.shape), dbias


def _backward_fake(dout, q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
                   keys_rotated, out, lse):
    dM = M.new_empty(M.shape) if M is not None else q.new_empty((0,))
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dM,
            w.new_empty(w.shape), s.new_empty(s.shape, dtype=torch.float32), dbias)


register_kernel("echo_attention", triton_serves, auto_on_cpu=False)
if TRITON_IMPORT_ERROR is None:
    from .kernels import attention as _kernels, attention_backward as _kernels_backward

    _OP = KernelOp("echo_attention", _forward, _backward, forward_fake=_forward_fake,
                   backward_fake=_backward_fake, differentiable=("q", "k", "v", "M", "w", "s", "bias"),
                   save_outputs=True)
