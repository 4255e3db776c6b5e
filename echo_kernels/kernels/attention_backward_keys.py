"""Fused Echo attention, backward: the passes over key tiles (the notation, and how the passes fit
together: echo_kernels.kernels.attention_backward, which launches them).

    dkdv    per key tile, looping over the query tiles the band reaches: dv and d(a_k, b_k) (fp32);
            with WITH_DQ ("the key pass") also each query tile's share of d(q'') and the bias table's
            sums, so that the dq pass does not run
    unrope  per key tile: dk from d(a_k, b_k) (undoing RoPE) and the keys' angle partials
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import (
    ANY,
    FAR,
    INT32_MAX,
    NEAR,
    _band_bias,
    _bias_row_sums,
    _biased_exp,
    _edge_cuts,
    _far_masked_tiles,
    _head_bias_tiles,
    _key_ok,
    _load_full,
    _load_pairs,
    _loop_stages,
    _near_bias,
    _regions,
    _rope_angles,
    _side_sums,
    _skip,
    _store_angle_partial,
    _store_bias_sums,
    _store_diagonal_sums,
    _tile_and_head,
    _tile_rows,
    _unrope_store,
)


@triton.jit
def _add_dq(ds_t, kk, DQQ, rows, mask, HEAD: tl.constexpr, PRECISION: tl.constexpr):
    """DQQ[rows] += dS [a_k | b_k]: one key tile's share of a query tile's d(q''_A, q''_B), fp32 rows
    [A | B]. Only this program adds to these rows (_attn_bwd_dkdv_kernel): no atomics."""
    offs = rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(DQQ + offs,
             tl.dot(tl.trans(ds_t), kk, tl.load(DQQ + offs, mask=mask), input_precision=PRECISION), mask=mask)


@triton.jit
def _dkdv_tiles(
    dkk, dv, db_lo, db_hi, lo, hi, skip_at, skip, skip_at2, skip2, d1, d2, bias_future, bias_past, kk, v,
    kpos, key_ok, QQ, DO, Lse, Delta, DQQ, Tiles, tile_of, n_near, left_cut, left_of, right_cut, right_of,
    Diag, stride_ot, stride_od, Tq, n_rel, left, right, q_off, HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
    REGION: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dk (as d(a_k, b_k)) and dv over query tiles, masked: starts lo, lo + BLOCK_M, ... < hi,
    moved on by skip from skip_at and then by skip2 from skip_at2 (_skip). WITH_DQ also add each
    query tile's share of d(q'') (_add_dq) and sum dS into the bias table's rows per key.

    Tiles are kept transposed, (keys, queries), as in Triton's fused-attention tutorial: every
    transpose then falls on a tl.dot's second operand, which goes through shared memory anyway.
    QQ, Lse, Delta and DQQ point at this (batch, head)'s rows. The bias, from this head's table of (keys,
    queries) tiles, whose NEAR tiles start in [d1, d2) (the FUTURE ones before them): REGION ANY, any tile's
    with the band's mask in it (_band_bias, at the edges' offsets left_of and right_of from left_cut and
    right_cut on), and no comparison of j - i; NEAR (summing dq: every NEAR tile), the NEAR tile's, its pairs
    on the table's inner rows stored at Diag (_bias_row_sums); FAR (summing dq: the far tiles), one value,
    bias_future before d1 and bias_past after, and dS's row sums to the table's first row (db_lo) and its last
    (db_hi) likewise.
    """
    DT = kk.dtype
    dims = tl.arange(0, HEAD)
    for tile_start in range(lo, hi, BLOCK_M):
        start = _skip(_skip(tile_start, skip_at, skip), skip_at2, skip2)
        past = start >= d1
        rows = start + tl.arange(0, BLOCK_M)
        qq = tl.load(QQ + rows[:, None] * HEAD + dims[None, :], mask=rows[:, None] < Tq, other=0.0)
        logits_t = tl.dot(kk, tl.trans(qq), input_precision=PRECISION)
        # i - j as a key's value plus a column's index (a qpos of q_off + rows kept q_off plus each
        # column's index live through the loop, as the forward's rel)
        rel_t = (q_off + start - kpos)[:, None] + tl.arange(0, BLOCK_M)[None, :]
        if HAS_BIAS and REGION == ANY:
            # the band's -inf comes with the bias, as in the forward's masked loop; the right edge tested on
            # the tile's last column whatever Tq (_edge_cuts needs no more): sm_80's launch at h = 32 then
            # holds 128 registers, 4 CTAs per SM, where with Tq it held 131
            bias = _band_bias(Tiles, n_near, tile_of, start, d1, d2, left_cut, left_of, right_cut, right_of,
                              INT32_MAX, kk.shape[0], BLOCK_M)
            keep_t = key_ok[:, None]
        else:
            keep_t = (rel_t <= left) & (rel_t >= -right) & key_ok[:, None]
            if not HAS_BIAS:
                bias = 0.0
            elif REGION == NEAR:
                bias = _near_bias(Tiles, tile_of, start, kk.shape[0], BLOCK_M)
            else:
                bias = tl.where(past, bias_past, bias_future)
        lse = tl.load(Lse + rows, mask=rows < Tq, other=float("inf"))
        p_t = tl.where(keep_t, _biased_exp(logits_t, bias, lse[None, :]), 0.0)
        do = _load_full(DO, rows, rows < Tq, stride_ot, stride_od, HEAD).to(DT)
        dv = tl.dot(p_t.to(DT), do, dv, input_precision=PRECISION)
        delta = tl.load(Delta + rows, mask=rows < Tq, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if WITH_DQ and HAS_BIAS:
            if REGION == NEAR:
                db_lo, db_hi = _bias_row_sums(ds_t, db_lo, db_hi, rel_t, Diag, n_rel, N_DIAG)
            else:
                db_lo, db_hi = _side_sums(tl.sum(ds_t, 1), db_lo, db_hi, past)
        ds_t = ds_t.to(DT)
        dkk = tl.dot(ds_t, qq, dkk, input_precision=PRECISION)
        if WITH_DQ:
            _add_dq(ds_t, kk, DQQ, rows, rows[:, None] < Tq, HEAD, PRECISION)
    return dkk, dv, db_lo, db_hi


@triton.jit
def _dkdv_inner_tiles(
    dkk, dv, db_lo, db_hi, lo, hi, skip_at, skip, bias_future, bias_past, kk, v, QQ, DO, Lse, Delta, DQQ,
    Tiles, tile_of, stride_ot, stride_od,
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, NEAR_TILES: tl.constexpr, WITH_DQ: tl.constexpr,
    SUM_DS: tl.constexpr, PRECISION: tl.constexpr,
):
    """_dkdv_tiles for whole query tiles that see every key of the tile (inside the band, keys not
    padded): no mask. Starts lo, lo + BLOCK_M, ... < hi, moved on by skip from skip_at (past the NEAR
    tiles). The bias: NEAR_TILES, each tile's from the table (_near_bias); else one value per tile,
    bias_future before skip_at and bias_past from it (0 without a table), folded into the exponent.
    WITH_DQ and SUM_DS: dS's row sums (per key) to the table's first row (db_lo) and its last (db_hi)
    likewise (never a NEAR tile's, whose sums go along diagonals)."""
    DT = kk.dtype
    dims = tl.arange(0, HEAD)
    for tile_start in range(lo, hi, BLOCK_M):
        past = tile_start >= skip_at
        start = _skip(tile_start, skip_at, skip)
        rows = start + tl.arange(0, BLOCK_M)
        qq = tl.load(QQ + rows[:, None] * HEAD + dims[None, :])
        logits_t = tl.dot(kk, tl.trans(qq), input_precision=PRECISION)
        lse = tl.load(Lse + rows)
        if NEAR_TILES:
            bias = _near_bias(Tiles, tile_of, start, kk.shape[0], BLOCK_M)
        else:
            bias = tl.where(past, bias_past, bias_future)
        p_t = _biased_exp(logits_t, bias, lse[None, :])
        do = tl.load(DO + rows[:, None] * stride_ot + dims[None, :] * stride_od).to(DT)
        dv = tl.dot(p_t.to(DT), do, dv, input_precision=PRECISION)
        delta = tl.load(Delta + rows)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if WITH_DQ and SUM_DS:
            db_lo, db_hi = _side_sums(tl.sum(ds_t, 1), db_lo, db_hi, past)
        ds_t = ds_t.to(DT)
        dkk = tl.dot(ds_t, qq, dkk, input_precision=PRECISION)
        if WITH_DQ:
            _add_dq(ds_t, kk, DQQ, rows, None, HEAD, PRECISION)
    return dkk, dv, db_lo, db_hi


@triton.jit
def _attn_bwd_dkdv_kernel(
    KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, Diag,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, n_near, left_edge0, right_edge0, left, right, q_off,
    k_off, n_tiles, n_groups,
    HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Without WITH_DQ, one key tile per program (_dkdv_key_tile). WITH_DQ, the key tiles pid_g,
    pid_g + n_groups, ... of one (batch, head), one after the other: each adds its shares of
    d(q''_A, q''_B) to the program's own fp32 sum (DQQ, (B, H, n_groups, Tq, h), zeros at launch,
    which the launcher adds up group by group), so that no two programs add to the same rows
    and the sums come out the same, bit for bit, every run."""
    if WITH_DQ:
        pid_g, pid_bh = _tile_and_head(n_groups)
        DQQ += (pid_bh * n_groups + pid_g) * Tq * HEAD
        for pid_n in range(pid_g, n_tiles, n_groups):
            _dkdv_key_tile(
                pid_n, pid_bh, KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias,
                Diag, stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                stride_br, stride_bh, stride_pb, stride_pt, H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile,
                n_near, left_edge0, right_edge0, left, right, q_off, k_off, n_tiles, HEAD, HAS_BIAS, HAS_PAD,
                BLOCK_M, BLOCK_N, WITH_DQ, N_DIAG, PRECISION)
            tl.debug_barrier()  # the next key tile reads the sums this one wrote, maybe in other threads
    else:
        pid_n, pid_bh = _tile_and_head(n_tiles)
        _dkdv_key_tile(
            pid_n, pid_bh, KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, Diag,
            stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od, stride_br,
            stride_bh, stride_pb, stride_pt, H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, n_near,
            left_edge0, right_edge0, left, right, q_off, k_off, n_tiles, HEAD, HAS_BIAS, HAS_PAD, BLOCK_M,
            BLOCK_N, WITH_DQ, N_DIAG, PRECISION)


@triton.jit
def _dkdv_key_tile(
    pid_n, pid_bh, KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, Diag,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, n_near, left_edge0, right_edge0, left, right, q_off,
    k_off, n_tiles, HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key tile pid_n (BLOCK_N keys) of head pid_bh: dv, and d(a_k, b_k) in fp32 (DKK, contiguous
    rows [A | B]), which _attn_bwd_unrope_kernel turns into dk and the angle partials: undoing RoPE
    needs the key angles again, and their sines are not worth registers next to the accumulators.
    KK: RoPE(k) as the rotation pass (rotated_rows) writes it, (B, H, Tk, h) contiguous in the dot type.
    WITH_DQ (the dq pass then does not run), also: d(q''_A, q''_B) added to DQQ (this head's rows),
    and this tile's share of dbias, DBias[tile] (as the dq kernel writes a query tile's).
    Tiles: with HAS_BIAS, (H, n_bias_tiles, BLOCK_N, BLOCK_M) fp32, the bias as (keys, queries) tiles
    (kernels.attention_operands.near_bias_tiles of the reversed table), the NEAR tile t < n_near at
    j - i = first_bias_tile + t min(BLOCK_M, BLOCK_N) in its top-left entry, then the sides' constant
    tiles and, without WITH_DQ, with the band's mask in them and the tiles of its edges (at
    left_edge0 + t min(...) the edge j - i = right, at right_edge0 + t min(...) the edge j - i = -left).
    Diag: WITH_DQ and HAS_BIAS, (B H n_tiles, BLOCK_N, N_DIAG) fp32, where each key tile stores its NEAR
    tiles' inner-row pairs of dS (_bias_row_sums).
    """
    DT = QQ.dtype.element_ty
    b = pid_bh // H
    hd = pid_bh % H
    V += b * stride_vb + hd * stride_vh
    DO += b * stride_ob + hd * stride_oh
    QQ += pid_bh * Tq * HEAD
    Lse += pid_bh * Tq
    Delta += pid_bh * Tq

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kpos = k_off + cols
    first = k_off + pid_n * BLOCK_N
    key_ok = _key_ok(cols, Tk, Pad, b * stride_pb, stride_pt, HAS_PAD, False)  # padding belongs to the key
    k_offs = pid_bh * Tk * HEAD + cols[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    kk = tl.load(KK + k_offs, mask=key_ok[:, None], other=0.0)  # rows [a_k | b_k]
    v = _load_full(V, cols, key_ok, stride_vt, stride_vd, HEAD).to(DT)

    dkk = tl.zeros([BLOCK_N, HEAD], tl.float32)  # d(a_k, b_k), rows [A | B]
    dv = tl.zeros([BLOCK_N, HEAD], tl.float32)
    db_lo = tl.zeros([BLOCK_N], tl.float32)  # the bias table's sums (WITH_DQ)
    db_hi = tl.zeros([BLOCK_N], tl.float32)
    # Queries i reach key j iff j - right <= i <= j + left: the band seen from the key side.
    lo = tl.maximum(first - right - q_off, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(first + BLOCK_N - 1 + left - q_off + 1, Tq)
    # The query tiles no mask can bite: whole tiles before Tq whose every query has every key of this
    # tile inside its band (from the last key's right edge to the first key's left edge), and none at
    # all when this tile holds a padded key, whose gradients are stored as zeros. Keys past Tk need no
    # mask (their k and v load as zeros): a key's dS reaches only its own rows of dk and dv, which are
    # not stored; but WITH_DQ dS is also summed over the keys (dq, dbias), and they must drop out.
    k_end = Tk + BLOCK_N
    if WITH_DQ:
        k_end = Tk
    if HAS_PAD:
        pad_start = tl.load(PadStart + b)
        k_end = tl.where(pad_start < Tk, pad_start, k_end)
    inner_lo = tl.cdiv(tl.maximum(first + BLOCK_N - 1 - right - q_off, 0), BLOCK_M) * BLOCK_M
    inner_hi = tl.minimum(first - q_off + 1, Tq - left) + left  # no int32 overflow at left = 2^30
    inner_hi = tl.maximum(inner_hi, 0) // BLOCK_M * BLOCK_M
    inner_hi = tl.where(pid_n * BLOCK_N + BLOCK_N <= k_end, inner_hi, 0)
    head_off = hd * stride_bh
    # seen from a key tile, the FUTURE query tiles come first and the PAST ones last
    d1, d2, bias_past, bias_future = _regions(lo, hi, first - n_rel + 2 - q_off - BLOCK_M,
                                              first + BLOCK_N + n_rel - 2 - q_off, Bias, stride_br, head_off,
                                              n_rel, QQ.dtype.element_ty, HAS_BIAS, BLOCK_M)
    inner, inner_end, near_lo, near_hi = _loop_stages(lo, hi, inner_lo, inner_hi, d1, d2)
    # the NEAR tiles' offsets j - i at their top-left entries are first - q_off - start: the table's
    # tiles are (keys, queries), the tile t at j - i = first_bias_tile + t min(BLOCK_M, BLOCK_N)
    tiles = _head_bias_tiles(Tiles, hd, n_bias_tiles, BLOCK_N, BLOCK_M)
    tile_of = first - q_off - first_bias_tile
    # the band's edges seen from the keys (_band_bias): a query tile from `start` crosses j - i <= right
    # where its first query is more than `right` before the tile's last key, j - i >= -left where its last
    # query is more than `left` after the first key
    left_cut, right_cut = _edge_cuts(first, k_off + tl.minimum(pid_n * BLOCK_N + BLOCK_N, Tk) - 1, q_off, Tq,
                                     right, left)
    left_of = first - q_off - left_edge0
    right_of = first - q_off - right_edge0
    diag = Diag + (pid_bh * n_tiles + pid_n) * (BLOCK_N * N_DIAG)  # WITH_DQ: this tile's inner-row pairs
    # Three loops, as the forward's, so that the kernel's code stays small: the unmasked far tiles of both
    # sides, the NEAR tiles, then the tiles that masks can bite. Without dq, the NEAR loop takes those
    # inside the band unmasked, and the masked one every other tile, the band's edges, as the forward's.
    # Summing dq, the NEAR loop takes every NEAR tile masked (it stores their pairs on the bias table's
    # inner rows for _store_diagonal_sums) and the masked one the far tiles left.
    dkk, dv, db_lo, db_hi = _dkdv_inner_tiles(
        dkk, dv, db_lo, db_hi, inner, inner_end - (near_hi - near_lo), near_lo, near_hi - near_lo,
        bias_future, bias_past, kk, v, QQ, DO, Lse, Delta, DQQ, tiles, tile_of, stride_ot, stride_od, HEAD,
        BLOCK_M, False, WITH_DQ, HAS_BIAS, PRECISION)
    if WITH_DQ:
        if HAS_BIAS:
            dkk, dv, db_lo, db_hi = _dkdv_tiles(
                dkk, dv, db_lo, db_hi, d1, d2, d2, 0, d2, 0, d1, d2, 0.0, 0.0, kk, v, kpos, key_ok, QQ, DO,
                Lse, Delta, DQQ, tiles, tile_of, n_near, left_cut, left_of, right_cut, right_of, diag,
                stride_ot, stride_od, Tq, n_rel, left, right, q_off, HEAD, BLOCK_M, NEAR, HAS_BIAS, WITH_DQ,
                N_DIAG, PRECISION)
        end, skip_at, skip, skip_at2, skip2 = _far_masked_tiles(lo, hi, inner, inner_end, near_lo, near_hi,
                                                                d1, d2)
        dkk, dv, db_lo, db_hi = _dkdv_tiles(
            dkk, dv, db_lo, db_hi, lo, end, skip_at, skip, skip_at2, skip2, d1, d2, bias_future, bias_past,
            kk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, tiles, tile_of, n_near, left_cut, left_of,
            right_cut, right_of, diag, stride_ot, stride_od, Tq, n_rel, left, right, q_off, HEAD, BLOCK_M,
            FAR, HAS_BIAS, WITH_DQ, N_DIAG, PRECISION)
    else:
        if HAS_BIAS:
            dkk, dv, db_lo, db_hi = _dkdv_inner_tiles(
                dkk, dv, db_lo, db_hi, near_lo, near_hi, near_hi, 0, 0.0, 0.0, kk, v, QQ, DO, Lse, Delta, DQQ,
                tiles, tile_of, stride_ot, stride_od, HEAD, BLOCK_M, True, WITH_DQ, False, PRECISION)
        dkk, dv, db_lo, db_hi = _dkdv_tiles(
            dkk, dv, db_lo, db_hi, lo, hi - (inner_end - inner), inner, inner_end - inner, hi, 0, d1, d2, 0.0,
            0.0, kk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, tiles, tile_of, n_near, left_cut, left_of,
            right_cut, right_of, diag, stride_ot, stride_od, Tq, n_rel, left, right, q_off, HEAD, BLOCK_M,
            ANY, HAS_BIAS, WITH_DQ, N_DIAG, PRECISION)
    if WITH_DQ and HAS_BIAS:
        near_end = d1 + tl.cdiv(d2 - d1, BLOCK_M) * BLOCK_M  # the NEAR tiles' queries: [d1, near_end)
        bias_sums = DBias + (pid_bh * n_tiles + pid_n) * (2 * n_rel - 1)
        _store_diagonal_sums(bias_sums, diag, kpos - q_off, d1, near_end, n_rel, 1, N_DIAG)
        _store_bias_sums(bias_sums, db_lo, db_hi, n_rel)

    out_offs, out_mask = _tile_rows(pid_bh * Tk + pid_n * BLOCK_N, Tk - pid_n * BLOCK_N, BLOCK_N, HEAD)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=out_mask)
    tl.store(DKK + out_offs, dkk, mask=out_mask)


@triton.jit
def _attn_bwd_unrope_kernel(
    K, W, S, DKK, DK, G, stride_kb, stride_kh, stride_kt, stride_kd, H, Tk, k_off, n_tiles,
    HEAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """dk and the angle partial G[tile] of one (BLOCK) key tile from d(a_k, b_k) (DKK, fp32)."""
    HALF: tl.constexpr = HEAD // 2
    pid_n, pid_bh = _tile_and_head(n_tiles)
    tile = pid_bh * n_tiles + pid_n
    b = pid_bh // H
    hd = pid_bh % H
    s = tl.load(S).to(tl.float32)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    kpos = k_off + cols
    kcos, ksin = _rope_angles(kpos, s, W, HALF)
    k1, k2 = _load_pairs(K + b * stride_kb + hd * stride_kh, cols, cols < Tk, stride_kt, stride_kd, HALF)
    offs = pid_bh * Tk * HEAD + cols[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    dak = tl.load(DKK + offs, mask=cols[:, None] < Tk, other=0.0)
    dbk = tl.load(DKK + offs + HALF, mask=cols[:, None] < Tk, other=0.0)
    dk1, dk2 = _unrope_store(dak, dbk, kcos, ksin, DK + pid_bh * Tk * HEAD, cols, Tk, HEAD)
    _store_angle_partial(k1, k2, dk1, dk2, kpos, G, tile)
