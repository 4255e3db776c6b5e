"""echo_attention on the CPU: torch's fused attention (scaled_dot_product_attention's kernels) for the
forward, and the C++ backward of the package's extension (docs/model.md, Kernels).

The rotations are folded as in the Triton kernel: in the "rope_then_m" order logits = RoPE(q) P RoPE(k)^T
with P = M M^T / sqrt(h), so q is multiplied by P once and k needs only RoPE; in the "m_then_rope" order
q and k are multiplied by M first (not at all when M is None) and q is only scaled by 1 / sqrt(h). Keys
are rotated once per call. The forward (`fused_attention`) turns the clamped bias, the band and the key
padding into one additive mask for the fused kernel, which also returns each query's logsumexp. The
backward (`_BlockedAttention`) is echo_kernels::biased_attention_backward (csrc/biased_attention_cpu.cpp):
it recomputes the probabilities from the logsumexp block by block and sums the bias gradient from the
score gradients while they are in cache. Where the forward kept no logsumexp, or the extension is
missing (said once), the backward takes queries a block at a time in PyTorch and sums each block's
bias gradient along its diagonals: autograd of a gathered (H, Tq, Tk) bias scatters every logit's
gradient into a (2n-1)-row table one index at a time, which is what makes the reference slow on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _extension, reference
from ..backend import warn_once

# Elements of one block's (B, H, C, K) logits: small enough to stay in cache-friendly tens of MB.
BLOCK_ELEMENTS = 1 << 21


def attention(q, k, v, M, w, s, bias, key_padding_mask, left: int, right: int, q_offset: int, k_offset: int,
              layout: str, rotation: str = "m_then_rope", keys_rotated: bool = False) -> Tensor:
    """echo_attention's maths (see echo_kernels.attention). left/right: the band of
    reference.window_bounds; M: (h, h) or None (the identity); w: (h/2,), or None where q and k come
    rotated already (no RoPE here); keys_rotated: k is k' already."""
    dtype, compute = q.dtype, reference._compute_dtype(q.dtype)
    h = q.shape[3]
    q, k = q.to(compute), k.to(compute)
    P = None
    if keys_rotated:  # q' in k's layout, then as if both came rotated
        phi = None
        if w is not None:
            phi = _angles(w.to(compute), reference._as_compute(s, compute), q_offset, q.shape[2])
        M = M.to(compute) if M is not None else None
        q, w, M = reference.rotate_for_attention(q, M, phi, layout, rotation), None, None
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
    if (pairs.stride(-1) != 1 or pairs.storage_offset() % 2
            or any(stride % 2 for stride in pairs.stride()[:-1])):
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
            block, lse[:, :, a:b] = _SDPA(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask,
                                          scale=1.0)
            out[:, :, a:b] = block.masked_fill_(~has_key, 0.0) if has_key is not None else block
    return out, lse


# What scaled_dot_product_attention runs on the CPU, called directly for the logsumexp it also returns
# (the blocked backward recomputes probabilities from it).
_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _unmasked(q, k, v, bias, shift: int) -> tuple[Tensor, Tensor]:
    """fused_attention where every query sees every key: the bias alone is the mask.

    The bias's (Tq, Tk) block is Toeplitz; with the keys taken in reverse order entry (i, j') is a function
    of i + j', a view of one (H, Tq + Tk - 1) row with strides (1, 1), which the kernel reads in place
    instead of Tq x Tk stored values. The order of the keys changes neither the output nor the logsumexp.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    if bias is None:
        return _SDPA(q, k, v, scale=1.0)
    if Tq == 1:  # a decoding step: one row of bias, where reversing the cached keys would copy them all
        return _SDPA(q, k, v, attn_mask=relative_bias_block(bias, 1, Tk, shift)[None], scale=1.0)
    H, n = bias.shape[1], (bias.shape[0] + 1) // 2
    # key j' = Tk - 1 - j of the reversed keys: i - j = i + j' - (Tk - 1)
    offsets = shift - (Tk - 1) + torch.arange(Tq + Tk - 1, device=k.device)
    row = bias.T[:, offsets.clamp(-(n - 1), n - 1) + (n - 1)].contiguous()
    L = row.shape[1]
    mask = row.as_strided((1, H, Tq, Tk), (H * L, L, 1, 1))
    return _SDPA(q, k.flip(2), v.flip(2), attn_mask=mask, scale=1.0)


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


# Whether the extension has the C++ backward (read once: torch.compile traces the choice).
COMPILED_BACKWARD = _extension.has_kernel("biased_attention_backward", "CPU")


def _compiled_backward(dout, q, k, v, bias, key_padding_mask, out, lse, left: int, right: int, shift: int
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias: (0, H) without a bias) by echo_kernels::biased_attention_backward."""
    return torch.ops.echo_kernels.biased_attention_backward(dout, q, k, v, out, lse, bias, key_padding_mask,
                                                            left, right, shift)


if COMPILED_BACKWARD:
    @torch.library.register_fake("echo_kernels::biased_attention_backward")
    def _(dout, q, k, v, out, lse, bias, key_padding_mask, left, right, shift):
        dbias = q.new_empty(bias.shape if bias is not None else (0, q.shape[1]))
        # contiguous, as the kernel's
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _say_missing_backward() -> None:
    warn_once("biased_attention_backward", "echo_kernels: the C++ extension has no biased_attention_backward "
              f"({_extension.LOAD_ERROR or 'built without it'}); echo_attention's CPU backward "
              "runs in PyTorch, slower", stacklevel=3)


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
        if lse is not None and COMPILED_BACKWARD:
            dq, dk, dv, dbias = _compiled_backward(dout, q, k, v, bias, key_padding_mask, out, lse, left,
                                                   right, shift)
            return dq, dk, dv, (dbias if want_dbias else None), None, None, None, None
        if lse is not None:
            _say_missing_backward()
        B, H, Tq, h = q.shape
        Tk = k.shape[2]
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
