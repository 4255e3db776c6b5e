"""Fused Echo attention, forward: rotary, clamped relative bias, band masks, online softmax.

    out[b, t, i] = softmax_j(q'_i . k'_j / sqrt(h) + bias[clamp(i - j) + n - 1, t] + masks) @ v

with q' and k' as the launcher is given them (docs/model.md, Attention):

    M = None        q' = RoPE_s(q),      k' = RoPE_s(k)      the model's default: M folded upstream
    M given         q' = RoPE_s(q) @ M,  k' = RoPE_s(k) @ M  the "rope_then_m" order

("m_then_rope" with an M, RoPE(q M) . RoPE(k M), is the M = None kernel on q M and k M:
echo_kernels.attention multiplies them first.)

The kernel never forms q' and k'. Since q' k'^T = RoPE(q) (M M^T) RoPE(k)^T, the launcher folds
P = M M^T / sqrt(h) once per call, and the keys only need RoPE(k). One memory-bound pass
(attention_operands.rotated_rows) writes each once per call as contiguous [a | b] rows in the dot type:
RoPE(k), and q'' = RoPE(q) @ P (inner dim h), or RoPE(q) / sqrt(h) without M. The attention kernel
then loads its query tile and its key tiles as plain contiguous tiles, which the compiler pipelines as
asynchronous copies, and spends no sine or cosine at all; nor does its code hold a rotation (a query
tile's sines and cosines, per element, would add to the code a program runs before its first key tile;
small code is the aim: docs/model.md, Kernels). The only products left are attention's own, q'' RoPE(k)^T
and p v, each one product of whole rows. The gradients are still those of the formula above (the
backward goes through P back to M).

RoPE is done on even/odd columns loaded as two (BLOCK, h/2) tiles, so registers are never
de-interleaved: a = x_even cos - x_odd sin, b = x_even sin + x_odd cos. The layout (half_split or
interleaved) only decides where a and b sit in RoPE(x), so it is folded into P by permuting its rows
and columns: with P~ = P[perm][:, perm], perm = (positions of a) ++ (positions of b),

    q''_A = a_q @ P~_AA + b_q @ P~_BA,   q''_B = a_q @ P~_AB + b_q @ P~_BB
    logits = q''_A @ a_k^T + q''_B @ b_k^T

and the kernel is the same for both layouts (without P the layout does not matter at all: a dot
product does not depend on the order in which its terms are written).

Windows are two ints, left and right (key j kept iff i - left <= j <= i + right, absolute
positions); unbounded sides are a large sentinel, causal is right = min(right, 0). Each query tile
loops only over the key tiles the band reaches, so local attention costs O(T w).

Masks are paid only where they can bite, as Triton's fused-attention tutorial stages its loops, in three
loops, so that the kernel's code stays small (each loop is a copy of its body, with the software
pipeliner's prologue and epilogue). Key tiles wholly inside the band of every query of the tile, whole
(before Tk) and before the batch's first padded key run the two loops with no mask arithmetic and no
mask load: first those on both far sides of the diagonal, whose bias is one value per side (PAST, then
FUTURE), folded into the exponent; then those near the diagonal (NEAR), where the clamp lets it vary,
each reading a tile of it whole from a table written once per call (attention_operands.near_bias_tiles;
decoding's short query tiles gather it). The band's two edges, the ragged last tile and the tiles from
the first padded key on take the masked loop, one loop for all of them, whose bias is always a tile of
that table with the band's mask in it (-inf outside the band: a NEAR tile's, one of a tile crossing an
edge of the band, or one of the two sides' constant tiles), so that it compares no i - j; with no table
(decoding, or no bias) a gather and the band by comparison.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import int32_offsets
from . import ATTENTION_HEAD_WIDTHS, launch_options
from .attention_common import (
    LOG2E,
    NEAR,
    PAD_TILES_ON,
    _band_bias,
    _bias_arg,
    _bias_tile,
    _biased_exp,
    _edge_cuts,
    _head_bias_tiles,
    _in_band,
    _key_ok,
    _near_bias,
    _pad_arg,
    _plus_bias,
    _query_tile_stages,
    _skip,
    _tile_and_head,
    _tile_rows,
    exact_rows,
    p_arg,
    precision,
    tile_arch,
    with_override,
)
from .attention_operands import aot_specs_of, attention_operands, near_bias_args
from .spec import DTYPE_NAMES, KernelSpec, dtype_named, precision_of, signature_of

# --------------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, lo, hi, skip_at, skip, q, qrel, KK, V, Bias, stride_br, head_off, n_rel, Tiles, tile_of,
    n_near, left_cut, left_of, right_cut, right_of, d1, d2, Pad, pad_off, stride_pt, stride_kt, stride_kd,
    stride_vt, stride_vd, Tk, left, right, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PAD: tl.constexpr, PAD_TILES: tl.constexpr, BIAS_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles that masks can bite, in one loop: starts lo, lo + BLOCK_N, ... < hi,
    those from skip_at moved on by skip (the band's two edges, one after the other).
    KK: this head's keys as the queries' q'' pair with them (_attn_fwd_kernel), rows of stride stride_kt, in
    the dot type. The bias: with BIAS_TILES a tile of
    this head's table (near_bias_tiles) with the band's mask in it, by _band_bias (a NEAR tile's, those
    starting in [d1, d2), at offset tile_of - start; a tile of an edge the tile crosses; else its side's
    constant tile), so that only the keys' own mask is left to compute; else a gather, and the band by
    comparison."""
    DT = q.dtype
    dims = tl.arange(0, HEAD)
    for tile_start in range(lo, hi, BLOCK_N):
        start = _skip(tile_start, skip_at, skip)
        cols = start + tl.arange(0, BLOCK_N)
        # a padded key's k only reaches its own logits, which the mask replaces
        k = tl.load(KK + cols[:, None] * stride_kt + dims[None, :] * stride_kd, mask=cols[:, None] < Tk,
                    other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        key_ok = _key_ok(cols, Tk, Pad, pad_off, stride_pt, HAS_PAD, PAD_TILES)
        if HAS_BIAS and BIAS_TILES:
            # the band's -inf comes with the bias: comparing i - j per pair cost the loop about a fifth of
            # its instructions (under Triton 3.6 more, the results packed into bits while the product ran).
            # The right edge tested on the last real key (Tk): _edge_cuts needs no more, but so the loops
            # compile to fewer instructions (Triton 3.6 and 3.8), though the dk/dv pass's to more
            logits = _plus_bias(logits, _band_bias(Tiles, n_near, tile_of, start, d1, d2, left_cut, left_of,
                                                   right_cut, right_of, Tk, q.shape[0], BLOCK_N))
            keep = key_ok[None, :]
        else:
            # i - j as a row's value less a column's: with k_off inside the column's, the compiler kept that
            # sum's loop-invariant part live through the loop, one register per column a thread holds
            rel = qrel[:, None] - cols[None, :]
            keep = _in_band(rel, left, right) & key_ok[None, :]
            if HAS_BIAS:
                logits = _plus_bias(logits, _bias_tile(rel, Bias, stride_br, head_off, n_rel, NEAR, DT))
        logits = tl.where(keep, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        # Rows that have seen no key yet keep m = -inf; shift them by 0 so that exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        p = tl.exp2(logits * LOG2E - (m_safe * LOG2E)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # a padded key's v meets p = 0 in the product, and 0 * NaN is NaN: zeroed after the load, whose
        # mask then does not wait on the padding's (a dependent mask costs the pipelined loop registers);
        # in its own dtype, not through fp32 (a conversion each way per element)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd, mask=cols[:, None] < Tk,
                    other=0.0)
        if HAS_PAD:
            v = tl.where(key_ok[:, None], v, 0.0)
        acc = tl.dot(p.to(DT), v.to(DT), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_inner_tiles(
    acc, m_i, l_i, lo, hi, skip_at, skip, bias_before, bias_after, q, qrel, KK, V, Bias, stride_br, head_off,
    n_rel, Tiles, tile_of, stride_kt, stride_kd, stride_vt, stride_vd,
    HEAD: tl.constexpr, BLOCK_N: tl.constexpr, NEAR_TILES: tl.constexpr,
    BIAS_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """_fwd_tiles for key tiles wholly inside the band, before Tk and before any padded key: no mask at
    all. Starts lo, lo + BLOCK_N, ... < hi, those from skip_at moved on by skip. The bias: NEAR_TILES,
    each tile's from the table (_near_bias), or with no table (decoding) gathered; else one value per
    tile, bias_before before skip_at and bias_after from it (the PAST tiles before the diagonal and the FUTURE
    ones after it in one loop; 0 without a table), folded into the exponent."""
    DT = q.dtype
    dims = tl.arange(0, HEAD)
    for tile_start in range(lo, hi, BLOCK_N):
        bias_c = tl.where(tile_start >= skip_at, bias_after, bias_before)
        start = _skip(tile_start, skip_at, skip)
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(KK + cols[:, None] * stride_kt + dims[None, :] * stride_kd)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        # every row sees every key of the tile, so the maximum is finite: no guard against -inf
        if NEAR_TILES:
            if BIAS_TILES:
                logits = _plus_bias(logits, _near_bias(Tiles, tile_of, start, q.shape[0], BLOCK_N))
            else:
                logits = _plus_bias(logits, _bias_tile(qrel[:, None] - cols[None, :], Bias, stride_br,
                                                       head_off, n_rel, NEAR, DT))
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            p = tl.exp2(logits * LOG2E - (m_new * LOG2E)[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(logits, 1) + bias_c)
            p = _biased_exp(logits, bias_c, m_new[:, None])
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd).to(DT)
        acc = tl.dot(p.to(DT), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    QQ, KK, V, Bias, Tiles, Pad, PadStart, Out, Lse,
    stride_kb, stride_kh, stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, n_near, left_edge0, right_edge0, left, right, q_off,
    k_off, n_tiles, HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    PAD_TILES: tl.constexpr, BIAS_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK_M, HEAD) query tile of one (batch, head): Out tile and its log-sum-exp.

    QQ: q'' from rotated_rows, (B, H, Tq, h) contiguous rows [q''_A | q''_B] in the dot type;
    KK: (B, H, Tk, h) in the dot type, any strides: RoPE(k) from rotated_rows, contiguous rows [a | b], or
    the keys as given rotated (keys_rotated), whose order q'' then takes;
    Tiles: with BIAS_TILES, (H, n_bias_tiles, BLOCK_M, BLOCK_N) in the dot type, near_bias_tiles' table with
    the band's mask in it: the NEAR tile t < n_near at i - j = first_bias_tile + t min(BLOCK_M, BLOCK_N) in
    its top-left entry, the two sides' constant tiles, then those of the band's edges, at
    left_edge0 + t min(...) and right_edge0 + t min(...);
    PadStart: (B,) int32, each batch's first padded key (Tk if none), read when HAS_PAD."""
    pid_m, pid_bh = _tile_and_head(n_tiles)
    b = pid_bh // H
    hd = pid_bh % H
    KK += b * stride_kb + hd * stride_kh
    V += b * stride_vb + hd * stride_vh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qrel = q_off - k_off + rows  # each row's i - j against the first key (position k_off)
    # a plain load: rotated_rows has rotated the queries (and multiplied them by P~), and since q'' and
    # RoPE(k) both hold their rows as [A | B], q''_A a_k + q''_B b_k is one product of whole rows
    q = tl.load(QQ + pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :],
                mask=rows[:, None] < Tq, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], tl.float32)
    q_first = q_off + pid_m * BLOCK_M
    # the NEAR tiles start in [d1, d2): PAST ones before, FUTURE ones after; no mask can bite the tiles in
    # [inner, inner_end), those before and after take the masked loop
    lo, hi, d1, d2, inner, inner_end, near_lo, near_hi, bias_past, bias_future = _query_tile_stages(
        pid_m * BLOCK_M, q_off, k_off, left, right, Tk, PadStart + b, Bias, stride_br, hd * stride_bh, n_rel,
        QQ.dtype.element_ty, HAS_PAD, HAS_BIAS, BLOCK_M, BLOCK_N)
    # the NEAR tiles' offsets i - j at their top-left entries are q_first - k_off - start, which finds a
    # tile's place in the table (_near_bias)
    tiles = _head_bias_tiles(Tiles, hd, n_bias_tiles, BLOCK_M, BLOCK_N)
    tile_of = q_first - k_off - first_bias_tile
    # a key tile from `start` crosses the band's left edge where its first key is more than `left` before
    # the tile's last query, the right edge where its last key is more than `right` after the first query
    left_cut, right_cut = _edge_cuts(q_first, q_off + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1, k_off,
                                     Tk, left, right)
    # Three loops in all, so that the kernel's code stays small: the unmasked tiles of both far sides
    # (their bias one value per side), the unmasked NEAR tiles, then the band's edges.
    acc, m_i, l_i = _fwd_inner_tiles(
        acc, m_i, l_i, inner, inner_end - (near_hi - near_lo), near_lo, near_hi - near_lo, bias_past,
        bias_future, q, qrel, KK, V, Bias, stride_br, hd * stride_bh, n_rel, tiles, tile_of, stride_kt,
        stride_kd, stride_vt, stride_vd, HEAD, BLOCK_N, False, BIAS_TILES, PRECISION)
    if HAS_BIAS:
        acc, m_i, l_i = _fwd_inner_tiles(
            acc, m_i, l_i, near_lo, near_hi, near_hi, 0, 0.0, 0.0, q, qrel, KK, V, Bias, stride_br,
            hd * stride_bh, n_rel, tiles, tile_of, stride_kt, stride_kd, stride_vt, stride_vd, HEAD, BLOCK_N,
            True, BIAS_TILES, PRECISION)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, lo, hi - (inner_end - inner), inner, inner_end - inner, q, qrel, KK, V, Bias,
        stride_br, hd * stride_bh, n_rel, tiles, tile_of, n_near, left_cut, q_first - k_off - left_edge0,
        right_cut, q_first - k_off - right_edge0, d1, d2, Pad, b * stride_pb, stride_pt, stride_kt, stride_kd,
        stride_vt, stride_vd, Tk, left, right, HEAD, BLOCK_N, HAS_BIAS, HAS_PAD, PAD_TILES, BIAS_TILES,
        PRECISION)

    # A row with no kept key gives zeros and lse = +inf, so that the backward's exp(l - lse) is 0.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    out_offs, out_mask = _tile_rows(pid_bh * Tq + pid_m * BLOCK_M, Tq - pid_m * BLOCK_M, BLOCK_M, HEAD)
    tl.store(Out + out_offs, out.to(Out.dtype.element_ty), mask=out_mask)
    tl.store(Lse + pid_bh * Tq + rows, lse, mask=rows < Tq)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


