"""echo_attention on the CPU: torch's fused attention (scaled_dot_product_attention's kernels) where it
serves, else query blocks against the keys their band reaches, flash-style (docs/model.md, Kernels).

The rotations are folded as in the Triton kernel: in the "rope_then_m" order logits = RoPE(q) P RoPE(k)^T
with P = M M^T / sqrt(h), so q is multiplied by P once and k needs only RoPE; in the "m_then_rope" order
q and k are multiplied by M first (not at all when M is None) and q is only scaled by 1 / sqrt(h). Keys
are rotated once per call. The forward (`fused_attention`) turns the clamped bias, the band and the key
padding into one additive mask for the fused kernel, which also returns each query's logsumexp. The
backward (`_BlockedAttention`) is the fused kernel's where every query sees every key and there are
FUSED_BACKWARD_ROWS queries or more, its dbias from widened queries (`_unmasked_backward`); else it takes
queries a block at a time, recomputes their probabilities from the logsumexp instead of keeping all
Tq x Tk of them, and sums the bias gradient along each block's diagonals: autograd of a gathered
(H, Tq, Tk) bias scatters every logit's gradient into a (2n-1)-row table one index at a time, which is
what makes the reference slow on the CPU.
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
    reference.window_bounds; M: (h, h) or None (the identity); w: (h/2,), or None where q and k come
    rotated already (no RoPE here)."""
    dtype, compute = q.dtype, reference._compute_dtype(q.dtype)
    h = q.shape[3]
    q, k = q.to(compute), k.to(compute)
    P = None
    if M is not None and rotation == "m_then_rope":
        M = M.to(compute)
        q, k = q @ M, k @ M
    elif M is not None:
        M = M.to(compute)
        P = M @ M.T / math.sqrt(h)
    scale = 1.0 / math.sqrt(h) if P is None else 1.0  # P carries it in the "rope_then_m" order
    if w is not None:
        # q' k'^T (and q' P k'^T, P permuted alike) is the same in every layout q' and k' share: the pairs
        # stay interleaved, where the rotation is one complex product, and q takes the 1 / sqrt(h) with it
        w, s = w.to(compute), reference._as_compute(s, compute)
        q = rotate_pairs(q, _angles(w, s, q_offset, q.shape[2]), scale)
        k = rotate_pairs(k, _angles(w, s, k_offset, k.shape[2]))
        if P is not None and layout == "half_split":
            order = _half_split_order(h, P.device)
            P = P[order][:, order]
        scale = 1.0  # taken by the rotation
    q_folded = q @ P if P is not None else (q * scale if scale != 1.0 else q)
    bias = bias.to(compute) if bias is not None else None
    v = v.to(compute)
    if key_padding_mask is not None:  # a padded key's k and v never reach a product (0 * NaN is NaN)
        gone = key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(gone, 0.0), v.masked_fill(gone, 0.0)
    shift = q_offset - k_offset
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q_folded, k, v, bias)):
        out = _BlockedAttention.apply(q_folded, k, v.contiguous(), bias, key_padding_mask, left, right, shift)
    else:  # any strides: a decoding cache's values are a head view of the projection
        fused = fused_attention(q_folded, k, v, bias, key_padding_mask, left, right, shift)
        out = fused[0] if fused is not None else _BlockedAttention.apply(q_folded, k, v.contiguous(), bias,
                                                                         key_padding_mask, left, right, shift)
    return out.to(dtype)


def rotate_pairs(u: Tensor, phi: Tensor, scale: float = 1.0) -> Tensor:
    """u (..., T, h) with each pair (u[2m], u[2m+1]) rotated by phi (T, h/2) and multiplied by `scale`,
    written interleaved: reference.apply_rope's "interleaved" layout as one complex product, where its real
    formula takes six passes. Traced by torch.compile, the real formula (which it fuses into one loop)."""
    if torch.compiler.is_compiling():
        rotated = reference.apply_rope(u, phi, "interleaved")
        return rotated * scale if scale != 1.0 else rotated
    turn = torch.polar(torch.full_like(phi, scale), phi)
    pairs = u.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # a complex view needs each pair adjacent and aligned
    return torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2)


