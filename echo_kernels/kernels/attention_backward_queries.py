"""Fused Echo attention, backward: the passes over query tiles (the notation, and how the passes fit
together: echo_kernels.kernels.attention_backward, which launches them).

    delta     per query tile: D = rowsum(O dO)
    dq        per query tile, looping over the key tiles the band reaches: d(q''_A, q''_B) and the
              tile's share of dbias
    unrotate  a few programs per (batch, head): dq from d(q'') (through P~ and RoPE), the queries'
              angle partials and dP~ partials
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import (
    FAR,
    NEAR,
    _bias_row_sums,
    _biased_exp,
    _far_masked_tiles,
    _head_bias_tiles,
    _in_band,
    _key_ok,
    _load_full,
    _load_p,
    _load_pairs,
    _near_bias,
    _query_tile_stages,
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
def _attn_bwd_delta_kernel(O, DO, Delta, stride_ob, stride_oh, stride_ot, stride_od,
                           stride_db, stride_dh, stride_dt, stride_dd, H, T, n_tiles,
                           HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """Per query row: Delta[bh, t] = sum_d O[t, d] dO[t, d], the softmax correction."""
    pid_m, pid_bh = _tile_and_head(n_tiles)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    b = pid_bh // H
    hd = pid_bh % H
    o = _load_full(O + b * stride_ob + hd * stride_oh, rows, rows < T, stride_ot, stride_od, HEAD)
    do = _load_full(DO + b * stride_db + hd * stride_dh, rows, rows < T, stride_dt, stride_dd, HEAD)
    tl.store(Delta + pid_bh * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _dq_tiles(
    dqq, db_lo, db_hi, lo, hi, skip_at, skip, skip_at2, skip2, d1, bias_past, bias_future, qq, qpos, do, lse,
    delta, KK, V, Tiles, tile_of, Diag, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, n_rel, left, right,
    k_off, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, REGION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PAD: tl.constexpr, PAD_TILES: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate d(q''_A, q''_B) and the bias table's sums of dS over key tiles, masked: starts lo,
    lo + BLOCK_N, ... < hi, moved on by skip from skip_at and then by skip2 from skip_at2 (_skip).
    KK: this head's RoPE(k) rows [a | b] as the forward computed them, contiguous, in the dot type.
    REGION NEAR: the NEAR tiles, each one's bias the tile of this head's table at offset tile_of - start
    (_near_bias), its dS summed per query row into the end rows' (db_lo, db_hi) and its inner rows' pairs
    stored at Diag (_bias_row_sums). FAR: tiles of either far side, the bias one value, bias_past before
    d1 and bias_future after, and dS's row sums to the last row (db_hi) and the first (db_lo) likewise."""
    DT = qq.dtype
    dims = tl.arange(0, HEAD)
    for tile_start in range(lo, hi, BLOCK_N):
        start = _skip(_skip(tile_start, skip_at, skip), skip_at2, skip2)
        past = start < d1
        cols = start + tl.arange(0, BLOCK_N)
        # A padded key's k and v meet ds = p = 0 in the products below, and 0 * NaN is NaN: zeroed after
        # the loads, whose masks then do not wait on the padding's (that costs the pipelined loop registers).
        # Keys past Tk the loads' masks zero already; v in its own dtype, not through fp32.
        key_ok = _key_ok(cols, Tk, Pad, pad_off, stride_pt, HAS_PAD, PAD_TILES)
        kk = tl.load(KK + cols[:, None] * HEAD + dims[None, :], mask=cols[:, None] < Tk, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd, mask=cols[:, None] < Tk,
                    other=0.0)
        if HAS_PAD:
            kk = tl.where(key_ok[:, None], kk, 0.0)
            v = tl.where(key_ok[:, None], v, 0.0)
        kk, v = kk.to(DT), v.to(DT)
        logits = tl.dot(qq, tl.trans(kk), input_precision=PRECISION)
        rel = (qpos - k_off)[:, None] - cols[None, :]  # i - j, as the forward's rel
        keep = _in_band(rel, left, right) & key_ok[None, :]
        if REGION == NEAR:
            bias = _near_bias(Tiles, tile_of, start, qq.shape[0], BLOCK_N)
        else:
            bias = tl.where(past, bias_past, bias_future)
        p = tl.where(keep, _biased_exp(logits, bias, lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if REGION == NEAR:
            db_lo, db_hi = _bias_row_sums(ds, db_lo, db_hi, rel, Diag, n_rel, N_DIAG)
        elif HAS_BIAS:
            db_lo, db_hi = _side_sums(tl.sum(ds, 1), db_lo, db_hi, past)
        dqq = tl.dot(ds.to(DT), kk, dqq, input_precision=PRECISION)
    return dqq, db_lo, db_hi


@triton.jit
def _dq_inner_tiles(
    dqq, db_lo, db_hi, lo, hi, skip_at, skip, bias_past, bias_future, qq, do, lse, delta, KK, V,
    stride_vt, stride_vd,
    HEAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """_dq_tiles for the far key tiles wholly inside the band, before Tk and before any padded key, of
    both sides: no mask. Starts lo, lo + BLOCK_N, ... < hi, moved on by skip from skip_at (past the NEAR
    tiles). The bias is one value per tile, bias_past before skip_at and bias_future from it (0 without a
    table), folded into the exponent; with HAS_BIAS, dS's row sums go to the table's last row (db_hi) and
    its first (db_lo) likewise."""
    DT = qq.dtype
    dims = tl.arange(0, HEAD)
    for tile_start in range(lo, hi, BLOCK_N):
        past = tile_start < skip_at
        cols = _skip(tile_start, skip_at, skip) + tl.arange(0, BLOCK_N)
        kk = tl.load(KK + cols[:, None] * HEAD + dims[None, :])
        logits = tl.dot(qq, tl.trans(kk), input_precision=PRECISION)
        p = _biased_exp(logits, tl.where(past, bias_past, bias_future), lse[:, None])
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd).to(DT)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_BIAS:
            db_lo, db_hi = _side_sums(tl.sum(ds, 1), db_lo, db_hi, past)
        dqq = tl.dot(ds.to(DT), kk, dqq, input_precision=PRECISION)
    return dqq, db_lo, db_hi


@triton.jit
def _attn_bwd_dq_kernel(
    KK, V, DO, QQ, Bias, Tiles, Pad, PadStart, Lse, Delta, DQQ, DBias, Diag,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, n_bias_tiles, first_bias_tile, left, right, q_off, k_off, n_tiles,
    HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, PAD_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M) query tile: d(q''_A, q''_B) in the dot type (DQQ, contiguous rows [A | B]) and
    this tile's share of dbias, DBias[tile, r] = sum of its dS over the pairs with clamp(i - j) + n - 1
    = r (N_DIAG: a power of two at least 2n - 3, the inner rows). Going back through P~ and RoPE, and
    the dP~ partials, are _attn_bwd_dq_unrotate_kernel's: the loop over key tiles keeps only q'', dO
    and the dq'' accumulators in registers. KK: RoPE(k) as the rotation pass (rotated_rows) writes it,
    (B, H, Tk, h) contiguous in the dot type. Tiles: with HAS_BIAS, (H, n_bias_tiles, BLOCK_M, BLOCK_N)
    fp32, the NEAR tiles' bias (kernels.attention_operands.near_bias_tiles), the tile t at
    i - j = first_bias_tile + t min(BLOCK_M, BLOCK_N) in its top-left entry. Diag: with HAS_BIAS,
    (programs, BLOCK_M, N_DIAG) fp32, where each program stores its NEAR tiles' inner-row pairs of dS
    (_bias_row_sums)."""
    DT = QQ.dtype.element_ty
    pid_m, pid_bh = _tile_and_head(n_tiles)
    tile = pid_bh * n_tiles + pid_m
    b = pid_bh // H
    hd = pid_bh % H
    KK += pid_bh * Tk * HEAD
    V += b * stride_vb + hd * stride_vh
    DO += b * stride_ob + hd * stride_oh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qpos = q_off + rows
    q_first = q_off + pid_m * BLOCK_M
    # q'' from the rotation pass: rows [q''_A | q''_B], which multiply RoPE(k)'s [a | b] in one product
    q_offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    qq = tl.load(QQ + q_offs, mask=rows[:, None] < Tq, other=0.0)
    do = _load_full(DO, rows, rows < Tq, stride_ot, stride_od, HEAD).to(DT)
    lse = tl.load(Lse + pid_bh * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Tq + rows, mask=rows < Tq, other=0.0)
    dqq = tl.zeros([BLOCK_M, HEAD], tl.float32)
    db_lo = tl.zeros([BLOCK_M], tl.float32)
    db_hi = tl.zeros([BLOCK_M], tl.float32)

    # the key tiles as the forward deals them: the NEAR ones start in [d1, d2), PAST ones before, FUTURE
    # ones after; no mask can bite those in [inner, inner_end)
    lo, hi, d1, d2, inner, inner_end, near_lo, near_hi, bias_past, bias_future = _query_tile_stages(
        pid_m * BLOCK_M, q_off, k_off, left, right, Tk, PadStart + b, Bias, stride_br, hd * stride_bh, n_rel,
        QQ.dtype.element_ty, HAS_PAD, HAS_BIAS, BLOCK_M, BLOCK_N)
    # Three loops, as the forward's, so that the kernel's code stays small: the unmasked far tiles of both
    # sides, every NEAR tile (masked: it stores its pairs on the bias table's inner rows for
    # _store_diagonal_sums), then the far tiles that masks can bite, the band's edges.
    dqq, db_lo, db_hi = _dq_inner_tiles(
        dqq, db_lo, db_hi, inner, inner_end - (near_hi - near_lo), near_lo, near_hi - near_lo, bias_past,
        bias_future, qq, do, lse, delta, KK, V, stride_vt, stride_vd, HEAD, BLOCK_N, HAS_BIAS, PRECISION)
    diag = Diag + tile * (BLOCK_M * N_DIAG)
    pad_off = b * stride_pb
    if HAS_BIAS:
        tiles = _head_bias_tiles(Tiles, hd, n_bias_tiles, BLOCK_M, BLOCK_N)
        dqq, db_lo, db_hi = _dq_tiles(
            dqq, db_lo, db_hi, d1, d2, d2, 0, d2, 0, d1, 0.0, 0.0, qq, qpos, do, lse, delta, KK, V, tiles,
            q_first - k_off - first_bias_tile, diag, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, n_rel,
            left, right, k_off, HEAD, BLOCK_N, NEAR, HAS_BIAS, HAS_PAD, PAD_TILES, N_DIAG, PRECISION)
    end, skip_at, skip, skip_at2, skip2 = _far_masked_tiles(lo, hi, inner, inner_end, near_lo, near_hi,
                                                            d1, d2)
    dqq, db_lo, db_hi = _dq_tiles(
        dqq, db_lo, db_hi, lo, end, skip_at, skip, skip_at2, skip2, d1, bias_past, bias_future, qq, qpos, do,
        lse, delta, KK, V, Tiles, 0, diag, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, n_rel, left,
        right, k_off, HEAD, BLOCK_N, FAR, HAS_BIAS, HAS_PAD, PAD_TILES, N_DIAG, PRECISION)
    # dq'' first: with its accumulator stored, the diagonal sums' loads take the registers it held
    _store_dqq(DQQ, dqq, pid_bh, pid_m, Tq, HEAD, BLOCK_M)
    if HAS_BIAS:
        _store_bias_sums(DBias + tile * (2 * n_rel - 1), db_lo, db_hi, n_rel)
        near_end = d1 + tl.cdiv(d2 - d1, BLOCK_N) * BLOCK_N  # the NEAR tiles' keys: [d1, near_end)
        _store_diagonal_sums(DBias + tile * (2 * n_rel - 1), diag, qpos - k_off, d1, near_end, n_rel, -1,
                             N_DIAG)


@triton.jit
def _store_dqq(DQQ, dqq, pid_bh, pid_m, Tq, HEAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query tile pid_m's d(q''_A, q''_B) into DQQ's rows, rounded to the dot type here, as the products
    with P~^T and [a b]^T take it anyway."""
    offs, mask = _tile_rows(pid_bh * Tq + pid_m * BLOCK_M, Tq - pid_m * BLOCK_M, BLOCK_M, HEAD)
    tl.store(DQQ + offs, dqq.to(DQQ.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_unrotate_kernel(
    Q, P, W, S, DQQ, DQ, G, DP,
    stride_qb, stride_qh, stride_qt, stride_qd,
    H, Tq, q_off, scale, n_groups,
    HEAD: tl.constexpr, HAS_P: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    """Query tiles pid_m, pid_m + n_groups, ... of one (batch, head): dq and the angle partial per
    tile from d(q''_A, q''_B) (DQQ), and one partial of dP~ for the program.

    dP~ is an (h, h) sum over every query; one partial per tile would take more memory than dq
    itself, so the launcher gives each (batch, head) just enough programs to fill the GPU and each
    program sums its tiles' shares on chip. Q: with P, the rows [a | b] = RoPE(q) in the dot type (the
    rotation pass's, so dP~ multiplies the very rows q'' came from, and this pass computes the sines
    and cosines once, for dq: rotating q here as well had Triton 3.6 recompute them in each layout that
    read them, and spill); without P, q itself, d(a, b) = d(q'') * scale and there is no dP~ (DP is
    not written).
    """
    HALF: tl.constexpr = HEAD // 2
    pid_m, pid_bh = _tile_and_head(n_groups)
    prog = pid_bh * n_groups + pid_m
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    b = pid_bh // H
    hd = pid_bh % H
    Q += b * stride_qb + hd * stride_qh
    s = tl.load(S).to(tl.float32)

    if HAS_P:
        p_aa, p_ab, p_ba, p_bb = _load_p(P, HALF)
        dp_aa = tl.zeros([HALF, HALF], tl.float32)
        dp_ab = tl.zeros([HALF, HALF], tl.float32)
        dp_ba = tl.zeros([HALF, HALF], tl.float32)
        dp_bb = tl.zeros([HALF, HALF], tl.float32)
    half = tl.arange(0, HALF)
    for m in range(pid_m, n_tiles, n_groups):
        tile = pid_bh * n_tiles + m
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        qpos = q_off + rows
        mask = rows[:, None] < Tq
        cos, sin = _rope_angles(qpos, s, W, HALF)
        if HAS_P:
            q_offs = rows[:, None] * stride_qt + half[None, :] * stride_qd
            u1 = tl.load(Q + q_offs, mask=mask, other=0.0)
            u2 = tl.load(Q + q_offs + HALF * stride_qd, mask=mask, other=0.0)
        else:
            u1, u2 = _load_pairs(Q, rows, rows < Tq, stride_qt, stride_qd, HALF)
        offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + half[None, :]
        dqa = tl.load(DQQ + offs, mask=mask, other=0.0)
        dqb = tl.load(DQQ + offs + HALF, mask=mask, other=0.0)

        # q''_A = a P~_AA + b P~_BA and q''_B = a P~_AB + b P~_BB, so d(a, b) = d(q''_A, q''_B) P~^T.
        if not HAS_P:
            da = dqa.to(tl.float32) * scale
            db = dqb.to(tl.float32) * scale
        elif HALF >= 64:
            # Transposed: P~'s blocks are then the first operands, which mma.sync spreads over the
            # warps rather than copying whole into each (sm_80); 64 rows still suit wgmma.
            dqa_t = tl.trans(dqa)
            dqb_t = tl.trans(dqb)
            da = tl.dot(p_aa, dqa_t, input_precision=PRECISION)
            da = tl.trans(tl.dot(p_ab, dqb_t, da, input_precision=PRECISION))
            db = tl.dot(p_ba, dqa_t, input_precision=PRECISION)
            db = tl.trans(tl.dot(p_bb, dqb_t, db, input_precision=PRECISION))
        else:
            da = tl.dot(dqa, tl.trans(p_aa), input_precision=PRECISION)
            da = tl.dot(dqb, tl.trans(p_ab), da, input_precision=PRECISION)
            db = tl.dot(dqa, tl.trans(p_ba), input_precision=PRECISION)
            db = tl.dot(dqb, tl.trans(p_bb), db, input_precision=PRECISION)
        dx1, dx2 = _unrope_store(da, db, cos, sin, DQ + pid_bh * Tq * HEAD, rows, Tq, HEAD)

        if HAS_P:  # (u1, u2) = (a, b): this tile's share of dP~ = [a b]^T [dq''_A dq''_B]
            _store_angle_partial(u1.to(tl.float32), u2.to(tl.float32), da, db, qpos, G, tile)
            a_t = tl.trans(u1)
            b_t = tl.trans(u2)
            dp_aa = tl.dot(a_t, dqa, dp_aa, input_precision=PRECISION)
            dp_ab = tl.dot(a_t, dqb, dp_ab, input_precision=PRECISION)
            dp_ba = tl.dot(b_t, dqa, dp_ba, input_precision=PRECISION)
            dp_bb = tl.dot(b_t, dqb, dp_bb, input_precision=PRECISION)
        else:  # (u1, u2) = (x1, x2)
            _store_angle_partial(u1, u2, dx1, dx2, qpos, G, tile)

    if HAS_P:
        r = tl.arange(0, HALF)[:, None]
        c = tl.arange(0, HALF)[None, :]
        base = DP + prog * HEAD * HEAD
        tl.store(base + r * HEAD + c, dp_aa)
        tl.store(base + r * HEAD + c + HALF, dp_ab)
        tl.store(base + (r + HALF) * HEAD + c, dp_ba)
        tl.store(base + (r + HALF) * HEAD + c + HALF, dp_bb)