# Forward tile sizes and launch shape per (head width, tile table: attention_common.tile_arch), for inputs
# of 2 bytes. Three stages: a key tile's copies are in flight through the whole iteration before the one
# that takes it (at two, a loop waits at its top for every copy issued at the end of the iteration before).
_FORWARD_BLOCKS = {
    # 8 warps: at 4 the (128, 64) tiles spill registers on sm_80 (h = 32)
    (32, 80): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    (64, 80): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    (128, 80): dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=3),  # 32 keys spill
    # twice the keys per tile: a fifth fewer loop instructions per key inside the band at h = 64
    (32, 90): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    (64, 90): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    (128, 90): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
}


# Forward tile sizes and launch shape per head width for inputs of 4 bytes, the same on both tile tables:
# fp32 operands are multiplied exactly (ieee), by fused multiply-adds on either target, each thread holding
# its rows of one operand and its columns of the other whole along the product's inner dimension, so the
# tiles that fit its registers are smaller than 2-byte tiles, and no larger on sm_90. Of the shapes tried,
# the largest that spills nothing on either target under Triton 3.8, with the plain kernel, which takes
# these rows, and the rotation pass at the key tile (docs/model.md, "Tile tables").
_FORWARD_BLOCKS_FP32 = {
    32: {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    64: {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},  # 4 warps spill
    128: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2},  # 64 rows or 32 keys spill
}


