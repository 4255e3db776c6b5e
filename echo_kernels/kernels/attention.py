"""Fused Echo attention, forward: rotary, clamped relative bias, band masks, online softmax.

    out[b, t, i] = softmax_j(q'_i . k'_j / sqrt(h) + bias[clamp(i - j) + n - 1, t] + masks) @ v

with q' and k' as the launcher is given them (docs/model.md, Attention):

    M = None        q' = RoPE_s(q),      k' = RoPE_s(k)      the model's default: M folded upstream
    M given         q' = RoPE_s(q) @ M,  k' = RoPE_s(k) @ M  the "rope_then_m" order

("m_then_rope" with an M, RoPE(q M) . RoPE(k M), is the M = None kernel on q M and k M:
echo_kernels.attention multiplies them first.)

The kernel never forms q' and k'. Since q' k'^T = RoPE(q) (M M^T) RoPE(k)^T, the launcher folds
P = M M^T / sqrt(h) once per call, each query tile computes q'' = RoPE(q) @ P on chip (inner dim h),
and the keys only need RoPE(k): one memory-bound pass (_rope_keys_kernel) writes it once per call as
contiguous [a | b] rows in the dot type, so that the key loops read plain contiguous tiles, which the
compiler pipelines as asynchronous copies, and spend no sine or cosine per visit. Without M
(HAS_P false) q'' = RoPE(q) / sqrt(h): the only products left are attention's own, q'' RoPE(k)^T
and p v. The gradients are still those of the formula above (the backward goes through P back to M).

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

Masks are paid only where they can bite, as Triton's fused-attention tutorial stages its loops: a key
tile wholly inside the band of every query of the tile, whole (before Tk) and before the batch's first
padded key runs a loop with no mask arithmetic and no mask load, its bias one value per region folded
into the exponent, or near the diagonal, where the clamp lets it vary, a tile of it read whole from a
table written once per call (near_bias_tiles); the band's edges, the ragged last tile and the tiles
from the first padded key on take the masked loop (and so do all of decoding's tiles near the diagonal,
which gather their bias).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import ATTENTION_HEAD_WIDTHS
from .attention_common import (
    FUTURE,
    LOG2E,
    NEAR,
    NO_BIAS,
    PAST,
    _bias_arg,
    _bias_tile,
    _biased_exp,
    _head_bias_tiles,
    _in_band,
    _inner_keys,
    _key_ok,
    _key_range,
    _load_p,
    _load_pairs,
    _near_bias,
    _pad_arg,
    _rope_angles,
    _rotated_k,
    _split_regions,
    _tile_and_head,
    p_arg,
    precision,
    tile_arch,
    with_override,
)
from .spec import KernelSpec, signature_of


# --------------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rope_keys_kernel(
    K, W, S, KK, stride_kb, stride_kh, stride_kt, stride_kd, H, Tk, k_off, n_tiles,
    HEAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """RoPE(k) of one (BLOCK) key tile of one (batch, head): KK rows [a | b], contiguous, in KK's type
    (the dot type, to which the key loops would round it anyway). BLOCK is the forward's key tile and
    the angles are taken by the same angle addition from the tile's first position as the backward's
    key tiles take them: the backward recomputes the forward's probabilities from the very same k'."""
    HALF: tl.constexpr = HEAD // 2
    pid_t, pid_bh = _tile_and_head(n_tiles)
    K += (pid_bh // H) * stride_kb + (pid_bh % H) * stride_kh
    s = tl.load(S).to(tl.float32)
    cols = pid_t * BLOCK + tl.arange(0, BLOCK)
    cos0, sin0 = _rope_angles(tl.arange(0, BLOCK), s, W, HALF)
    ak, bk = _rotated_k(K, cols, Tk, stride_kt, stride_kd, cos0, sin0, k_off + pid_t * BLOCK, s, W, HALF)
    offs = pid_bh * Tk * HEAD + cols[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    mask = cols[:, None] < Tk
    tl.store(KK + offs, ak.to(KK.dtype.element_ty), mask=mask)
    tl.store(KK + offs + HALF, bk.to(KK.dtype.element_ty), mask=mask)


@triton.jit
def _near_bias_kernel(Bias, stride_br, stride_bh, Tiles, n_rel, first, n_tiles,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) fp32 tile of the bias of one head at the offset i - j = first + STEP * t of its
    top-left entry: Tiles[head, t], by the gather (_bias_tile) that decoding's NEAR tiles run."""
    pid_t, hd = _tile_and_head(n_tiles)
    rel = first + pid_t * STEP + tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]
    bias = _bias_tile(rel, Bias, stride_br, hd * stride_bh, n_rel, NEAR)
    offs = (hd * n_tiles + pid_t) * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N \
        + tl.arange(0, BLOCK_N)[None, :]
    tl.store(Tiles + offs, bias)


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, lo, hi, qa, qb, qpos, KK, V, Bias, stride_br, head_off, n_rel, Tiles, tile_of, Pad, pad_off,
    stride_pt, stride_vt, stride_vd, Tk, left, right, k_off,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, REGION: tl.constexpr,
    HAS_PAD: tl.constexpr, BIAS_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles starting at lo, lo + BLOCK_N, ... < hi (one bias region).
    KK: this head's RoPE(k) rows [a | b], contiguous, in the dot type. With BIAS_TILES, a NEAR tile's bias
    is the tile of this head's table (_near_bias) at offset tile_of - start, else a gather."""
    DT = qa.dtype
    half = tl.arange(0, HALF)
    dims = tl.arange(0, HEAD)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        # a padded key's k only reaches its own logits, which the mask replaces
        k_offs = cols[:, None] * HEAD + half[None, :]
        ak = tl.load(KK + k_offs, mask=cols[:, None] < Tk, other=0.0)
        bk = tl.load(KK + k_offs + HALF, mask=cols[:, None] < Tk, other=0.0)
        logits = tl.dot(qa, tl.trans(ak), input_precision=PRECISION)
        logits = tl.dot(qb, tl.trans(bk), logits, input_precision=PRECISION)
        rel = qpos[:, None] - (k_off + cols)[None, :]  # i - j
        key_ok = _key_ok(cols, Tk, Pad, pad_off, stride_pt, HAS_PAD)
        keep = _in_band(rel, left, right) & key_ok[None, :]
        if REGION == NEAR and BIAS_TILES:
            bias = _near_bias(Tiles, tile_of, start, qa.shape[0], BLOCK_N)
        else:
            bias = _bias_tile(rel, Bias, stride_br, head_off, n_rel, REGION)
        logits = tl.where(keep, logits + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        # Rows that have seen no key yet keep m = -inf; shift them by 0 so that exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        p = tl.exp2(logits * LOG2E - (m_safe * LOG2E)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # a padded key's v meets p = 0 in the product, and 0 * NaN is NaN: zeroed after the load, whose
        # mask then does not wait on the padding's (a dependent mask costs the pipelined loop registers);
        # in its own dtype, not through fp32 (a conversion each way per element)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd, mask=cols[:, None] < Tk, other=0.0)
        if HAS_PAD:
            v = tl.where(key_ok[:, None], v, 0.0)
        acc = tl.dot(p.to(DT), v.to(DT), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_inner_tiles(
    acc, m_i, l_i, lo, hi, qa, qb, KK, V, bias_c, Tiles, tile_of, stride_vt, stride_vd,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, REGION: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """_fwd_tiles for key tiles wholly inside the band, before Tk and before any padded key: no mask
    at all. The bias: in a NEAR region, each tile's from the table (_near_bias); in the others, the
    region's one value bias_c (0 without a table), folded into the exponent."""
    DT = qa.dtype
    half = tl.arange(0, HALF)
    dims = tl.arange(0, HEAD)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_offs = cols[:, None] * HEAD + half[None, :]
        logits = tl.dot(qa, tl.trans(tl.load(KK + k_offs)), input_precision=PRECISION)
        logits = tl.dot(qb, tl.trans(tl.load(KK + k_offs + HALF)), logits, input_precision=PRECISION)
        # every row sees every key of the tile, so the maximum is finite: no guard against -inf
        if REGION == NEAR:
            logits += _near_bias(Tiles, tile_of, start, qa.shape[0], BLOCK_N)
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
def _fwd_region(
    acc, m_i, l_i, lo, hi, inner_lo, inner_hi, qa, qb, qpos, KK, V, Bias, stride_br, head_off, n_rel, Tiles,
    tile_of, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, REGION: tl.constexpr,
    HAS_PAD: tl.constexpr, BIAS_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """The key tiles lo, ... < hi of one region (its bias one value: PAST, FUTURE, NO_BIAS; or NEAR's from
    the table, BIAS_TILES), as the tutorial stages its loops: the tiles in [inner_lo, inner_hi) (tile
    starts on lo's grid) by the loop with no mask, the edges before and after by the masked one."""
    a = tl.minimum(tl.maximum(inner_lo, lo), hi)
    b = tl.maximum(tl.minimum(inner_hi, hi), a)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, lo, a, qa, qb, qpos, KK, V, Bias, stride_br, head_off, n_rel, Tiles, tile_of, Pad, pad_off,
        stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD, BLOCK_N, REGION, HAS_PAD, BIAS_TILES,
        PRECISION)
    if REGION == NEAR:
        bias_c = 0.0  # each tile's bias comes from the table
    else:
        bias_c = _bias_tile(0, Bias, stride_br, head_off, n_rel, REGION)
    acc, m_i, l_i = _fwd_inner_tiles(
        acc, m_i, l_i, a, b, qa, qb, KK, V, bias_c, Tiles, tile_of, stride_vt, stride_vd, HALF, HEAD, BLOCK_N,
        REGION, PRECISION)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, b, hi, qa, qb, qpos, KK, V, Bias, stride_br, head_off, n_rel, Tiles, tile_of, Pad, pad_off,
        stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD, BLOCK_N, REGION, HAS_PAD, BIAS_TILES,
        PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, KK, V, P, W, S, Bias, Tiles, Pad, PadStart, Out, Lse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, left, right, q_off, k_off, scale, n_tiles,
    HEAD: tl.constexpr, HAS_P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    BIAS_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, HEAD) query tile of one (batch, head): Out tile and its log-sum-exp.

    KK: RoPE(k) from _rope_keys_kernel, (B, H, Tk, h) contiguous in the dot type;
    P: the folded (h, h) P~ when HAS_P, else a placeholder whose element type is the dot type;
    Tiles: with BIAS_TILES, (H, n_bias_tiles, BLOCK_M, BLOCK_N) fp32, the bias of the NEAR tiles from
    near_bias_tiles, the tile t at i - j = first_bias_tile + t min(BLOCK_M, BLOCK_N) in its top-left entry;
    PadStart: (B,) int32, each batch's first padded key (Tk if none), read when HAS_PAD;
    scale: 1 / sqrt(h), applied to RoPE(q) when there is no P (P~ holds it otherwise)."""
    HALF: tl.constexpr = HEAD // 2
    DT = P.dtype.element_ty  # operand type of every tl.dot (fp32 under the interpreter for bf16)
    pid_m, pid_bh = _tile_and_head(n_tiles)
    b = pid_bh // H
    hd = pid_bh % H
    Q += b * stride_qb + hd * stride_qh
    KK += pid_bh * Tk * HEAD
    V += b * stride_vb + hd * stride_vh
    s = tl.load(S).to(tl.float32)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qpos = q_off + rows
    x1, x2 = _load_pairs(Q, rows, rows < Tq, stride_qt, stride_qd, HALF)
    cos, sin = _rope_angles(qpos, s, W, HALF)
    a = x1 * cos - x2 * sin
    bq = x1 * sin + x2 * cos
    if HAS_P:
        p_aa, p_ab, p_ba, p_bb = _load_p(P, HALF)
        qa = tl.dot(a.to(DT), p_aa, input_precision=PRECISION)
        qa = tl.dot(bq.to(DT), p_ba, qa, input_precision=PRECISION).to(DT)
        qb = tl.dot(a.to(DT), p_ab, input_precision=PRECISION)
        qb = tl.dot(bq.to(DT), p_bb, qb, input_precision=PRECISION).to(DT)
    else:
        qa = (a * scale).to(DT)
        qb = (bq * scale).to(DT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], tl.float32)
    q_first = q_off + pid_m * BLOCK_M
    lo, hi = _key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M - 1, left, right, q_off, k_off, Tk, BLOCK_N)
    k_end = Tk
    if HAS_PAD:
        k_end = tl.minimum(k_end, tl.load(PadStart + b))
    inner_lo, inner_hi = _inner_keys(q_first, left, right, k_off, k_end, BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        d1, d2 = _split_regions(lo, hi, q_first - n_rel + 2 - k_off - BLOCK_N,
                                q_first + BLOCK_M + n_rel - 2 - k_off, BLOCK_N)
        acc, m_i, l_i = _fwd_region(
            acc, m_i, l_i, lo, d1, inner_lo, inner_hi, qa, qb, qpos, KK, V, Bias, stride_br, hd * stride_bh, n_rel,
            Tiles, 0, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD,
            BLOCK_N, PAST, HAS_PAD, False, PRECISION)
        # the NEAR tiles' offsets i - j at their top-left entries are q_first - k_off - start, which finds a
        # tile's place in the table (_near_bias)
        tiles = _head_bias_tiles(Tiles, hd, n_bias_tiles, BLOCK_M, BLOCK_N)
        tile_of = q_first - k_off - first_bias_tile
        if BIAS_TILES:  # staged as the one-value regions: tiles inside the band and before any padding unmasked
            acc, m_i, l_i = _fwd_region(
                acc, m_i, l_i, d1, d2, inner_lo, inner_hi, qa, qb, qpos, KK, V, Bias, stride_br, hd * stride_bh,
                n_rel, tiles, tile_of, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off,
                HALF, HEAD, BLOCK_N, NEAR, HAS_PAD, True, PRECISION)
        else:  # decoding: the gather, whose every tile takes the masked loop
            acc, m_i, l_i = _fwd_tiles(
                acc, m_i, l_i, d1, d2, qa, qb, qpos, KK, V, Bias, stride_br, hd * stride_bh, n_rel, tiles, tile_of,
                Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD, BLOCK_N,
                NEAR, HAS_PAD, False, PRECISION)
        acc, m_i, l_i = _fwd_region(
            acc, m_i, l_i, d2, hi, inner_lo, inner_hi, qa, qb, qpos, KK, V, Bias, stride_br, hd * stride_bh, n_rel,
            Tiles, 0, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD,
            BLOCK_N, FUTURE, HAS_PAD, False, PRECISION)
    else:
        acc, m_i, l_i = _fwd_region(
            acc, m_i, l_i, lo, hi, inner_lo, inner_hi, qa, qb, qpos, KK, V, Bias, stride_br, hd * stride_bh, n_rel,
            Tiles, 0, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD,
            BLOCK_N, NO_BIAS, HAS_PAD, False, PRECISION)

    # A row with no kept key gives zeros and lse = +inf, so that the backward's exp(l - lse) is 0.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    out_offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(Out + out_offs, out.to(Out.dtype.element_ty), mask=rows[:, None] < Tq)
    tl.store(Lse + pid_bh * Tq + rows, lse, mask=rows < Tq)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


# Forward tile sizes and launch shape per (head width, tile table: attention_common.tile_arch).
_FORWARD_BLOCKS = {
    # 8 warps: at 4 the (128, 64) tiles spill registers on sm_80 (h = 32)
    (32, 80): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    (64, 80): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    (128, 80): dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=2),  # 32 keys spill
    # twice the keys per tile: a fifth fewer loop instructions per key inside the band at h = 64
    (32, 90): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    (64, 90): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    (128, 90): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
}


def default_blocks(h: int, arch: int) -> dict:
    """The forward's tiles and launch shape at head width h (a built width) on the tile table of
    `arch`, chosen so that no launch spills registers (python -m echo_kernels.aot)."""
    return dict(_FORWARD_BLOCKS[h, arch])


def rotated_keys(k: torch.Tensor, w32: torch.Tensor, s32: torch.Tensor, k_offset: int, dot_type: torch.dtype,
                 block: int) -> torch.Tensor:
    """RoPE(k) for the key loops, by tiles of `block` keys (the forward's BLOCK_N).
    k: (B, H, Tk, h) any strides -> (B, H, Tk, h) contiguous in dot_type, each row [a | b]
    (a = k_even cos - k_odd sin, b = k_even sin + k_odd cos)."""
    B, H, Tk, h = k.shape
    kk = torch.empty((B, H, Tk, h), dtype=dot_type, device=k.device)
    n_tiles = triton.cdiv(Tk, block)
    if kk.numel():  # a memory-bound pass: nothing to pipeline
        _rope_keys_kernel[(n_tiles * B * H,)](k, w32, s32, kk, *k.stride(), H, Tk, k_offset, n_tiles, HEAD=h,
                                              BLOCK=block, num_warps=tile_pass_warps(block * h), num_stages=1)
    return kk


def tile_pass_warps(elements: int) -> int:
    """Warps of a memory-bound pass over tiles of `elements` (RoPE(k), the NEAR bias tiles): 4, and 8 for
    tiles past 64 x 64 elements, where 4 spill registers (sm_90)."""
    return 8 if elements > 64 * 64 else 4


def near_bias_tiles(bias: torch.Tensor, n_rel: int, offset: int, block_m: int,
                    block_n: int) -> tuple[torch.Tensor, int]:
    """The bias of the NEAR tiles of a launch's (block_m, block_n) tiles, as a table of them per head.

    bias: (2n - 1, H), n = n_rel; offset: q_offset - k_offset. A NEAR tile (attention_common: neither
    wholly at i - j >= n - 1 nor wholly at i - j <= 1 - n) of the query tile at row r0 and the key tile at
    column c0 has i - j = delta + r - c at its entry (r, c), delta = offset + r0 - c0, and
    3 - n - block_m <= delta <= block_n + n - 3. Tile rows are multiples of block_m and tile columns of
    block_n, so the deltas are those of that range congruent to offset modulo step = min(block_m,
    block_n): a few tiles, which every query tile and batch of the launch shares. A pass holding its tiles
    as (keys, queries) (the backward's dk/dv) takes the table of bias.flip(0) at -offset, block sides
    swapped: bias[clamp(i - j)] = bias.flip(0)[clamp(j - i)].

    Returns (tiles (H, count, block_m, block_n) fp32, first): tile t is the bias at delta = first + step t.
    """
    step = min(block_m, block_n)
    lowest = 3 - n_rel - block_m
    first = lowest + (offset - lowest) % step
    count = (block_n + n_rel - 3 - first) // step + 1
    H = bias.shape[1]
    tiles = torch.empty((H, count, block_m, block_n), dtype=torch.float32, device=bias.device)
    _near_bias_kernel[(count * H,)](bias, *bias.stride(), tiles, n_rel, first, count, BLOCK_M=block_m,
                                    BLOCK_N=block_n, STEP=step, num_warps=tile_pass_warps(block_m * block_n),
                                    num_stages=1)
    return tiles, first


def near_bias_args(bias: torch.Tensor | None, n_rel: int, offset: int, block_m: int, block_n: int,
                   like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A kernel's Tiles, n_bias_tiles and first_bias_tile: near_bias_tiles' table of (block_m, block_n)
    tiles, or without a bias (None) the placeholder `like`, which no loop reads."""
    if bias is None:
        return like, 1, 0
    tiles, first = near_bias_tiles(bias, n_rel, offset, block_m, block_n)
    return tiles, tiles.shape[1], first


def first_padded_key(pad_flags: torch.Tensor) -> torch.Tensor:
    """(B, Tk) padding flags as the kernels read them (attention_common._pad_arg: 1 = padded, bytes or
    int32) -> (B,) int32: the index of each row's first padded key, Tk where none is. Keys before it
    need no padding mask: the forward's unmasked loop runs up to it."""
    Tk = pad_flags.shape[1]
    first = pad_flags.argmax(1)  # argmax gives the first of equal maxima
    return torch.where(pad_flags.amax(1) > 0, first, Tk).to(torch.int32)


def _short_query_blocks(cfg: dict, Tq: int) -> dict:
    """Decoding (Tq = 1) and other short query runs: a 128-row tile would be almost all padding, so
    the tile shrinks, and a tile of 64 rows or fewer needs no more than 4 warps."""
    cfg = dict(cfg)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(Tq)))
    if cfg["BLOCK_M"] <= 64:
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    return cfg


def forward(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout):
    """Launch the forward kernel. q: (B, H, Tq, h); k, v: (B, H, Tk, h), any strides; M: (h, h) or None.

    left/right: the band of reference.window_bounds. Returns out (B, H, Tq, h) in q's dtype,
    contiguous, and lse (B, H, Tq) fp32 (+inf on rows with no key).
    """
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    out = torch.empty((B, H, Tq, h), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if Tq == 0 or B * H == 0:
        return out, lse
    P, has_p = p_arg(M, layout, q.dtype, q.device)
    w32 = w.detach().float().contiguous()
    s32 = torch.as_tensor(s, dtype=torch.float32, device=q.device).detach().reshape(1)
    bias_t, sbr, sbh, n_rel, has_bias = _bias_arg(bias, q)
    pad_t, spb, spt, has_pad = _pad_arg(key_padding_mask, q, torch.int32)
    pad_start = first_padded_key(pad_t) if has_pad else lse
    blocks = with_override(default_blocks(h, tile_arch(q.device)))
    cfg = _short_query_blocks(blocks, Tq)
    kk = rotated_keys(k, w32, s32, k_offset, P.dtype, cfg["BLOCK_N"])
    # the short query tiles of decoding gather their NEAR bias: a few rows, where a table is a launch per step
    bias_tiles = has_bias and cfg["BLOCK_M"] == blocks["BLOCK_M"]
    tiles, n_bias_tiles, first_tile = near_bias_args(bias_t if bias_tiles else None, n_rel, q_offset - k_offset,
                                                     cfg["BLOCK_M"], cfg["BLOCK_N"], lse)
    n_tiles = triton.cdiv(Tq, cfg["BLOCK_M"])
    _attn_fwd_kernel[(n_tiles * B * H,)](
        q, kk, v, P, w32, s32, bias_t, tiles, pad_t, pad_start, out, lse,
        *q.stride(), *v.stride(),
        sbr, sbh, spb, spt,
        H, Tq, Tk, n_rel, n_bias_tiles, first_tile, left, right, q_offset, k_offset,
        1.0 / math.sqrt(h), n_tiles,
        HEAD=h, HAS_P=has_p, HAS_BIAS=has_bias, HAS_PAD=has_pad, BIAS_TILES=bias_tiles,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile list (echo_kernels.aot)
# --------------------------------------------------------------------------------------------------


def aot_specs(arch: int) -> list[KernelSpec]:
    """The launches of the forward kernel at the block sizes of `arch`'s tile table:
    h in {32, 64, 128}, bf16 and fp16, with a bias table (n = 15) and a key-padding mask, with M
    ("rope_then_m": P folded into q) and without (names ending in _no_m: the model's default order);
    and the passes before them: RoPE(k), and the NEAR tiles' bias (near_bias_tiles)."""
    specs = []
    for h in ATTENTION_HEAD_WIDTHS:
        for dt in ("bf16", "fp16"):
            f = default_blocks(h, arch)
            ptrs = {"K": f"*{dt}", "KK": f"*{dt}", "W": "*fp32", "S": "*fp32"}
            ce = dict(HEAD=h, BLOCK=f["BLOCK_N"])
            specs.append(KernelSpec(f"attention_rope_keys_h{h}_{dt}", _rope_keys_kernel,
                                    signature_of(_rope_keys_kernel, ptrs, ce), ce,
                                    num_warps=tile_pass_warps(h * f["BLOCK_N"]), num_stages=1))
            if dt == "bf16":  # the bias table is fp32 whatever the inputs
                ce = dict(BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"], STEP=min(f["BLOCK_M"], f["BLOCK_N"]))
                specs.append(KernelSpec(f"attention_near_bias_h{h}", _near_bias_kernel,
                                        signature_of(_near_bias_kernel, {"Bias": "*fp32", "Tiles": "*fp32"}, ce), ce,
                                        num_warps=tile_pass_warps(f["BLOCK_M"] * f["BLOCK_N"]), num_stages=1))
            ptrs = {n: f"*{dt}" for n in ("Q", "KK", "V", "P", "Out")}
            ptrs.update(W="*fp32", S="*fp32", Bias="*fp32", Tiles="*fp32", Pad="*i32", PadStart="*i32", Lse="*fp32",
                        scale="fp32")
            for has_p, suffix in ((True, ""), (False, "_no_m")):
                ce = dict(HEAD=h, HAS_P=has_p, HAS_BIAS=True, HAS_PAD=True, BIAS_TILES=True, BLOCK_M=f["BLOCK_M"],
                          BLOCK_N=f["BLOCK_N"], PRECISION="tf32")
                specs.append(KernelSpec(
                    f"attention_fwd{suffix}_h{h}_{dt}", _attn_fwd_kernel, signature_of(_attn_fwd_kernel, ptrs, ce),
                    ce, num_warps=f["num_warps"], num_stages=f["num_stages"]))
                if h == 64 and dt == "bf16":  # the decoding launch (Tq = 1 against a KV cache)
                    d = _short_query_blocks(f, 1)
                    ce = dict(ce, BLOCK_M=d["BLOCK_M"], BIAS_TILES=False)
                    specs.append(KernelSpec(
                        f"attention_fwd_decode{suffix}_h{h}_{dt}", _attn_fwd_kernel,
                        signature_of(_attn_fwd_kernel, ptrs, ce), ce, num_warps=d["num_warps"],
                        num_stages=d["num_stages"]))
    return specs
