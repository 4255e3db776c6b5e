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
    FUTURE,
    NEAR,
    NO_BIAS,
    PAST,
    _bias_row_sums,
    _bias_tile,
    _biased_exp,
    _head_bias_tiles,
    _key_ok,
    _load_full,
    _load_pairs,
    _near_bias,
    _rope_angles,
    _split_regions,
    _store_bias_sums,
    _store_diagonal_sums,
    _tile_and_head,
    _unrope_store,
)


@triton.jit
def _add_dq(ds_t, kk, DQQ, rows, mask, HEAD: tl.constexpr, PRECISION: tl.constexpr):
    """DQQ[rows] += dS [a_k | b_k]: one key tile's share of a query tile's d(q''_A, q''_B), fp32 rows
    [A | B]. Only this program adds to these rows (_attn_bwd_dkdv_kernel): no atomics."""
    offs = rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(DQQ + offs, tl.dot(tl.trans(ds_t), kk, tl.load(DQQ + offs, mask=mask), input_precision=PRECISION),
             mask=mask)


@triton.jit
def _dkdv_tiles(
    dkk, dv, db_lo, db_hi, lo, hi, kk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ,
    Bias, stride_br, head_off, n_rel, Tiles, tile_of, Diag, stride_ot, stride_od, Tq, left, right, q_off,
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, REGION: tl.constexpr,
    WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate dk (as d(a_k, b_k)) and dv over the query tiles lo, lo + BLOCK_M, ... < hi; WITH_DQ
    also add each query tile's share of d(q'') (_add_dq) and sum dS into the bias table's rows per
    key (_bias_row_sums).

    Tiles are kept transposed, (keys, queries), as in Triton's fused-attention tutorial: every
    transpose then falls on a tl.dot's second operand, which goes through shared memory anyway.
    QQ, Lse, Delta and DQQ point at this (batch, head)'s rows. A NEAR tile's bias is the tile
    of this head's table of (keys, queries) tiles at offset tile_of - start (_near_bias).
    """
    DT = kk.dtype
    dims = tl.arange(0, HEAD)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        qpos = q_off + rows
        qq = tl.load(QQ + rows[:, None] * HEAD + dims[None, :], mask=rows[:, None] < Tq, other=0.0)
        logits_t = tl.dot(kk, tl.trans(qq), input_precision=PRECISION)
        rel_t = qpos[None, :] - kpos[:, None]  # i - j
        keep_t = (rel_t <= left) & (rel_t >= -right) & key_ok[:, None]
        if REGION == NEAR:
            bias = _near_bias(Tiles, tile_of, start, kk.shape[0], BLOCK_M)
        else:
            bias = _bias_tile(rel_t, Bias, stride_br, head_off, n_rel, REGION)
        lse = tl.load(Lse + rows, mask=rows < Tq, other=float("inf"))
        p_t = tl.where(keep_t, _biased_exp(logits_t, bias, lse[None, :]), 0.0)
        do = _load_full(DO, rows, rows < Tq, stride_ot, stride_od, HEAD).to(DT)
        dv = tl.dot(p_t.to(DT), do, dv, input_precision=PRECISION)
        delta = tl.load(Delta + rows, mask=rows < Tq, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if WITH_DQ:
            db_lo, db_hi = _bias_row_sums(ds_t, db_lo, db_hi, rel_t, Diag, n_rel, REGION, N_DIAG)
        ds_t = ds_t.to(DT)
        dkk = tl.dot(ds_t, qq, dkk, input_precision=PRECISION)
        if WITH_DQ:
            _add_dq(ds_t, kk, DQQ, rows, rows[:, None] < Tq, HEAD, PRECISION)
    return dkk, dv, db_lo, db_hi


@triton.jit
def _dkdv_inner_tiles(
    dkk, dv, db, lo, hi, kk, v, QQ, DO, Lse, Delta, DQQ, bias_c, Tiles, tile_of, stride_ot, stride_od,
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, REGION: tl.constexpr, WITH_DQ: tl.constexpr,
    SUM_DS: tl.constexpr, PRECISION: tl.constexpr,
):
    """_dkdv_tiles for whole query tiles that see every key of the tile (inside the band, keys not
    padded): no mask. The bias: in a NEAR region each tile's from the table (_near_bias); in the
    others the region's one value bias_c (0 without a table), folded into the exponent. WITH_DQ and
    SUM_DS: add dS's row sums (per key) to db (never a NEAR region's, whose sums go along diagonals)."""
    DT = kk.dtype
    dims = tl.arange(0, HEAD)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        qq = tl.load(QQ + rows[:, None] * HEAD + dims[None, :])
        logits_t = tl.dot(kk, tl.trans(qq), input_precision=PRECISION)
        lse = tl.load(Lse + rows)
        if REGION == NEAR:
            bias = _near_bias(Tiles, tile_of, start, kk.shape[0], BLOCK_M)
        else:
            bias = bias_c
        p_t = _biased_exp(logits_t, bias, lse[None, :])
        do = tl.load(DO + rows[:, None] * stride_ot + dims[None, :] * stride_od).to(DT)
        dv = tl.dot(p_t.to(DT), do, dv, input_precision=PRECISION)
        delta = tl.load(Delta + rows)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if WITH_DQ:
            if SUM_DS:
                db += tl.sum(ds_t, 1)
        ds_t = ds_t.to(DT)
        dkk = tl.dot(ds_t, qq, dkk, input_precision=PRECISION)
        if WITH_DQ:
            _add_dq(ds_t, kk, DQQ, rows, None, HEAD, PRECISION)
    return dkk, dv, db


@triton.jit
def _dkdv_region(
    dkk, dv, db_lo, db_hi, lo, hi, inner_lo, inner_hi, kk, v, kpos, key_ok, QQ, DO, Lse, Delta,
    DQQ, Bias, stride_br, head_off, n_rel, Tiles, tile_of, Diag, stride_ot, stride_od, Tq, left, right, q_off,
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, REGION: tl.constexpr,
    WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """The query tiles lo, ... < hi of one region, as the forward stages them: [inner_lo, inner_hi)
    (starts on lo's grid) by the loop with no mask, the edges by the masked one; a NEAR tile's bias from
    the table. WITH_DQ, a PAST tile's dS sums go to the last row of dbias (db_hi), a FUTURE one's to the
    first, and every NEAR tile takes the masked loop, as in the dq pass, which also stores its pairs on
    the bias table's inner rows (_bias_row_sums)."""
    if REGION == NEAR and WITH_DQ:
        dkk, dv, db_lo, db_hi = _dkdv_tiles(
            dkk, dv, db_lo, db_hi, lo, hi, kk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, Bias,
            stride_br, head_off, n_rel, Tiles, tile_of, Diag, stride_ot, stride_od, Tq, left, right, q_off, HEAD,
            BLOCK_M, REGION, WITH_DQ, N_DIAG, PRECISION)
    else:
        a = tl.minimum(tl.maximum(inner_lo, lo), hi)
        b = tl.maximum(tl.minimum(inner_hi, hi), a)
        dkk, dv, db_lo, db_hi = _dkdv_tiles(
            dkk, dv, db_lo, db_hi, lo, a, kk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, Bias,
            stride_br, head_off, n_rel, Tiles, tile_of, Diag, stride_ot, stride_od, Tq, left, right, q_off, HEAD,
            BLOCK_M, REGION, WITH_DQ, N_DIAG, PRECISION)
        if REGION == NEAR:
            bias_c = 0.0  # each tile's bias comes from the table
        else:
            bias_c = _bias_tile(0, Bias, stride_br, head_off, n_rel, REGION)
        if REGION == PAST:
            dkk, dv, db_hi = _dkdv_inner_tiles(
                dkk, dv, db_hi, a, b, kk, v, QQ, DO, Lse, Delta, DQQ, bias_c, Tiles, tile_of, stride_ot,
                stride_od, HEAD, BLOCK_M, REGION, WITH_DQ, True, PRECISION)
        else:
            dkk, dv, db_lo = _dkdv_inner_tiles(
                dkk, dv, db_lo, a, b, kk, v, QQ, DO, Lse, Delta, DQQ, bias_c, Tiles, tile_of, stride_ot,
                stride_od, HEAD, BLOCK_M, REGION, WITH_DQ, REGION == FUTURE, PRECISION)
        dkk, dv, db_lo, db_hi = _dkdv_tiles(
            dkk, dv, db_lo, db_hi, b, hi, kk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, Bias,
            stride_br, head_off, n_rel, Tiles, tile_of, Diag, stride_ot, stride_od, Tq, left, right, q_off, HEAD,
            BLOCK_M, REGION, WITH_DQ, N_DIAG, PRECISION)
    return dkk, dv, db_lo, db_hi


@triton.jit
def _attn_bwd_dkdv_kernel(
    KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, Diag,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, left, right, q_off, k_off, n_tiles, n_groups,
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
                pid_n, pid_bh, KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, Diag,
                stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od, stride_br,
                stride_bh, stride_pb, stride_pt, H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, left, right, q_off,
                k_off, n_tiles, HEAD, HAS_BIAS, HAS_PAD, BLOCK_M, BLOCK_N, WITH_DQ, N_DIAG, PRECISION)
            tl.debug_barrier()  # the next key tile reads the sums this one wrote, maybe in other threads
    else:
        pid_n, pid_bh = _tile_and_head(n_tiles)
        _dkdv_key_tile(
            pid_n, pid_bh, KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, Diag, stride_vb,
            stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od, stride_br, stride_bh,
            stride_pb, stride_pt, H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, left, right, q_off, k_off, n_tiles,
            HEAD, HAS_BIAS, HAS_PAD, BLOCK_M, BLOCK_N, WITH_DQ, N_DIAG, PRECISION)


@triton.jit
def _dkdv_key_tile(
    pid_n, pid_bh, KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, Diag,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, left, right, q_off, k_off, n_tiles,
    HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key tile pid_n (BLOCK_N keys) of head pid_bh: dv, and d(a_k, b_k) in fp32 (DKK, contiguous
    rows [A | B]), which _attn_bwd_unrope_kernel turns into dk and the angle partials: undoing RoPE
    needs the key angles again, and their sines are not worth registers next to the accumulators.
    KK: RoPE(k) as the rotation pass (rotated_rows) writes it, (B, H, Tk, h) contiguous in the dot type.
    WITH_DQ (the dq pass then does not run), also: d(q''_A, q''_B) added to DQQ (this head's rows),
    and this tile's share of dbias, DBias[tile] (as the dq kernel writes a query tile's).
    Tiles: with HAS_BIAS, (H, n_bias_tiles, BLOCK_N, BLOCK_M) fp32, the NEAR tiles' bias as (keys,
    queries) tiles (kernels.attention.near_bias_tiles of the reversed table), the tile t at
    j - i = first_bias_tile + t min(BLOCK_M, BLOCK_N) in its top-left entry. Diag: WITH_DQ and
    HAS_BIAS, (B H n_tiles, BLOCK_N, N_DIAG) fp32, where each key tile stores its NEAR tiles' inner-row
    pairs of dS (_bias_row_sums).
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
    key_ok = _key_ok(cols, Tk, Pad, b * stride_pb, stride_pt, HAS_PAD)  # padding belongs to the key
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
    if HAS_BIAS:
        # seen from a key tile, the FUTURE query tiles come first and the PAST ones last
        d1, d2 = _split_regions(lo, hi, first - n_rel + 2 - q_off - BLOCK_M, first + BLOCK_N + n_rel - 2 - q_off,
                                BLOCK_M)
        # the NEAR tiles' offsets j - i at their top-left entries are first - q_off - start: the table's
        # tiles are (keys, queries), the tile t at j - i = first_bias_tile + t min(BLOCK_M, BLOCK_N)
        tiles = _head_bias_tiles(Tiles, hd, n_bias_tiles, BLOCK_N, BLOCK_M)
        tile_of = first - q_off - first_bias_tile
        diag = Diag + (pid_bh * n_tiles + pid_n) * (BLOCK_N * N_DIAG)  # WITH_DQ: this tile's inner-row pairs
        dkk, dv, db_lo, db_hi = _dkdv_region(
            dkk, dv, db_lo, db_hi, lo, d1, inner_lo, inner_hi, kk, v, kpos, key_ok, QQ, DO, Lse,
            Delta, DQQ, Bias, stride_br, head_off, n_rel, tiles, tile_of, diag, stride_ot, stride_od, Tq, left, right,
            q_off, HEAD, BLOCK_M, FUTURE, WITH_DQ, N_DIAG, PRECISION)
        dkk, dv, db_lo, db_hi = _dkdv_region(
            dkk, dv, db_lo, db_hi, d1, d2, inner_lo, inner_hi, kk, v, kpos, key_ok, QQ, DO, Lse,
            Delta, DQQ, Bias, stride_br, head_off, n_rel, tiles, tile_of, diag, stride_ot, stride_od, Tq, left, right,
            q_off, HEAD, BLOCK_M, NEAR, WITH_DQ, N_DIAG, PRECISION)
        if WITH_DQ:
            near_end = d1 + tl.cdiv(d2 - d1, BLOCK_M) * BLOCK_M  # the NEAR tiles' queries: [d1, near_end)
            _store_diagonal_sums(DBias + (pid_bh * n_tiles + pid_n) * (2 * n_rel - 1), diag, kpos - q_off, d1,
                                 near_end, n_rel, 1, N_DIAG)
        dkk, dv, db_lo, db_hi = _dkdv_region(
            dkk, dv, db_lo, db_hi, d2, hi, inner_lo, inner_hi, kk, v, kpos, key_ok, QQ, DO, Lse,
            Delta, DQQ, Bias, stride_br, head_off, n_rel, tiles, tile_of, diag, stride_ot, stride_od, Tq, left, right,
            q_off, HEAD, BLOCK_M, PAST, WITH_DQ, N_DIAG, PRECISION)
        if WITH_DQ:
            _store_bias_sums(DBias + (pid_bh * n_tiles + pid_n) * (2 * n_rel - 1), db_lo, db_hi, n_rel)
    else:
        dkk, dv, db_lo, db_hi = _dkdv_region(
            dkk, dv, db_lo, db_hi, lo, hi, inner_lo, inner_hi, kk, v, kpos, key_ok, QQ, DO, Lse,
            Delta, DQQ, Bias, stride_br, head_off, n_rel, Tiles, 0, Diag, stride_ot, stride_od, Tq, left, right, q_off,
            HEAD, BLOCK_M, NO_BIAS, WITH_DQ, N_DIAG, PRECISION)

    # Offsets from the tile's first row, not the loads' above, which would then stay in registers
    # through every loop (spilled, on sm_90).
    local = tl.arange(0, BLOCK_N)[:, None]
    out_offs = (pid_bh * Tk + pid_n * BLOCK_N) * HEAD + local * HEAD + tl.arange(0, HEAD)[None, :]
    out_mask = local < Tk - pid_n * BLOCK_N
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
    y1, y2 = _load_pairs(K + b * stride_kb + hd * stride_kh, cols, cols < Tk, stride_kt, stride_kd, HALF)
    ak = y1 * kcos - y2 * ksin
    bk = y1 * ksin + y2 * kcos
    offs = pid_bh * Tk * HEAD + cols[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    dak = tl.load(DKK + offs, mask=cols[:, None] < Tk, other=0.0)
    dbk = tl.load(DKK + offs + HALF, mask=cols[:, None] < Tk, other=0.0)
    _unrope_store(dak, dbk, ak, bk, kcos, ksin, kpos, DK + pid_bh * Tk * HEAD, cols, Tk, G, tile, HEAD)