def default_blocks(h: int, arch: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The forward's tiles and launch shape at head width h (a built width) for `dtype` inputs on the
    tile table of `arch`, chosen so that no launch spills registers (python -m echo_kernels.aot): 2-byte
    inputs take _FORWARD_BLOCKS, those multiplied exactly in fp32 _FORWARD_BLOCKS_FP32."""
    return dict(_FORWARD_BLOCKS_FP32[h] if exact_rows(dtype) else _FORWARD_BLOCKS[h, arch])


def first_padded_key(pad_flags: torch.Tensor) -> torch.Tensor:
    """(B, Tk) padding flags as the kernels read them (attention_common._pad_arg: 1 = padded, bytes or
    int32; Tk there a whole number of key tiles, set past the keys) -> (B,) int32: the index of each row's
    first padded key, the first past the keys where none is. Keys before it need no padding mask: the
    forward's unmasked loop runs up to it."""
    Tk = pad_flags.shape[1]
    first = pad_flags.argmax(1)  # argmax gives the first of equal maxima
    return torch.where(pad_flags.amax(1) > 0, first, Tk).to(torch.int32)


def _short_query_blocks(cfg: dict, Tq: int) -> dict:
    """Decoding (Tq = 1) and other short query runs: a 128-row tile would be almost all padding, so the
    tile shrinks to Tq's next power of two (16 at least). It keeps its table's warps: over 16 to 64 rows
    they split the key tile's columns, not repeat each other's products, so a decoding program, which walks
    every key tile alone, runs each tile on half the tensor-core instructions per warp that 4 warps would,
    and fewer launches spill (docs/model.md, "Tile tables"). At most two stages: at three, sm_90's 32- and
    64-row tiles spill under Triton 3.6."""
    cfg = dict(cfg)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(Tq)))
    if cfg["BLOCK_M"] <= 64:
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    return cfg


