"""echo_attention on the CPU: query blocks against the keys their band reaches, flash-style.

The rotations are folded as in the Triton kernel: logits = RoPE(q) P RoPE(k)^T with P = M M^T / sqrt(h),
so q is multiplied by P once and k needs only RoPE. The core (`_BlockedAttention`) then takes queries a
block at a time. Its backward recomputes each block's probabilities instead of keeping all Tq x Tk of
them, and sums the bias gradient along the block's diagonals: autograd of a gathered (H, Tq, Tk) bias
scatters every logit's gradient into a (2n-1)-row table one index at a time, which is what makes the
reference slow on the CPU (over half of a training step at 1500 frames).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference

# Elements of one block's (B, H, C, K) logits: small enough to stay in cache-friendly tens of MB.
BLOCK_ELEMENTS = 1 << 21


def attention(q, k, v, M, w, s, bias, key_padding_mask, left: int, right: int, q_offset: int, k_offset: int,
              layout: str) -> Tensor:
    """echo_attention's maths (see echo_kernels.attention). left/right: band sides, -1 = unbounded."""
    compute = reference._compute_dtype(q.dtype)
    Tq, Tk, h = q.shape[2], k.shape[2], q.shape[3]
    w = w.to(compute)
    s = s.to(compute) if isinstance(s, Tensor) else s
    q_pos = torch.arange(q_offset, q_offset + Tq, device=q.device)
    k_pos = torch.arange(k_offset, k_offset + Tk, device=q.device)
    M = M.to(compute)
    P = M @ M.T / math.sqrt(h)
    q_folded = reference.apply_rope(q.to(compute), reference.rope_angles(w, s, q_pos), layout) @ P
    k_rope = reference.apply_rope(k.to(compute), reference.rope_angles(w, s, k_pos), layout)
    bias = bias.to(compute) if bias is not None else None
    out = _BlockedAttention.apply(q_folded, k_rope, v.to(compute), bias, key_padding_mask, left, right,
                                  q_offset - k_offset)
    return out.to(q.dtype)


def blocks(Tq: int, Tk: int, left: int, right: int, shift: int, batch_heads: int):
    """(a, b, lo, hi): query rows [a, b) meet only keys [lo, hi); shift = q_offset - k_offset.

    Query i sees key j iff i + shift - left <= j <= i + shift + right (-1 = unbounded side).
    """
    reach = Tk if left < 0 or right < 0 else min(Tk, left + right + 1)
    rows = BLOCK_ELEMENTS // max(1, batch_heads * (reach + 256))
    rows = max(16, min(512, rows // 16 * 16))
    for a in range(0, Tq, rows):
        b = min(a + rows, Tq)
        lo = 0 if left < 0 else min(Tk, max(0, a + shift - left))
        hi = Tk if right < 0 else min(Tk, max(0, b - 1 + shift + right + 1))
        yield a, b, lo, max(lo, hi)


def _probabilities(q, k, bias, key_padding_mask, left, right, d0) -> Tensor:
    """softmax over one block's logits (B, H, C, K); d0 = i - j of its top-left entry; empty rows give 0."""
    logits = q @ k.transpose(-1, -2)
    C, K = logits.shape[-2:]
    if bias is not None:
        logits += relative_bias_block(bias, C, K, d0)
    keep = None
    if (left >= 0 and d0 + C - 1 > left) or (right >= 0 and d0 - (K - 1) < -right):  # the band cuts the block
        rel = d0 + torch.arange(C, device=q.device)[:, None] - torch.arange(K, device=q.device)[None, :]
        keep = (rel <= left if left >= 0 else True) & (rel >= -right if right >= 0 else True)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :] if keep is None else keep & ~key_padding_mask[:, None, None, :]
    if keep is None:
        return torch.softmax(logits, dim=-1)
    logits.masked_fill_(~keep, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return probs.masked_fill_(~keep.any(dim=-1, keepdim=True), 0.0)  # softmax of a keyless row is NaN


def relative_bias_block(bias: Tensor, C: int, K: int, d0: int) -> Tensor:
    """(H, C, K): bias[clamp(i - j) + n - 1] of a block whose top-left entry has i - j = d0.

    The block is Toeplitz, so it is a strided view of one (H, C + K - 1) row, vec[u] = the bias at
    i - j = d0 + C - 1 - u: row r reads vec[C - 1 - r:][:K]. Cheaper than gathering C x K indices.
    """
    n = (bias.shape[0] + 1) // 2
    offsets = d0 + (C - 1) - torch.arange(C + K - 1, device=bias.device)
    vec = bias.T[:, offsets.clamp(-(n - 1), n - 1) + (n - 1)]
    return vec.unfold(1, K, 1).flip(1)


def bias_gradient(dlogits: Tensor, d0: int, n: int) -> Tensor:
    """(2n-1, H): dlogits (H, C, K) summed over each clamped offset i - j = d0 + row - column."""
    if n == 1:
        return dlogits.sum((1, 2))[None]
    # offset e lies on the diagonal column - row = d0 - e; the clamped ends are the two triangles
    far_past = torch.tril(dlogits, diagonal=d0 - (n - 1)).sum((1, 2))  # i - j >= n - 1
    far_future = torch.triu(dlogits, diagonal=d0 + (n - 1)).sum((1, 2))  # i - j <= -(n - 1)
    band = [torch.diagonal(dlogits, offset=d0 - e, dim1=1, dim2=2).sum(-1) for e in range(-(n - 2), n - 1)]
    return torch.stack([far_future, *band, far_past])


class _BlockedAttention(torch.autograd.Function):
    """softmax(q k^T + bias + masks) v over (B, H, T, h) inputs, one query block at a time."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, left, right, shift):
        B, H, Tq, _ = q.shape
        out = q.new_zeros(B, H, Tq, v.shape[-1])
        masks = (left, right)
        for a, b, lo, hi in blocks(Tq, k.shape[2], left, right, shift, B * H):
            if hi > lo:
                kpm = key_padding_mask[:, lo:hi] if key_padding_mask is not None else None
                probs = _probabilities(q[:, :, a:b], k[:, :, lo:hi], bias, kpm, *masks, a + shift - lo)
                out[:, :, a:b] = probs @ v[:, :, lo:hi]
        ctx.save_for_backward(q, k, v, bias, key_padding_mask, out)
        ctx.masks = (left, right, shift)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, key_padding_mask, out = ctx.saved_tensors
        left, right, shift = ctx.masks
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        want_dbias = bias is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros_like(bias) if want_dbias else None
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)  # (B, H, Tq, 1): rowsum(P * dP)
        B, H, Tq, _ = q.shape
        for a, b, lo, hi in blocks(Tq, k.shape[2], left, right, shift, B * H):
            if hi == lo:
                continue
            kpm = key_padding_mask[:, lo:hi] if key_padding_mask is not None else None
            probs = _probabilities(q[:, :, a:b], k[:, :, lo:hi], bias, kpm, left, right, a + shift - lo)
            do = dout[:, :, a:b]
            dv[:, :, lo:hi] += probs.transpose(-1, -2) @ do
            dlogits = (do @ v[:, :, lo:hi].transpose(-1, -2)).sub_(delta[:, :, a:b]).mul_(probs)
            dq[:, :, a:b] = dlogits @ k[:, :, lo:hi]
            dk[:, :, lo:hi] += dlogits.transpose(-1, -2) @ q[:, :, a:b]
            if want_dbias:
                dbias += bias_gradient(dlogits.sum(0), a + shift - lo, (bias.shape[0] + 1) // 2)
        return dq, dk, dv, dbias, None, None, None, None
