"""echo_attention on the CPU: query blocks against the keys their band reaches, flash-style.

The rotations are folded as in the Triton kernel: in the "rope_then_m" order logits = RoPE(q) P RoPE(k)^T
with P = M M^T / sqrt(h), so q is multiplied by P once and k needs only RoPE; in the "m_then_rope" order
q and k are multiplied by M first (not at all when M is None) and q is only scaled by 1 / sqrt(h). The
core (`_BlockedAttention`) then takes queries a block at a time. Its backward recomputes each block's
probabilities instead of keeping all Tq x Tk of them, and sums the bias gradient along the block's
diagonals: autograd of a gathered (H, Tq, Tk) bias scatters every logit's gradient into a (2n-1)-row
table one index at a time, which is what makes the reference slow on the CPU (over 40% of a training step
of the reference path at T = 1500).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference

# Elements of one block's (B, H, C, K) logits: small enough to stay in cache-friendly tens of MB.
BLOCK_ELEMENTS = 1 << 21


def attention(q, k, v, M, w, s, bias, key_padding_mask, left: int, right: int, q_offset: int, k_offset: int,
              layout: str, rotation: str = "m_then_rope") -> Tensor:
    """echo_attention's maths (see echo_kernels.attention). left/right: the band of
    reference.window_bounds;
    M: (h, h) or None (the identity)."""
    dtype, compute = q.dtype, reference._compute_dtype(q.dtype)
    Tq, Tk, h = q.shape[2], k.shape[2], q.shape[3]
    w, s = w.to(compute), reference._as_compute(s, compute)
    q_pos = torch.arange(q_offset, q_offset + Tq, device=q.device)
    k_pos = torch.arange(k_offset, k_offset + Tk, device=q.device)
    q, k = q.to(compute), k.to(compute)
    P = None
    if M is not None and rotation == "m_then_rope":
        M = M.to(compute)
        q, k = q @ M, k @ M
    elif M is not None:
        M = M.to(compute)
        P = M @ M.T / math.sqrt(h)
    q_rope = reference.apply_rope(q, reference.rope_angles(w, s, q_pos), layout)
    q_folded = q_rope @ P if P is not None else q_rope / math.sqrt(h)
    k_rope = reference.apply_rope(k, reference.rope_angles(w, s, k_pos), layout)
    bias = bias.to(compute) if bias is not None else None
    v = v.to(compute)
    if key_padding_mask is not None:  # a padded key's k and v never reach a product (0 * NaN is NaN)
        gone = key_padding_mask[:, None, :, None]
        k_rope, v = k_rope.masked_fill(gone, 0.0), v.masked_fill(gone, 0.0)
    v = v.contiguous()
    shift = q_offset - k_offset
    out = _BlockedAttention.apply(q_folded, k_rope, v, bias, key_padding_mask, left, right, shift)
    return out.to(dtype)


def blocks(Tq: int, Tk: int, left: int, right: int, shift: int, batch_heads: int):
    """(a, b, lo, hi): query rows [a, b) meet only keys [lo, hi); shift = q_offset - k_offset.

    Query i sees key j iff i + shift - left <= j <= i + shift + right.
    """
    reach = min(Tk, left + right + 1)
    rows = BLOCK_ELEMENTS // max(1, batch_heads * (reach + 256))
    rows = max(16, min(512, rows // 16 * 16))
    for a in range(0, Tq, rows):
        b = min(a + rows, Tq)
        lo = min(Tk, max(0, a + shift - left))
        hi = min(Tk, max(0, b - 1 + shift + right + 1))
        yield a, b, lo, max(lo, hi)


def _probabilities(q, k, bias, key_padding_mask, left, right, d0) -> tuple[Tensor, Tensor | None]:
    """softmax of one block's logits, and which keys each query keeps; d0 = i - j of its top-left
    entry; rows with no key give 0.

    q: (B*H, C, h); k: (B*H, K, h); bias: (2n-1, H) or None; key_padding_mask: (B, K) or None.
    Returns probs (B*H, C, K) and keep, bool broadcastable to it, or None where every key is kept.
    """
    C, K = q.shape[1], k.shape[1]
    if bias is None:
        logits = torch.bmm(q, k.transpose(1, 2))
    else:  # the bias written first, the product accumulated onto it: one pass less than adding after
        batch = q.shape[0] // bias.shape[1]
        logits = relative_bias_block(bias, C, K, d0).repeat(batch, 1, 1).baddbmm_(q, k.transpose(1, 2))
    keep = None
    cuts_left, cuts_right = d0 + C - 1 > left, d0 - (K - 1) < -right  # the band cuts the block
    if cuts_left or cuts_right:
        rel = d0 + torch.arange(C, device=q.device)[:, None] - torch.arange(K, device=q.device)[None, :]
        keep = (rel <= left if cuts_left else True) & (rel >= -right if cuts_right else True)
    if key_padding_mask is not None:
        B = key_padding_mask.shape[0]
        padding = key_padding_mask[:, None, None, :].expand(B, q.shape[0] // B, 1, K).reshape(-1, 1, K)
        keep = ~padding if keep is None else keep & ~padding
    if keep is None:
        return torch.softmax(logits, dim=-1), None
    logits.masked_fill_(~keep, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return probs.masked_fill_(~keep.any(dim=-1, keepdim=True), 0.0), keep  # softmax of a keyless row is NaN


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
    """(2n-1, H): dlogits (B, H, C, K) summed over each clamped offset i - j = d0 + row - column."""
    if n == 1:
        return dlogits.sum((0, 2, 3))[None]
    # Columns left of p0 are past the band for every row, columns from f0 on beyond it: plain sums.
    # Only the strip between needs the triangles and diagonals (offset e lies on column - row = d0 - e).
    C, K = dlogits.shape[-2:]
    p0 = min(max(d0 - n + 2, 0), K)
    f0 = min(max(C + d0 + n - 2, 0), K)
    strip, d = dlogits[..., p0:f0].sum(0), d0 - p0
    far_past = dlogits[..., :p0].sum((0, 2, 3)) + torch.tril(strip, diagonal=d - (n - 1)).sum((1, 2))
    far_future = dlogits[..., f0:].sum((0, 2, 3)) + torch.triu(strip, diagonal=d + (n - 1)).sum((1, 2))
    band = [torch.diagonal(strip, offset=d - e, dim1=1, dim2=2).sum(-1) for e in range(-(n - 2), n - 1)]
    return torch.stack([far_future, *band, far_past])


def _values_finite(v: Tensor) -> bool:
    """Whether v holds only finite values. A traced graph (torch.compile) cannot branch on data: there
    it is taken as true, so a non-finite value past the band reaches the queries of its block, as on the
    Triton kernels (padded keys are zeroed before, on every path)."""
    return torch.compiler.is_compiling() or bool(torch.isfinite(v).all())


class _BlockedAttention(torch.autograd.Function):
    """softmax(q k^T + bias + masks) v over (B, H, T, h) inputs, one query block at a time."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, left, right, shift):
        B, H, Tq, h = q.shape
        q3, k3, v3 = (t.reshape(B * H, t.shape[2], h) for t in (q, k, v))
        out = q3.new_zeros(B * H, Tq, h)
        values_finite = _values_finite(v)  # else the band's masked keys need reference.weighted_values
        for a, b, lo, hi in blocks(Tq, k.shape[2], left, right, shift, B * H):
            if hi > lo:
                kpm = key_padding_mask[:, lo:hi] if key_padding_mask is not None else None
                probs, keep = _probabilities(q3[:, a:b], k3[:, lo:hi], bias, kpm, left, right, a + shift - lo)
                if values_finite or keep is None:
                    torch.bmm(probs, v3[:, lo:hi], out=out[:, a:b])
                else:
                    out[:, a:b] = reference.weighted_values(probs, v3[:, lo:hi], keep)
        out = out.view(B, H, Tq, h)
        ctx.save_for_backward(q, k, v, bias, key_padding_mask, out)
        ctx.masks = (left, right, shift)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, key_padding_mask, out = ctx.saved_tensors
        left, right, shift = ctx.masks
        B, H, Tq, h = q.shape
        q3, k3, v3 = (t.reshape(B * H, t.shape[2], h) for t in (q, k, v))
        do3 = dout.reshape(B * H, Tq, h)
        dq, dk, dv = torch.zeros_like(q3), torch.zeros_like(k3), torch.zeros_like(v3)
        want_dbias = bias is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros_like(bias) if want_dbias else None
        minus_delta = -(do3 * out.view(B * H, Tq, h)).sum(-1, keepdim=True)  # -rowsum(P * dP)
        # dP at a masked key is 0 * (dO . v); a non-finite v there must not make it NaN
        values_finite = _values_finite(v)
        for a, b, lo, hi in blocks(Tq, k.shape[2], left, right, shift, B * H):
            if hi == lo:
                continue
            kpm = key_padding_mask[:, lo:hi] if key_padding_mask is not None else None
            probs, keep = _probabilities(q3[:, a:b], k3[:, lo:hi], bias, kpm, left, right, a + shift - lo)
            do = do3[:, a:b]
            dv[:, lo:hi].baddbmm_(probs.transpose(1, 2), do)
            dlogits = torch.baddbmm(minus_delta[:, a:b], do, v3[:, lo:hi].transpose(1, 2)).mul_(probs)
            if keep is not None and not values_finite:
                dlogits.masked_fill_(~keep, 0.0)
            torch.bmm(dlogits, k3[:, lo:hi], out=dq[:, a:b])
            dk[:, lo:hi].baddbmm_(dlogits.transpose(1, 2), q3[:, a:b])
            if want_dbias:
                G = dlogits.view(B, H, b - a, hi - lo)
                dbias += bias_gradient(G, a + shift - lo, (bias.shape[0] + 1) // 2)
        shape = (B, H, -1, h)
        return dq.view(shape), dk.view(shape), dv.view(shape), dbias, None, None, None, None