def forward(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
            keys_rotated=False):
    """Launch the forward kernel. q: (B, H, Tq, h); k, v: (B, H, Tk, h), any strides; M: (h, h) or None;
    keys_rotated: k is k' = RoPE(k) M (RoPE(k) without M), rotated already in `layout`.

    left/right: the band of reference.window_bounds. Returns out (B, H, Tq, h) in q's dtype,
    contiguous, and lse (B, H, Tq) fp32 (+inf on rows with no key).
    """
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    int32_offsets({"q": q, "k": k, "v": v, "bias": bias, "key_padding_mask": key_padding_mask,
                   "the (B, H, T, h) rows the launch writes": B * H * max(Tq, Tk) * h})
    out = torch.empty((B, H, Tq, h), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if Tq == 0 or B * H == 0:
        return out, lse
    P, has_p = p_arg(M, layout, q.dtype, q.device, keys_rotated)
    w32 = w.detach().float().contiguous()
    s32 = torch.as_tensor(s, dtype=torch.float32, device=q.device).detach().reshape(1)
    bias_t, sbr, sbh, n_rel, has_bias = _bias_arg(bias, q)
    arch = tile_arch(q.device)
    blocks = with_override(default_blocks(h, arch, q.dtype))
    cfg = _short_query_blocks(blocks, Tq)
    pad_t, spb, spt, has_pad = _pad_arg(key_padding_mask, q, torch.int32, cfg["BLOCK_N"])
    pad_start = first_padded_key(pad_t) if has_pad else lse
    qq, kk = attention_operands(q, k, w32, s32, q_offset, k_offset, P, has_p, layout, keys_rotated,
                                blocks["BLOCK_N"])
    # the short query tiles of decoding gather their NEAR bias: a few rows, where a table is a launch per
    # step; and they compare keys with Tk (PAD_TILES_ON: an unmasked load of the flags lengthened their loop)
    table_rows = cfg["BLOCK_M"] == blocks["BLOCK_M"]
    bias_tiles = has_bias and table_rows
    pad_tiles = PAD_TILES_ON[arch] and table_rows
    table = near_bias_args(bias_t if bias_tiles else None, n_rel, q_offset - k_offset, cfg["BLOCK_M"],
                           cfg["BLOCK_N"], lse, (left, right), Tq, Tk, P.dtype, P.dtype)
    n_tiles = triton.cdiv(Tq, cfg["BLOCK_M"])
    _attn_fwd_kernel[(n_tiles * B * H,)](
        qq, kk, v, bias_t, table.tiles, pad_t, pad_start, out, lse,
        *kk.stride(), *v.stride(),
        sbr, sbh, spb, spt,
        H, Tq, Tk, n_rel, table.count, table.first, table.n_near, table.left_edge0, table.right_edge0,
        left, right, q_offset, k_offset, n_tiles,
        HEAD=h, HAS_BIAS=has_bias, HAS_PAD=has_pad, PAD_TILES=pad_tiles, BIAS_TILES=bias_tiles,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=precision(q.dtype),
        **launch_options(cfg),
    )
    return out, lse


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile list (echo_kernels.aot)
# --------------------------------------------------------------------------------------------------


def aot_specs(arch: int) -> list[KernelSpec]:
    """The launches of the forward kernel at the block sizes of `arch`'s tile table:
    h in {32, 64, 128}, bf16, fp16 and fp32, with a bias table (n = 15) and a key-padding mask, each after
    those of the passes before it (attention_operands.aot_specs_of)."""
    specs = []
    for h in ATTENTION_HEAD_WIDTHS:
        for dt in DTYPE_NAMES:
            f = default_blocks(h, arch, dtype_named(dt))
            specs.extend(aot_specs_of(h, dt, f))
            ptrs = {n: f"*{dt}" for n in ("QQ", "KK", "V", "Out")}
            ptrs.update(Bias="*fp32", Tiles=f"*{dt}", Pad="*i32", PadStart="*i32", Lse="*fp32")
            ce = dict(HEAD=h, HAS_BIAS=True, HAS_PAD=True, PAD_TILES=PAD_TILES_ON[arch], BIAS_TILES=True,
                      BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"], PRECISION=precision_of(dt))
            specs.append(KernelSpec(f"attention_fwd_h{h}_{dt}", _attn_fwd_kernel,
                                    signature_of(_attn_fwd_kernel, ptrs, ce), ce, num_warps=f["num_warps"],
                                    num_stages=f["num_stages"]))
            if h == 64 and dt == "bf16":  # the decoding launch (Tq = 1 against a KV cache)
                d = _short_query_blocks(f, 1)
                # no table (its placeholder is lse), and the flags' load masked, as the launcher's
                ce = dict(ce, BLOCK_M=d["BLOCK_M"], BIAS_TILES=False, PAD_TILES=False)
                specs.append(KernelSpec(f"attention_fwd_decode_h{h}_{dt}", _attn_fwd_kernel,
                                        signature_of(_attn_fwd_kernel, dict(ptrs, Tiles="*fp32"), ce), ce,
                                        num_warps=d["num_warps"],
                                        num_stages=d["num_stages"]))
    return specs