def _half_split_order(h: int, device) -> Tensor:
    """(h,): the "half_split" index of each "interleaved" slot (2m -> m, 2m + 1 -> h/2 + m)."""
    return torch.arange(h, device=device).view(2, h // 2).T.flatten()


def _angles(w: Tensor, s, offset: int, T: int) -> Tensor:
    """(T, h/2): the rotary angles of positions offset .. offset + T - 1."""
    return reference.rope_angles(w, s, torch.arange(offset, offset + T, device=w.device))


# --------------------------------------------------------------------------------------------------
# Without gradients: torch's fused attention, the bias and masks as one additive mask
# --------------------------------------------------------------------------------------------------


def band_cuts(Tq: int, Tk: int, left: int, right: int, shift: int) -> bool:
    """Whether some query misses some key by the band alone (query i sees key j iff
    i + shift - left <= j <= i + shift + right)."""
    return Tq > 0 and Tk > 0 and (Tq - 1 + shift - left > 0 or shift + right < Tk - 1)


def _sees_every_key(Tq: int, Tk: int, key_padding_mask, left: int, right: int, shift: int) -> bool:
    """Whether every query sees every key (no band cut, no padding, some key): _unmasked's case, in the
    forward and in the backward alike."""
    return Tk > 0 and key_padding_mask is None and not band_cuts(Tq, Tk, left, right, shift)


def fused_attention(q, k, v, bias, key_padding_mask, left: int, right: int, shift: int
                    ) -> tuple[Tensor, Tensor] | None:
    """(softmax(q k^T + bias + masks) v, the logsumexp of each query's logits) by torch's fused CPU
    attention (scaled_dot_product_attention's kernel, called for its logsumexp too), no autograd graph.

    q: (B, H, Tq, h) already scaled; k, v: (B, H, Tk, h), padded keys zeroed; bias: (2n-1, H) or None.
    Returns out (B, H, Tq, h) and lse (B, H, Tq); a query with no key gives zeros (and any finite lse).
    An additive mask puts -inf on a masked key, and -inf + NaN is NaN: where the band masks keys and k
    or v holds a non-finite value this returns None, for the blocked path (which leaves masked keys out
    exactly) to compute.
    """
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    cuts = band_cuts(Tq, Tk, left, right, shift)
    if cuts and not (_finite(k) and _finite(v)):
        return None
    if _sees_every_key(Tq, Tk, key_padding_mask, left, right, shift):
        return _unmasked(q, k, v, bias, shift)
    out, lse = q.new_zeros(B, H, Tq, h), q.new_zeros(B, H, Tq)
    for a, b, lo, hi in blocks(Tq, Tk, left, right, shift, B * H):
        if hi > lo:
            kpm = key_padding_mask[:, lo:hi] if key_padding_mask is not None else None
            mask, has_key = _block_mask(bias, kpm, H, b - a, hi - lo, a + shift - lo, left, right, q)
            block, lse[:, :, a:b] = _SDPA(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask, scale=1.0)
            out[:, :, a:b] = block.masked_fill_(~has_key, 0.0) if has_key is not None else block
    return out, lse


# What scaled_dot_product_attention runs on the CPU, called directly for the logsumexp it also returns
# (the blocked backward recomputes probabilities from it).
_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _unmasked(q, k, v, bias, shift: int) -> tuple[Tensor, Tensor]:
    """fused_attention where every query sees every key: the bias alone is the mask."""
    k, v, mask, _ = _unmasked_operands(k, v, bias, q.shape[2], shift)
    return _SDPA(q, k, v, attn_mask=mask, scale=1.0)


def _unmasked_operands(k, v, bias, Tq: int, shift: int) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """(k, v, additive mask or None, whether k and v come reversed) for the fused kernel where every
    query sees every key. The bias's (Tq, Tk) block is Toeplitz; with the keys taken in reverse order
    entry (i, j') is a function of i + j', a view of one (H, Tq + Tk - 1) row with strides (1, 1), which
    the kernel reads in place instead of Tq x Tk stored values. The order of the keys changes neither
    the output nor the logsumexp; the gradients of reversed keys and values come reversed."""
    if bias is None:
        return k, v, None, False
    H, Tk = bias.shape[1], k.shape[2]
    if Tq == 1:  # a decoding step: one row of bias, where reversing the cached keys would copy them all
        return k, v, relative_bias_block(bias, 1, Tk, shift)[None], False
    n = (bias.shape[0] + 1) // 2
    # key j' = Tk - 1 - j of the reversed keys: i - j = i + j' - (Tk - 1)
    offsets = shift - (Tk - 1) + torch.arange(Tq + Tk - 1, device=k.device)
    row = bias.T[:, offsets.clamp(-(n - 1), n - 1) + (n - 1)].contiguous()
    L = row.shape[1]
    mask = row.as_strided((1, H, Tq, Tk), (H * L, L, 1, 1))
    return k.flip(2), v.flip(2), mask, True


def _block_mask(bias, key_padding_mask, H: int, C: int, K: int, d0: int, left: int, right: int, like: Tensor
                ) -> tuple[Tensor, Tensor | None]:
    """(additive mask (B or 1, H, C, K), has_key (B or 1, 1, C, 1) bool or None where every query keeps a
    key) of one block whose top-left entry has i - j = d0. A query with no key gets a 0 row (a row of
    -inf would be NaN in the softmax) and has_key False, for the caller to zero its output."""
    mask = relative_bias_block(bias, C, K, d0)[None] if bias is not None else like.new_zeros(1, H, C, K)
    keep = _keep(C, K, d0, left, right, like.device)
    if key_padding_mask is not None:
        pad_keep = ~key_padding_mask[:, None, None, :]
        keep = pad_keep if keep is None else keep & pad_keep
    if keep is None:
        return mask, None
    has_key = keep.any(-1, keepdim=True)
    mask = mask.masked_fill(~keep, -math.inf).masked_fill_(~has_key, 0.0)
    return mask, has_key


def _keep(C: int, K: int, d0: int, left: int, right: int, device) -> Tensor | None:
    """(C, K) bool: the band of a block whose top-left entry has i - j = d0; None where it keeps all."""
    cuts_left, cuts_right = d0 + C - 1 > left, d0 - (K - 1) < -right
    if not (cuts_left or cuts_right):
        return None
    rel = d0 + torch.arange(C, device=device)[:, None] - torch.arange(K, device=device)[None, :]
    return (rel <= left if cuts_left else True) & (rel >= -right if cuts_right else True)


# --------------------------------------------------------------------------------------------------
# With gradients: blocks of queries, exact gradients of every input and of the bias table
# --------------------------------------------------------------------------------------------------


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


def _probabilities(q, k, bias, key_padding_mask, left, right, d0, lse=None) -> tuple[Tensor, Tensor | None]:
    """softmax of one block's logits, and which keys each query keeps; d0 = i - j of its top-left
    entry; rows with no key give 0.

    q: (B*H, C, h); k: (B*H, K, h); bias: (2n-1, H) or None; key_padding_mask: (B, K) or None;
    lse: (B*H, C, 1), each query's logsumexp over all its keys, or None to compute the softmax here.
    Returns probs (B*H, C, K) and keep, bool broadcastable to it, or None where every key is kept.
    """
    C, K = q.shape[1], k.shape[1]
    if bias is None:
        logits = torch.bmm(q, k.transpose(1, 2))
    else:  # the bias written first, the product accumulated onto it: one pass less than adding after
        batch = q.shape[0] // bias.shape[1]
        block = relative_bias_block(bias, C, K, d0)  # a new tensor (flip copies), which one batch reuses
        logits = (block if batch == 1 else block.repeat(batch, 1, 1)).baddbmm_(q, k.transpose(1, 2))
    keep = _keep(C, K, d0, left, right, q.device)
    if key_padding_mask is not None:
        B = key_padding_mask.shape[0]
        padding = key_padding_mask[:, None, None, :].expand(B, q.shape[0] // B, 1, K).reshape(-1, 1, K)
        keep = ~padding if keep is None else keep & ~padding
    if keep is not None:
        logits.masked_fill_(~keep, -math.inf)
    if lse is not None:  # exp(-inf) = 0 at masked keys, and over the whole row of a query with none
        return logits.sub_(lse).exp_(), keep
    if keep is None:
        return torch.softmax(logits, dim=-1), None
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
    # Only the strip between needs its diagonals (offset e lies on column - row = d0 - e).
    C, K = dlogits.shape[-2:]
    p0 = min(max(d0 - n + 2, 0), K)
    f0 = min(max(C + d0 + n - 2, 0), K)
    dbias = diagonal_sums(dlogits[..., p0:f0].sum(0), d0 - p0, n)
    dbias[0] += dlogits[..., f0:].sum((0, 2, 3))
    dbias[-1] += dlogits[..., :p0].sum((0, 2, 3))
    return dbias


def diagonal_sums(strip: Tensor, d0: int, n: int) -> Tensor:
    """(2n-1, H): strip (H, C, K) summed over each clamped offset i - j = d0 + row - column.

    Skewed, row r moved right by C - r, every diagonal column - row = o becomes column o + C: one sum
    over the rows gives all the diagonals' sums, where summing them one at a time takes 2n-3 passes.
    """
    H, C, K = strip.shape
    pad = torch.nn.functional.pad
    skewed = pad(pad(strip, (C, 0)).flatten(1), (0, C)).view(H, C, K + C + 1)
    offsets = d0 + C - torch.arange(K + C + 1, device=strip.device)  # i - j of each skewed column
    rows = offsets.clamp(-(n - 1), n - 1) + (n - 1)
    return strip.new_zeros(2 * n - 1, H).index_add_(0, rows, skewed.sum(1).T)


# From this many queries on, the backward where every query sees every key is the fused kernel's; below, the
# blocked one measured faster on the CPU (the decoder's 32 queries against 1500 encoder frames: 1.9x).
FUSED_BACKWARD_ROWS = 256
# The fused kernel's backward, called with the logsumexp of _SDPA's forward.
_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# Query groups whose per-key sums of the score gradients the fused backward returns for dbias.
BIAS_GROUPS = 8
MIN_GROUP_ROWS = 64  # fewer rows per group, and the per-group work costs more than the narrower strips save


def _unmasked_backward(dout, q, k, v, bias, out, lse, shift: int, want_dbias: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dbias or None) of _unmasked's attention by torch's fused backward.

    dbias sums the score gradients dS = P (dP - D) by offset; the fused kernel keeps dS to itself but
    returns dk = dS^T q. With q widened by G one-hot columns (query i has a 1 in column i // C) and k, v,
    out and dout by G zero columns, the logits are unchanged and dk's extra columns are the sums of dS
    over each group of C queries, per key (see _near_diagonal_bias_gradient for the rest).
    """
    B, H, Tq, h = q.shape
    k_, v_, mask, reversed_keys = _unmasked_operands(k, v, bias, Tq, shift)
    if not want_dbias:
        dq, dk, dv = _SDPA_BACKWARD(dout, q, k_, v_, out, lse, 0.0, False, attn_mask=mask, scale=1.0)
        return dq, (dk.flip(2) if reversed_keys else dk), (dv.flip(2) if reversed_keys else dv), None
    C = -(-Tq // min(BIAS_GROUPS, -(-Tq // MIN_GROUP_ROWS)))
    G = -(-Tq // C)
    one_hot = torch.nn.functional.one_hot(torch.arange(Tq, device=q.device) // C, G).to(q.dtype)
    q_ = torch.cat([q, one_hot.expand(B, H, Tq, G)], dim=-1)
    dout_, k_, v_, out_ = (torch.nn.functional.pad(t, (0, G)) for t in (dout, k_, v_, out))
    dq, dk, dv = _SDPA_BACKWARD(dout_, q_, k_, v_, out_, lse, 0.0, False, attn_mask=mask, scale=1.0)
    if reversed_keys:
        dk, dv = dk.flip(2), dv.flip(2)
    dbias = _near_diagonal_bias_gradient(dout, q, k, v, bias, out, lse, dk[..., h:].sum(0), C, shift)
    return dq[..., :h], dk[..., :h], dv[..., :h], dbias


def _near_diagonal_bias_gradient(dout, q, k, v, bias, out, lse, group_sums: Tensor, C: int, shift: int) -> Tensor:
    """(2n-1, H): dbias from group_sums (H, Tk, G), the score gradients summed over each group of C
    queries per key, and the score gradients recomputed near each group's diagonal.

    A key past the clamp (i - j >= n - 1) for every query of its group adds its group sum to the last row,
    a key beyond it on the other side to the first. The W = C + 2n - 4 keys from g C + shift - (n - 2) on
    are near group g's diagonal; every group's strip has the same offsets (its top-left entry has
    i - j = n - 2), so the strips' score gradients are summed over batch and groups, and by offset once.
    """
    B, H, Tq, h = q.shape
    Tk, G = k.shape[2], group_sums.shape[-1]
    n = (bias.shape[0] + 1) // 2
    if n == 1:  # one row: every pair's gradient, whichever side
        return group_sums.sum((1, 2))[None]
    W = C + 2 * n - 4
    first = shift - (n - 2)  # group 0's first key; group g's is first + g C
    q3, dout3, lse3 = q.reshape(B * H, Tq, h), dout.reshape(B * H, Tq, h), lse.reshape(B * H, Tq, 1)
    minus_delta = -(dout3 * out.reshape(B * H, Tq, h)).sum(-1, keepdim=True)
    k_rows, v_rows = (_strip_rows(t.reshape(B * H, Tk, h), first, (G - 1) * C + W) for t in (k, v))
    strip_bias = relative_bias_block(bias, C, W, n - 2).repeat(B, 1, 1)  # (B*H, C, W), alike in every strip
    dlogits = q.new_zeros(B * H, C, W)
    for g in range(G):
        a, b = g * C, min(g * C + C, Tq)
        keys = slice(g * C, g * C + W)
        # the probabilities from the forward's logsumexp: exp(bias - lse + q k^T), one pass on top of the product
        probs = torch.baddbmm(strip_bias[:, : b - a] - lse3[:, a:b], q3[:, a:b], k_rows[:, keys].transpose(1, 2))
        probs.exp_()
        probs[..., : max(0, -(first + g * C))] = 0.0  # keys before 0 and from Tk on: zero rows of k_rows
        probs[..., max(0, Tk - first - g * C):] = 0.0
        dp = torch.baddbmm(minus_delta[:, a:b], dout3[:, a:b], v_rows[:, keys].transpose(1, 2))
        dlogits[:, : b - a].addcmul_(dp, probs)
    dbias = diagonal_sums(dlogits.view(B, H, C, W).sum(0), n - 2, n)
    keys = torch.arange(Tk, device=q.device)[:, None]
    starts = first + torch.arange(G, device=q.device)[None, :] * C
    dbias[0] += (group_sums * (keys >= starts + W)).sum((1, 2))
    dbias[-1] += (group_sums * (keys < starts)).sum((1, 2))
    return dbias


def _strip_rows(t: Tensor, first: int, length: int) -> Tensor:
    """(N, length, h): row p is t's row first + p, zeros where that is outside t (N, T, h)."""
    N, T, h = t.shape
    rows = t.new_zeros(N, length, h)
    lo, hi = max(0, first), min(T, first + length)
    if hi > lo:
        rows[:, lo - first: hi - first] = t[:, lo:hi]
    return rows


def _finite(t: Tensor) -> bool:
    """Whether t holds only finite values. A traced graph (torch.compile) cannot branch on data: there
    it is taken as true, so a non-finite value past the band reaches the queries of its block, as on the
    Triton kernels (padded keys are zeroed before, on every path)."""
    return torch.compiler.is_compiling() or bool(torch.isfinite(t).all())


class _BlockedAttention(torch.autograd.Function):
    """softmax(q k^T + bias + masks) v over (B, H, T, h) inputs, one query block at a time."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, left, right, shift):
        ctx.masks = (left, right, shift)
        fused = fused_attention(q, k, v, bias, key_padding_mask, left, right, shift)
        if fused is not None:  # the backward recomputes the probabilities from the logsumexp
            out, lse = fused
            ctx.save_for_backward(q, k, v, bias, key_padding_mask, out, lse)
            return out
        B, H, Tq, h = q.shape
        q3, k3, v3 = (t.reshape(B * H, t.shape[2], h) for t in (q, k, v))
        out = q3.new_zeros(B * H, Tq, h)
        # else the band's masked keys need reference.weighted_values (padded keys' values are zeros)
        values_finite = not band_cuts(Tq, k.shape[2], left, right, shift) or _finite(v)
        for a, b, lo, hi in blocks(Tq, k.shape[2], left, right, shift, B * H):
            if hi > lo:
                kpm = key_padding_mask[:, lo:hi] if key_padding_mask is not None else None
                probs, keep = _probabilities(q3[:, a:b], k3[:, lo:hi], bias, kpm, left, right, a + shift - lo)
                if values_finite or keep is None:
                    torch.bmm(probs, v3[:, lo:hi], out=out[:, a:b])
                else:
                    out[:, a:b] = reference.weighted_values(probs, v3[:, lo:hi], keep)
        out = out.view(B, H, Tq, h)
        ctx.save_for_backward(q, k, v, bias, key_padding_mask, out, None)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, key_padding_mask, out, lse = ctx.saved_tensors
        left, right, shift = ctx.masks
        want_dbias = bias is not None and ctx.needs_input_grad[3]
        B, H, Tq, h = q.shape
        Tk = k.shape[2]
        fused = Tq >= FUSED_BACKWARD_ROWS and _sees_every_key(Tq, Tk, key_padding_mask, left, right, shift)
        if lse is not None and fused:
            dq, dk, dv, dbias = _unmasked_backward(dout, q, k, v, bias, out, lse, shift, want_dbias)
            return dq, dk, dv, dbias, None, None, None, None
        q3, k3, v3 = (t.reshape(B * H, t.shape[2], h) for t in (q, k, v))
        do3 = dout.reshape(B * H, Tq, h)
        lse3 = lse.reshape(B * H, Tq, 1) if lse is not None else None
        dq, dk, dv = torch.zeros_like(q3), torch.zeros_like(k3), torch.zeros_like(v3)
        dbias = torch.zeros_like(bias) if want_dbias else None
        minus_delta = -(do3 * out.reshape(B * H, Tq, h)).sum(-1, keepdim=True)  # -rowsum(P * dP)
        # dP at a masked key is 0 * (dO . v); a non-finite v there must not make it NaN
        values_finite = not band_cuts(Tq, Tk, left, right, shift) or _finite(v)
        for a, b, lo, hi in blocks(Tq, Tk, left, right, shift, B * H):
            if hi == lo:
                continue
            kpm = key_padding_mask[:, lo:hi] if key_padding_mask is not None else None
            probs, keep = _probabilities(q3[:, a:b], k3[:, lo:hi], bias, kpm, left, right, a + shift - lo,
                                         lse3[:, a:b] if lse3 is not None else None)
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
