"""Fused Echo attention, backward: dq, dk, dv, dM, ds, dw and dbias without a T x T tensor.

Notation of the forward (echo_kernels.kernels.attention): a, b = RoPE halves, q'' = [a_q b_q] @ P~
(P~ = permuted M M^T / sqrt(h); without M, P~ = I / sqrt(h) and no product is made with it),
logits = q''_A a_k^T + q''_B b_k^T + bias, p = exp(logits - lse).
With D_i = sum_d dO_id O_id, the score gradient is dS = p * (dO v^T - D), and

    dv = p^T dO,    d(a_k, b_k) = dS^T (q''_A, q''_B),    d(q''_A, q''_B) = dS (a_k, b_k)
    d(a_q, b_q) = d(q''_A, q''_B) P~^T,    dP~ = [a_q b_q]^T d(q''_A, q''_B)
    dbias[r, head] = sum of dS over the pairs with clamp(i - j) + n - 1 = r

The passes, in launch order:

    delta      per query row: D, and q'' = RoPE(q) @ P~ in the dot type (written once, read by every
               pass below instead of each tile rotating and multiplying its queries again)
    RoPE(k)    per key tile: RoPE(k) in the dot type, by the forward's own pass and tiles
               (echo_kernels.kernels.attention.rotated_keys), so every pass below multiplies the very
               k' the forward's probabilities came from, loading contiguous key rows
    dkdv       per key tile, looping over the query tiles the band reaches: dv and d(a_k, b_k) (fp32)
    unrope     per key tile: dk from d(a_k, b_k) (undoing RoPE) and the keys' angle partials
    dq         per query tile, looping over the key tiles: d(q''_A, q''_B) and the tile's share of dbias
    unrotate   a few programs per (batch, head), each over several query tiles: d(a_q, b_q) =
               d(q'') P~^T, dq (undoing RoPE), the queries' angle partials, one dP~ partial per program
               (without M: one program per tile, d(a_q, b_q) = d(q'') / sqrt(h), no dP~ at all)

dkdv and dq recompute the logits tile by tile, as flash attention does, and hold only their
accumulators and the operands of the tile at hand: the RoPE undo, the angles and the (h, h) dP~ sums
live in the light passes, which keeps every pass free of register spills (python -m
echo_kernels.aot). dphi = a db - b da gives the gradient of the angles phi = s * pos * w.

dbias is summed where dS already is, in the dq kernel's loop, split by where the clamp sends the
pairs. The two end rows (|i - j| >= n - 1: nearly every pair) are row sums of dS. The 2n - 3 inner
rows are single diagonals i - j = const, which only the tiles straddling the diagonal (NEAR) hold:
each such tile is skewed by a gather along its keys so that every diagonal becomes a column, and one
sum over its queries gives all of them.

The dq pass recomputes the logits, p and dP that dkdv already had: seven products in all, exp twice.
Where DQ_IN_KEY_PASS says so, dkdv sums dq and dbias itself and the dq pass does not run (five
products, exp once): each program takes the key tiles of one (batch, head) in turn (a group of them,
when there are fewer heads than multiprocessors), adds each tile's d(q'') shares to its own fp32 sum of
the head's queries, and the launcher adds the groups' sums in order. Flash attention's one-pass
backward adds dq with float atomics instead, in whatever order the programs reach them.

Everything that sums over tiles is written as per-program partials and reduced by torch.sum in a
fixed order: dbias, dP~ and the angle gradients. No float atomics, so the same inputs give the same
bits every run.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from . import ATTENTION_HEAD_WIDTHS, ECHO_MAX_REL_DIST
from .attention import default_blocks as forward_blocks
from .attention import first_padded_key, rotated_keys
from .attention_common import (
    FUTURE,
    LOG2E,
    NEAR,
    NO_BIAS,
    PAST,
    _bias_arg,
    _bias_tile,
    _inner_keys,
    _key_ok,
    _key_range,
    _load_full,
    _load_p,
    _load_pairs,
    _pad_arg,
    _rope_angles,
    _split_regions,
    _tile_and_head,
    layout_perm,
    p_arg,
    precision,
    tile_arch,
    with_override,
)
from .spec import KernelSpec, signature_of

@triton.jit
def _rotated_q(Q, rows, Tq, stride_qt, stride_qd, cos, sin, p_aa, p_ab, p_ba, p_bb,
               HALF: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """RoPE halves of a query tile (fp32) and q''_A, q''_B (dot type); cos, sin of its angles."""
    x1, x2 = _load_pairs(Q, rows, rows < Tq, stride_qt, stride_qd, HALF)
    a = x1 * cos - x2 * sin
    b = x1 * sin + x2 * cos
    qa = tl.dot(a.to(DT), p_aa, input_precision=PRECISION)
    qa = tl.dot(b.to(DT), p_ba, qa, input_precision=PRECISION)
    qb = tl.dot(a.to(DT), p_ab, input_precision=PRECISION)
    qb = tl.dot(b.to(DT), p_bb, qb, input_precision=PRECISION)
    return a, b, qa.to(DT), qb.to(DT)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, Delta, Q, P, W, S, QQ,
                           stride_ob, stride_oh, stride_ot, stride_od, stride_db, stride_dh, stride_dt, stride_dd,
                           stride_qb, stride_qh, stride_qt, stride_qd, H, T, q_off, scale, n_tiles,
                           HEAD: tl.constexpr, HAS_P: tl.constexpr, BLOCK: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Per query row: Delta[bh, t] = sum_d O[t, d] dO[t, d], the softmax correction, and
    q'' = [a_q b_q] @ P~ (or [a_q b_q] * scale without P) in the dot type (QQ, contiguous rows
    [q''_A | q''_B]), which the dk/dv kernel reads for every key tile instead of rotating and
    multiplying the queries again."""
    HALF: tl.constexpr = HEAD // 2
    DT = P.dtype.element_ty
    pid_m, pid_bh = _tile_and_head(n_tiles)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    b = pid_bh // H
    hd = pid_bh % H
    o = _load_full(O + b * stride_ob + hd * stride_oh, rows, rows < T, stride_ot, stride_od, HEAD)
    do = _load_full(DO + b * stride_db + hd * stride_dh, rows, rows < T, stride_dt, stride_dd, HEAD)
    tl.store(Delta + pid_bh * T + rows, tl.sum(o * do, 1), mask=rows < T)

    s = tl.load(S).to(tl.float32)
    cos, sin = _rope_angles(q_off + rows, s, W, HALF)
    Q += b * stride_qb + hd * stride_qh
    if HAS_P:
        p_aa, p_ab, p_ba, p_bb = _load_p(P, HALF)
        _, _, qa, qb = _rotated_q(Q, rows, T, stride_qt, stride_qd, cos, sin, p_aa, p_ab, p_ba, p_bb, HALF, DT,
                                  PRECISION)
    else:
        x1, x2 = _load_pairs(Q, rows, rows < T, stride_qt, stride_qd, HALF)
        qa = ((x1 * cos - x2 * sin) * scale).to(DT)
        qb = ((x1 * sin + x2 * cos) * scale).to(DT)
    offs = pid_bh * T * HEAD + rows[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    tl.store(QQ + offs, qa, mask=rows[:, None] < T)
    tl.store(QQ + offs + HALF, qb, mask=rows[:, None] < T)


@triton.jit
def _unrope_store(dA, dB, a, b, cos, sin, pos, DX, rows, n_rows, G, g_row, HEAD: tl.constexpr):
    """Undo RoPE on (dA, dB): write dx (contiguous rows of HEAD) and the angle partial.

    a = x1 cos - x2 sin, b = x1 sin + x2 cos, so dx1 = dA cos + dB sin, dx2 = dB cos - dA sin and
    dphi = dB a - dA b. G[g_row, m] = sum_t dphi[t, m] pos[t]: phi = (s pos) w gives ds and dw from it.
    """
    HALF: tl.constexpr = HEAD // 2
    cols = tl.arange(0, HALF)
    offs = rows[:, None] * HEAD + (2 * cols)[None, :]
    mask = rows[:, None] < n_rows
    tl.store(DX + offs, (dA * cos + dB * sin).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + offs + 1, (dB * cos - dA * sin).to(DX.dtype.element_ty), mask=mask)
    # A key no query attended has dA = dB = 0 and contributes nothing, even where its k is not finite
    # (a padded key's, say): 0 * NaN would spread to every angle gradient.
    dphi = tl.where((dA == 0.0) & (dB == 0.0), 0.0, dB * a - dA * b)
    tl.store(G + g_row * HALF + cols, tl.sum(dphi * pos.to(tl.float32)[:, None], 0))


@triton.jit
def _bias_row_sums(ds, db_lo, db_hi, db_mid, rel, col0, n_rel, REGION: tl.constexpr, SKEW: tl.constexpr,
                   N_DIAG: tl.constexpr):
    """Add a tile of dS to the bias table's sums, row by row of the tile (queries in the dq pass, keys
    in the dk/dv pass): the end rows' (db_lo, db_hi: the pairs the clamp sends there; with n = 1 both
    are row 0) and, in a NEAR tile, the inner rows' (db_mid[d], table row d + 1: the diagonal
    i - j = d - (n - 2)), summed over the tile's rows.

    The inner rows are single diagonals: the tile is skewed so that diagonal d becomes column d (row
    r's entry of it sits at column col0[r] + SKEW d of the tile), and one sum over the rows gives every
    diagonal's share of the tile. Columns d >= 2n - 3 (N_DIAG rounds up) sum end-row pairs that db_lo
    and db_hi already hold: they are not stored.
    """
    if REGION == PAST:
        db_hi += tl.sum(ds, 1)
    elif REGION == FUTURE:
        db_lo += tl.sum(ds, 1)
    elif REGION == NEAR:
        db_lo += tl.sum(tl.where(rel <= 1 - n_rel, ds, 0.0), 1)
        db_hi += tl.sum(tl.where((rel >= n_rel - 1) & (rel > 1 - n_rel), ds, 0.0), 1)
        col = col0[:, None] + SKEW * tl.arange(0, N_DIAG)[None, :]
        on = (col >= 0) & (col < ds.shape[1])
        # columns off the tile wrap into it (its width is a power of two): a gather's index must be
        # inside, and `on` drops them
        skewed = tl.gather(ds, col & (ds.shape[1] - 1), 1)
        db_mid += tl.sum(tl.where(on, skewed, 0.0), 0)
    return db_lo, db_hi, db_mid


@triton.jit
def _store_bias_sums(DBias, db_lo, db_hi, db_mid, n_rel, N_DIAG: tl.constexpr):
    """One program's share of the (2n - 1)-row bias table's gradient, at DBias (fp32, 2n - 1 values)."""
    n_rows = 2 * n_rel - 1
    diag = tl.arange(0, N_DIAG)
    tl.store(DBias + 1 + diag, db_mid, mask=diag < n_rows - 2)
    db_lo = tl.sum(db_lo, 0)
    db_hi = tl.sum(db_hi, 0)
    # with n = 1 the table is one row, which both ends share
    tl.store(DBias, tl.where(n_rows == 1, db_lo + db_hi, db_lo))
    tl.store(DBias + n_rows - 1, db_hi, mask=n_rows > 1)


@triton.jit
def _add_dq(ds_t, ak, bk, DQQ, rows, mask, HALF: tl.constexpr, HEAD: tl.constexpr, PRECISION: tl.constexpr):
    """DQQ[rows] += dS (a_k, b_k): one key tile's share of a query tile's d(q''_A, q''_B), fp32 rows
    [A | B]. Only this program adds to these rows (_attn_bwd_dkdv_kernel): no atomics."""
    ds = tl.trans(ds_t)
    offs = rows[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    tl.store(DQQ + offs, tl.dot(ds, ak, tl.load(DQQ + offs, mask=mask), input_precision=PRECISION), mask=mask)
    tl.store(DQQ + offs + HALF, tl.dot(ds, bk, tl.load(DQQ + offs + HALF, mask=mask), input_precision=PRECISION),
             mask=mask)


@triton.jit
def _dkdv_tiles(
    dak, dbk, dv, db_lo, db_hi, db_mid, lo, hi, ak, bk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ,
    Bias, stride_br, head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_M: tl.constexpr, REGION: tl.constexpr,
    WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate dk (as d(a_k, b_k)) and dv over the query tiles lo, lo + BLOCK_M, ... < hi; WITH_DQ
    also add each query tile's share of d(q'') (_add_dq) and sum dS into the bias table's rows per
    key (_bias_row_sums).

    Tiles are kept transposed, (keys, queries), as in Triton's fused-attention tutorial: every
    transpose then falls on a tl.dot's second operand, which goes through shared memory anyway.
    QQ, Lse, Delta and DQQ point at this (batch, head)'s rows.
    """
    DT = ak.dtype
    half = tl.arange(0, HALF)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        qpos = q_off + rows
        q_offs = rows[:, None] * HEAD + half[None, :]
        qa = tl.load(QQ + q_offs, mask=rows[:, None] < Tq, other=0.0)
        qb = tl.load(QQ + q_offs + HALF, mask=rows[:, None] < Tq, other=0.0)
        logits_t = tl.dot(ak, tl.trans(qa), input_precision=PRECISION)
        logits_t = tl.dot(bk, tl.trans(qb), logits_t, input_precision=PRECISION)
        rel_t = qpos[None, :] - kpos[:, None]  # i - j
        keep_t = (rel_t <= left) & (rel_t >= -right) & key_ok[:, None]
        logits_t += _bias_tile(rel_t, Bias, stride_br, head_off, n_rel, REGION)
        lse = tl.load(Lse + rows, mask=rows < Tq, other=float("inf"))
        p_t = tl.where(keep_t, tl.exp2((logits_t - lse[None, :]) * LOG2E), 0.0)
        do = _load_full(DO, rows, rows < Tq, stride_ot, stride_od, HEAD).to(DT)
        dv = tl.dot(p_t.to(DT), do, dv, input_precision=PRECISION)
        delta = tl.load(Delta + rows, mask=rows < Tq, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if WITH_DQ:
            db_lo, db_hi, db_mid = _bias_row_sums(ds_t, db_lo, db_hi, db_mid, rel_t, kpos - (q_off + start) - n_rel + 2,
                                                  n_rel, REGION, 1, N_DIAG)
        ds_t = ds_t.to(DT)
        dak = tl.dot(ds_t, qa, dak, input_precision=PRECISION)
        dbk = tl.dot(ds_t, qb, dbk, input_precision=PRECISION)
        if WITH_DQ:
            _add_dq(ds_t, ak, bk, DQQ, rows, rows[:, None] < Tq, HALF, HEAD, PRECISION)
    return dak, dbk, dv, db_lo, db_hi, db_mid


@triton.jit
def _dkdv_inner_tiles(
    dak, dbk, dv, db, lo, hi, ak, bk, v, QQ, DO, Lse, Delta, DQQ, bias_c, stride_ot, stride_od,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_M: tl.constexpr, WITH_DQ: tl.constexpr, SUM_DS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """_dkdv_tiles for whole query tiles that see every key of the tile (inside the band, keys not
    padded): no mask, the region's one bias value bias_c folded into the exponent; WITH_DQ and
    SUM_DS: add dS's row sums (per key) to db."""
    DT = ak.dtype
    half = tl.arange(0, HALF)
    dims = tl.arange(0, HEAD)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_offs = rows[:, None] * HEAD + half[None, :]
        qa = tl.load(QQ + q_offs)
        qb = tl.load(QQ + q_offs + HALF)
        logits_t = tl.dot(ak, tl.trans(qa), input_precision=PRECISION)
        logits_t = tl.dot(bk, tl.trans(qb), logits_t, input_precision=PRECISION)
        lse = tl.load(Lse + rows)
        p_t = tl.exp2(logits_t * LOG2E + ((bias_c - lse) * LOG2E)[None, :])
        do = tl.load(DO + rows[:, None] * stride_ot + dims[None, :] * stride_od).to(DT)
        dv = tl.dot(p_t.to(DT), do, dv, input_precision=PRECISION)
        delta = tl.load(Delta + rows)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if WITH_DQ:
            if SUM_DS:
                db += tl.sum(ds_t, 1)
        ds_t = ds_t.to(DT)
        dak = tl.dot(ds_t, qa, dak, input_precision=PRECISION)
        dbk = tl.dot(ds_t, qb, dbk, input_precision=PRECISION)
        if WITH_DQ:
            _add_dq(ds_t, ak, bk, DQQ, rows, None, HALF, HEAD, PRECISION)
    return dak, dbk, dv, db


@triton.jit
def _dkdv_region(
    dak, dbk, dv, db_lo, db_hi, db_mid, lo, hi, inner_lo, inner_hi, ak, bk, v, kpos, key_ok, QQ, DO, Lse, Delta,
    DQQ, Bias, stride_br, head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_M: tl.constexpr, REGION: tl.constexpr,
    WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """The query tiles lo, ... < hi of one region whose bias is one value (PAST, FUTURE, NO_BIAS):
    [inner_lo, inner_hi) (starts on lo's grid) by the loop with no mask, the edges by the masked one.
    WITH_DQ, a PAST tile's dS sums go to the last row of dbias (db_hi), a FUTURE one's to the first."""
    a = tl.minimum(tl.maximum(inner_lo, lo), hi)
    b = tl.maximum(tl.minimum(inner_hi, hi), a)
    dak, dbk, dv, db_lo, db_hi, db_mid = _dkdv_tiles(
        dak, dbk, dv, db_lo, db_hi, db_mid, lo, a, ak, bk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, Bias, stride_br,
        head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off, HALF, HEAD, BLOCK_M, REGION, WITH_DQ, N_DIAG,
        PRECISION)
    bias_c = _bias_tile(0, Bias, stride_br, head_off, n_rel, REGION)
    if REGION == PAST:
        dak, dbk, dv, db_hi = _dkdv_inner_tiles(
            dak, dbk, dv, db_hi, a, b, ak, bk, v, QQ, DO, Lse, Delta, DQQ, bias_c, stride_ot, stride_od, HALF, HEAD,
            BLOCK_M, WITH_DQ, True, PRECISION)
    else:
        dak, dbk, dv, db_lo = _dkdv_inner_tiles(
            dak, dbk, dv, db_lo, a, b, ak, bk, v, QQ, DO, Lse, Delta, DQQ, bias_c, stride_ot, stride_od, HALF, HEAD,
            BLOCK_M, WITH_DQ, REGION == FUTURE, PRECISION)
    dak, dbk, dv, db_lo, db_hi, db_mid = _dkdv_tiles(
        dak, dbk, dv, db_lo, db_hi, db_mid, b, hi, ak, bk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, Bias, stride_br,
        head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off, HALF, HEAD, BLOCK_M, REGION, WITH_DQ, N_DIAG,
        PRECISION)
    return dak, dbk, dv, db_lo, db_hi, db_mid


@triton.jit
def _attn_bwd_dkdv_kernel(
    KK, V, DO, QQ, Bias, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, left, right, q_off, k_off, n_tiles, n_groups,
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
                pid_n, pid_bh, KK, V, DO, QQ, Bias, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, stride_vb,
                stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od, stride_br, stride_bh,
                stride_pb, stride_pt, H, Tq, Tk, n_rel, left, right, q_off, k_off, n_tiles, HEAD, HAS_BIAS, HAS_PAD,
                BLOCK_M, BLOCK_N, WITH_DQ, N_DIAG, PRECISION)
            tl.debug_barrier()  # the next key tile reads the sums this one wrote, maybe in other threads
    else:
        pid_n, pid_bh = _tile_and_head(n_tiles)
        _dkdv_key_tile(
            pid_n, pid_bh, KK, V, DO, QQ, Bias, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias, stride_vb, stride_vh,
            stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od, stride_br, stride_bh, stride_pb,
            stride_pt, H, Tq, Tk, n_rel, left, right, q_off, k_off, n_tiles, HEAD, HAS_BIAS, HAS_PAD, BLOCK_M,
            BLOCK_N, WITH_DQ, N_DIAG, PRECISION)


@triton.jit
def _dkdv_key_tile(
    pid_n, pid_bh, KK, V, DO, QQ, Bias, Pad, PadStart, Lse, Delta, DKK, DV, DQQ, DBias,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, left, right, q_off, k_off, n_tiles,
    HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_DQ: tl.constexpr, N_DIAG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key tile pid_n (BLOCK_N keys) of head pid_bh: dv, and d(a_k, b_k) in fp32 (DKK, contiguous
    rows [A | B]), which _attn_bwd_unrope_kernel turns into dk and the angle partials: undoing RoPE
    needs the key angles again, and their sines are not worth registers next to the accumulators.
    KK: RoPE(k) as the forward's RoPE(k) pass writes it, (B, H, Tk, h) contiguous in the dot type.
    WITH_DQ (the dq pass then does not run), also: d(q''_A, q''_B) added to DQQ (this head's rows),
    and this tile's share of dbias, DBias[tile] (as the dq kernel writes a query tile's).
    """
    HALF: tl.constexpr = HEAD // 2
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
    k_offs = pid_bh * Tk * HEAD + cols[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    ak = tl.load(KK + k_offs, mask=key_ok[:, None], other=0.0)
    bk = tl.load(KK + k_offs + HALF, mask=key_ok[:, None], other=0.0)
    v = _load_full(V, cols, key_ok, stride_vt, stride_vd, HEAD).to(DT)

    dak = tl.zeros([BLOCK_N, HALF], tl.float32)
    dbk = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD], tl.float32)
    db_lo = tl.zeros([BLOCK_N], tl.float32)  # the bias table's sums (WITH_DQ)
    db_hi = tl.zeros([BLOCK_N], tl.float32)
    db_mid = tl.zeros([N_DIAG], tl.float32)
    # Queries i reach key j iff j - right <= i <= j + left: the band seen from the key side.
    lo = tl.maximum(first - right - q_off, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(first + BLOCK_N - 1 + left - q_off + 1, Tq)
    # The query tiles no mask can bite: whole tiles before Tq whose every query has every key of this
    # tile inside its band (from the last key's right edge to the first key's left edge), and none at
    # all when this tile holds a padded key or keys past Tk.
    k_end = Tk
    if HAS_PAD:
        k_end = tl.minimum(k_end, tl.load(PadStart + b))
    inner_lo = tl.cdiv(tl.maximum(first + BLOCK_N - 1 - right - q_off, 0), BLOCK_M) * BLOCK_M
    inner_hi = tl.minimum(first - q_off + 1, Tq - left) + left  # no int32 overflow at left = 2^30
    inner_hi = tl.maximum(inner_hi, 0) // BLOCK_M * BLOCK_M
    inner_hi = tl.where(pid_n * BLOCK_N + BLOCK_N <= k_end, inner_hi, 0)
    head_off = hd * stride_bh
    if HAS_BIAS:
        # seen from a key tile, the FUTURE query tiles come first and the PAST ones last
        d1, d2 = _split_regions(lo, hi, first - n_rel + 2 - q_off - BLOCK_M, first + BLOCK_N + n_rel - 2 - q_off,
                                BLOCK_M)
        dak, dbk, dv, db_lo, db_hi, db_mid = _dkdv_region(
            dak, dbk, dv, db_lo, db_hi, db_mid, lo, d1, inner_lo, inner_hi, ak, bk, v, kpos, key_ok, QQ, DO, Lse,
            Delta, DQQ, Bias, stride_br, head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off, HALF, HEAD,
            BLOCK_M, FUTURE, WITH_DQ, N_DIAG, PRECISION)
        dak, dbk, dv, db_lo, db_hi, db_mid = _dkdv_tiles(
            dak, dbk, dv, db_lo, db_hi, db_mid, d1, d2, ak, bk, v, kpos, key_ok, QQ, DO, Lse, Delta, DQQ, Bias,
            stride_br, head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off, HALF, HEAD, BLOCK_M, NEAR,
            WITH_DQ, N_DIAG, PRECISION)
        dak, dbk, dv, db_lo, db_hi, db_mid = _dkdv_region(
            dak, dbk, dv, db_lo, db_hi, db_mid, d2, hi, inner_lo, inner_hi, ak, bk, v, kpos, key_ok, QQ, DO, Lse,
            Delta, DQQ, Bias, stride_br, head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off, HALF, HEAD,
            BLOCK_M, PAST, WITH_DQ, N_DIAG, PRECISION)
        if WITH_DQ:
            _store_bias_sums(DBias + (pid_bh * n_tiles + pid_n) * (2 * n_rel - 1), db_lo, db_hi, db_mid, n_rel,
                             N_DIAG)
    else:
        dak, dbk, dv, db_lo, db_hi, db_mid = _dkdv_region(
            dak, dbk, dv, db_lo, db_hi, db_mid, lo, hi, inner_lo, inner_hi, ak, bk, v, kpos, key_ok, QQ, DO, Lse,
            Delta, DQQ, Bias, stride_br, head_off, n_rel, stride_ot, stride_od, Tq, left, right, q_off, HALF, HEAD,
            BLOCK_M, NO_BIAS, WITH_DQ, N_DIAG, PRECISION)

    tl.store(DV + pid_bh * Tk * HEAD + cols[:, None] * HEAD + tl.arange(0, HEAD)[None, :],
             dv.to(DV.dtype.element_ty), mask=cols[:, None] < Tk)
    tl.store(DKK + k_offs, dak, mask=cols[:, None] < Tk)
    tl.store(DKK + k_offs + HALF, dbk, mask=cols[:, None] < Tk)


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


@triton.jit
def _dq_tiles(
    dqa, dqb, db_lo, db_hi, db_mid, lo, hi, qa, qb, qpos, do, lse, delta, KK, V, Bias, stride_br,
    head_off, n_rel, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, REGION: tl.constexpr,
    HAS_PAD: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate d(q''_A, q''_B) and the bias table's sums of dS over the key tiles lo, ... < hi:
    per query row, the end rows' (db_lo, db_hi); in a NEAR tile also the inner rows' (db_mid[d],
    table row d + 1: the diagonal i - j = d - (n - 2)), summed over the tile's queries.
    KK: this head's RoPE(k) rows [a | b] as the forward computed them, contiguous, in the dot type."""
    DT = qa.dtype
    half = tl.arange(0, HALF)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        # A padded key's k and v meet ds = p = 0 in the products below, and 0 * NaN is NaN: zeroed after
        # the loads, whose masks then do not wait on the padding's (that costs the pipelined loop registers).
        key_ok = _key_ok(cols, Tk, Pad, pad_off, stride_pt, HAS_PAD)
        k_offs = cols[:, None] * HEAD + half[None, :]
        ak = tl.where(key_ok[:, None], tl.load(KK + k_offs, mask=cols[:, None] < Tk, other=0.0), 0.0).to(DT)
        bk = tl.where(key_ok[:, None], tl.load(KK + k_offs + HALF, mask=cols[:, None] < Tk, other=0.0), 0.0).to(DT)
        logits = tl.dot(qa, tl.trans(ak), input_precision=PRECISION)
        logits = tl.dot(qb, tl.trans(bk), logits, input_precision=PRECISION)
        rel = qpos[:, None] - (k_off + cols)[None, :]  # i - j
        keep = (rel <= left) & (rel >= -right) & key_ok[None, :]
        logits += _bias_tile(rel, Bias, stride_br, head_off, n_rel, REGION)
        p = tl.where(keep, tl.exp2((logits - lse[:, None]) * LOG2E), 0.0)
        v = tl.where(key_ok[:, None], _load_full(V, cols, cols < Tk, stride_vt, stride_vd, HEAD), 0.0).to(DT)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        db_lo, db_hi, db_mid = _bias_row_sums(ds, db_lo, db_hi, db_mid, rel, qpos - (k_off + start) + n_rel - 2, n_rel,
                                              REGION, -1, N_DIAG)
        ds = ds.to(DT)
        dqa = tl.dot(ds, ak, dqa, input_precision=PRECISION)
        dqb = tl.dot(ds, bk, dqb, input_precision=PRECISION)
    return dqa, dqb, db_lo, db_hi, db_mid


@triton.jit
def _dq_inner_tiles(
    dqa, dqb, db, lo, hi, qa, qb, do, lse, delta, KK, V, bias_c, stride_vt, stride_vd,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, SUM_DS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """_dq_tiles for key tiles wholly inside the band, before Tk and before any padded key: no mask,
    the region's one bias value bias_c folded into the exponent; SUM_DS: add dS's row sums to db."""
    DT = qa.dtype
    half = tl.arange(0, HALF)
    dims = tl.arange(0, HEAD)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_offs = cols[:, None] * HEAD + half[None, :]
        ak = tl.load(KK + k_offs)
        bk = tl.load(KK + k_offs + HALF)
        logits = tl.dot(qa, tl.trans(ak), input_precision=PRECISION)
        logits = tl.dot(qb, tl.trans(bk), logits, input_precision=PRECISION)
        p = tl.exp2(logits * LOG2E + ((bias_c - lse) * LOG2E)[:, None])
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :] * stride_vd).to(DT)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SUM_DS:
            db += tl.sum(ds, 1)
        ds = ds.to(DT)
        dqa = tl.dot(ds, ak, dqa, input_precision=PRECISION)
        dqb = tl.dot(ds, bk, dqb, input_precision=PRECISION)
    return dqa, dqb, db


@triton.jit
def _dq_region(
    dqa, dqb, db_lo, db_hi, db_mid, lo, hi, inner_lo, inner_hi, qa, qb, qpos, do, lse, delta, KK, V, Bias,
    stride_br, head_off, n_rel, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, REGION: tl.constexpr,
    HAS_PAD: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """The key tiles lo, ... < hi of one region whose bias is one value (PAST, FUTURE, NO_BIAS):
    [inner_lo, inner_hi) (starts on lo's grid) by the loop with no mask, the edges by the masked one.
    A PAST tile's dS sums go to the last row of dbias (db_hi), a FUTURE one's to the first (db_lo)."""
    a = tl.minimum(tl.maximum(inner_lo, lo), hi)
    b = tl.maximum(tl.minimum(inner_hi, hi), a)
    dqa, dqb, db_lo, db_hi, db_mid = _dq_tiles(
        dqa, dqb, db_lo, db_hi, db_mid, lo, a, qa, qb, qpos, do, lse, delta, KK, V, Bias, stride_br, head_off,
        n_rel, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD, BLOCK_N, REGION,
        HAS_PAD, N_DIAG, PRECISION)
    bias_c = _bias_tile(0, Bias, stride_br, head_off, n_rel, REGION)
    if REGION == PAST:
        dqa, dqb, db_hi = _dq_inner_tiles(dqa, dqb, db_hi, a, b, qa, qb, do, lse, delta, KK, V, bias_c, stride_vt,
                                          stride_vd, HALF, HEAD, BLOCK_N, True, PRECISION)
    else:
        dqa, dqb, db_lo = _dq_inner_tiles(dqa, dqb, db_lo, a, b, qa, qb, do, lse, delta, KK, V, bias_c, stride_vt,
                                          stride_vd, HALF, HEAD, BLOCK_N, REGION == FUTURE, PRECISION)
    dqa, dqb, db_lo, db_hi, db_mid = _dq_tiles(
        dqa, dqb, db_lo, db_hi, db_mid, b, hi, qa, qb, qpos, do, lse, delta, KK, V, Bias, stride_br, head_off,
        n_rel, Pad, pad_off, stride_pt, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD, BLOCK_N, REGION,
        HAS_PAD, N_DIAG, PRECISION)
    return dqa, dqb, db_lo, db_hi, db_mid


@triton.jit
def _attn_bwd_dq_kernel(
    KK, V, DO, QQ, Bias, Pad, PadStart, Lse, Delta, DQQ, DBias,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, left, right, q_off, k_off, n_tiles,
    HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M) query tile: d(q''_A, q''_B) in the dot type (DQQ, contiguous rows [A | B]) and
    this tile's share of dbias, DBias[tile, r] = sum of its dS over the pairs with clamp(i - j) + n - 1
    = r (N_DIAG: a power of two at least 2n - 3, the inner rows). Going back through P~ and RoPE, and
    the dP~ partials, are _attn_bwd_dq_unrotate_kernel's: the loop over key tiles keeps only q'', dO
    and the dq'' accumulators in registers. KK: RoPE(k) as the forward's RoPE(k) pass writes it,
    (B, H, Tk, h) contiguous in the dot type."""
    HALF: tl.constexpr = HEAD // 2
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
    q_offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    qa = tl.load(QQ + q_offs, mask=rows[:, None] < Tq, other=0.0)  # q'' from the delta pre-pass
    qb = tl.load(QQ + q_offs + HALF, mask=rows[:, None] < Tq, other=0.0)
    do = _load_full(DO, rows, rows < Tq, stride_ot, stride_od, HEAD).to(DT)
    lse = tl.load(Lse + pid_bh * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Tq + rows, mask=rows < Tq, other=0.0)
    dqa = tl.zeros([BLOCK_M, HALF], tl.float32)
    dqb = tl.zeros([BLOCK_M, HALF], tl.float32)
    db_lo = tl.zeros([BLOCK_M], tl.float32)
    db_hi = tl.zeros([BLOCK_M], tl.float32)
    db_mid = tl.zeros([N_DIAG], tl.float32)

    lo, hi = _key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M - 1, left, right, q_off, k_off, Tk, BLOCK_N)
    # the key tiles no mask can bite, as the forward finds them
    k_end = Tk
    if HAS_PAD:
        k_end = tl.minimum(k_end, tl.load(PadStart + b))
    inner_lo, inner_hi = _inner_keys(q_first, left, right, k_off, k_end, BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        d1, d2 = _split_regions(lo, hi, q_first - n_rel + 2 - k_off - BLOCK_N,
                                q_first + BLOCK_M + n_rel - 2 - k_off, BLOCK_N)
        dqa, dqb, db_lo, db_hi, db_mid = _dq_region(
            dqa, dqb, db_lo, db_hi, db_mid, lo, d1, inner_lo, inner_hi, qa, qb, qpos, do, lse, delta, KK, V, Bias,
            stride_br, hd * stride_bh, n_rel, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right,
            k_off, HALF, HEAD, BLOCK_N, PAST, HAS_PAD, N_DIAG, PRECISION)
        dqa, dqb, db_lo, db_hi, db_mid = _dq_tiles(
            dqa, dqb, db_lo, db_hi, db_mid, d1, d2, qa, qb, qpos, do, lse, delta, KK, V, Bias, stride_br,
            hd * stride_bh, n_rel, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk,
            left, right, k_off, HALF, HEAD, BLOCK_N, NEAR, HAS_PAD, N_DIAG, PRECISION)
        dqa, dqb, db_lo, db_hi, db_mid = _dq_region(
            dqa, dqb, db_lo, db_hi, db_mid, d2, hi, inner_lo, inner_hi, qa, qb, qpos, do, lse, delta, KK, V, Bias,
            stride_br, hd * stride_bh, n_rel, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right,
            k_off, HALF, HEAD, BLOCK_N, FUTURE, HAS_PAD, N_DIAG, PRECISION)
        _store_bias_sums(DBias + tile * (2 * n_rel - 1), db_lo, db_hi, db_mid, n_rel, N_DIAG)
    else:
        dqa, dqb, db_lo, db_hi, db_mid = _dq_region(
            dqa, dqb, db_lo, db_hi, db_mid, lo, hi, inner_lo, inner_hi, qa, qb, qpos, do, lse, delta, KK, V, Bias,
            stride_br, hd * stride_bh, n_rel, Pad, b * stride_pb, stride_pt, stride_vt, stride_vd, Tk, left, right,
            k_off, HALF, HEAD, BLOCK_N, NO_BIAS, HAS_PAD, N_DIAG, PRECISION)

    # Rounded to the dot type here, as the products with P~^T and [a b]^T take it anyway.
    offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HALF)[None, :]
    mask = rows[:, None] < Tq
    tl.store(DQQ + offs, dqa.to(DT), mask=mask)
    tl.store(DQQ + offs + HALF, dqb.to(DT), mask=mask)


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
    program sums its tiles' shares on chip. Without P (HAS_P false) d(a, b) = d(q'') * scale and
    there is no dP~: DP is not written.
    """
    HALF: tl.constexpr = HEAD // 2
    DT = P.dtype.element_ty
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
        cos, sin = _rope_angles(qpos, s, W, HALF)
        x1, x2 = _load_pairs(Q, rows, rows < Tq, stride_qt, stride_qd, HALF)
        a = x1 * cos - x2 * sin
        bq = x1 * sin + x2 * cos
        offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + half[None, :]
        mask = rows[:, None] < Tq
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
        _unrope_store(da, db, a, bq, cos, sin, qpos, DQ + pid_bh * Tq * HEAD, rows, Tq, G, tile, HEAD)

        if HAS_P:  # this tile's share of dP~ = [a b]^T [dq''_A dq''_B]
            a_t = tl.trans(a.to(DT))
            b_t = tl.trans(bq.to(DT))
            dp_aa = tl.dot(a_t, dqa, dp_aa, input_precision=PRECISION)
            dp_ab = tl.dot(a_t, dqb, dp_ab, input_precision=PRECISION)
            dp_ba = tl.dot(b_t, dqa, dp_ba, input_precision=PRECISION)
            dp_bb = tl.dot(b_t, dqb, dp_bb, input_precision=PRECISION)

    if HAS_P:
        r = tl.arange(0, HALF)[:, None]
        c = tl.arange(0, HALF)[None, :]
        base = DP + prog * HEAD * HEAD
        tl.store(base + r * HEAD + c, dp_aa)
        tl.store(base + r * HEAD + c + HALF, dp_ab)
        tl.store(base + (r + HALF) * HEAD + c, dp_ba)
        tl.store(base + (r + HALF) * HEAD + c + HALF, dp_bb)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


# The memory-bound passes, per head width: the same launch on both tile tables.
_LIGHT_BLOCKS = {
    32: dict(delta=dict(BLOCK_M=64, num_warps=4, num_stages=1),
             unrope=dict(BLOCK_M=64, num_warps=4, num_stages=1),
             unrotate=dict(BLOCK_M=64, num_warps=4, num_stages=2)),
    64: dict(delta=dict(BLOCK_M=64, num_warps=4, num_stages=1),
             unrope=dict(BLOCK_M=64, num_warps=4, num_stages=1),
             unrotate=dict(BLOCK_M=64, num_warps=8, num_stages=1)),  # 2 stages spill on sm_80
    128: dict(delta=dict(BLOCK_M=64, num_warps=8, num_stages=1),  # at 4 the rotation without P spills
              unrope=dict(BLOCK_M=32, num_warps=4, num_stages=1),
              unrotate=dict(BLOCK_M=16, num_warps=8, num_stages=1)),
}

# The two passes that recompute the logits, per (head width, tile table). On sm_80 a chain of dots
# puts every warp along the rows of the tile (16 rows each at least), and each warp then holds whole
# copies of the second operands: hence dkdv's short query tiles (BLOCK_M, those operands' rows) and
# dq's short key tiles. sm_90's warpgroup products read that operand from shared memory, so its
# tiles can be larger: of the shapes that spill nothing under Triton 3.6, 3.8 and 3.9, those whose
# loop inside the band executes the fewest instructions per (query, key) pair (docs/model.md,
# "Tile tables").
_HEAVY_BLOCKS = {
    (32, 80): dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
                   dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)),
    (64, 80): dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
                   # 64 queries: at 128 the tile takes 108 KB of shared memory, past sm_86's and sm_89's 99
                   dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
    (128, 80): dict(dkdv=dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1),  # 2 stages spill
                    dq=dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1)),  # 32 keys spill
    (32, 90): dict(dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                   dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),  # 64 keys spill (3.6)
    (64, 90): dict(dkdv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),  # 4 warps spill (3.6)
                   dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),  # 64 keys spill (3.6)
    (128, 90): dict(dkdv=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
                    dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)),  # 64 keys spill
}

# The dk/dv pass when it also sums dq (DQ_IN_KEY_PASS): dk/dv's accumulators, and per query tile one
# product more and the bias table's sums. On sm_80, the spill-free shape whose loop inside the band
# executes the fewest warp-instructions per (query, key) pair; on sm_90 no shape tried spills nothing
# under Triton 3.8, and these spill least (docs/model.md, "Backward passes").
_KEY_PASS_BLOCKS = {
    (32, 80): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    (64, 80): dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
    (128, 80): dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
    (32, 90): dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    (64, 90): dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    (128, 90): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
}

# Where dq is summed, per tile table (docs/model.md, "Backward passes"). False: by the dq pass, a
# program per query tile over its key tiles, which recomputes the logits, p and dP there (seven
# products in all, exp twice). True: by the dk/dv pass (five products, exp once), a program per
# (batch, head), or a few when the heads are fewer than the multiprocessors, each taking its key tiles
# one after another and adding their shares to its own fp32 sum of the head's queries.
DQ_IN_KEY_PASS = {80: False, 90: False}
_FORCED_DQ: list[bool] = []


@contextlib.contextmanager
def dq_in_key_pass(on: bool):
    """Sum dq where `on` says, whatever DQ_IN_KEY_PASS holds for the device (the benches time both)."""
    _FORCED_DQ.append(bool(on))
    try:
        yield
    finally:
        _FORCED_DQ.pop()


def sums_dq_in_key_pass(arch: int) -> bool:
    """Whether the backward on the tile table of `arch` sums dq in the dk/dv pass."""
    return _FORCED_DQ[-1] if _FORCED_DQ else DQ_IN_KEY_PASS[arch]


def default_blocks(h: int, arch: int) -> dict:
    """{kernel: tile sizes and launch shape} of the backward's passes at head width h (a built
    width) on the tile table of `arch` (attention_common.tile_arch), in launch order, chosen so that
    no launch spills registers (python -m echo_kernels.aot). Without a dq pass (sums_dq_in_key_pass)
    the dk/dv pass takes its row of _KEY_PASS_BLOCKS."""
    if sums_dq_in_key_pass(arch):
        return {**_LIGHT_BLOCKS[h], "dkdv": _KEY_PASS_BLOCKS[h, arch]}
    return {**_LIGHT_BLOCKS[h], **_HEAVY_BLOCKS[h, arch]}


def inner_diagonals(n_rel: int) -> int:
    """N_DIAG of the dq kernel: the 2n - 3 inner rows of a (2n - 1)-row bias table rounded up to a
    power of two (a tile's length in Triton), at least 1."""
    return triton.next_power_of_2(max(2 * n_rel - 3, 1))


def _multiprocessors(device) -> int:
    """The GPU's multiprocessors; under the interpreter 2, so that the programs sized by it below each
    loop over several tiles, and a few heads split their key tiles in groups."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _dq_programs_per_head(n_heads: int, n_tiles: int, device) -> int:
    """Programs per (batch, head) for the dq unrotate kernel: about four per multiprocessor in all."""
    return max(1, min(n_tiles, triton.cdiv(4 * _multiprocessors(device), n_heads)))


def _key_groups_per_head(n_heads: int, n_tiles: int, device) -> int:
    """Programs per (batch, head) of the dk/dv pass when it sums dq: as many as fit one wave of one
    program per multiprocessor (a second, part-filled wave would leave most of them idle), at least
    one; each holds its own (Tq, h) fp32 sum of dq, which the launcher adds up."""
    return max(1, min(n_tiles, _multiprocessors(device) // n_heads))


def _common_args(v, do, bias, key_padding_mask):
    """The bias and padding arguments and the strides the dkdv, dq and dbias passes share."""
    bias_t, sbr, sbh, n_rel, has_bias = _bias_arg(bias, v)
    pad_t, spb, spt, has_pad = _pad_arg(key_padding_mask, v)
    strides = (*v.stride(), *do.stride(), sbr, sbh, spb, spt)
    return bias_t, pad_t, strides, n_rel, has_bias, has_pad


def backward(do, q, k, v, out, lse, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout):
    """Gradients of the forward launcher's out. Returns dq, dk, dv (input dtype, contiguous),
    dM (M's dtype, or None without M), dw (w's dtype), ds (fp32 scalar), dbias (bias's dtype, or None)."""
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    half = h // 2
    dev = q.device
    dq = torch.zeros((B, H, Tq, h), dtype=q.dtype, device=dev)
    dk = torch.zeros((B, H, Tk, h), dtype=k.dtype, device=dev)
    dv = torch.zeros((B, H, Tk, h), dtype=v.dtype, device=dev)
    n_rel = (bias.shape[0] + 1) // 2 if bias is not None else 1
    if Tq == 0 or Tk == 0 or B * H == 0:
        dbias = torch.zeros_like(bias) if bias is not None else None
        dM = torch.zeros_like(M) if M is not None else None
        return dq, dk, dv, dM, torch.zeros_like(w), torch.zeros((), device=dev), dbias

    P, has_p = p_arg(M, layout, q.dtype, dev)
    scale = 1.0 / math.sqrt(h)
    w32 = w.detach().float().contiguous()
    s32 = torch.as_tensor(s, dtype=torch.float32, device=dev).detach().reshape(1)
    bias_t, pad_t, strides, n_rel, has_bias, has_pad = _common_args(v, do, bias, key_padding_mask)
    pad_start = first_padded_key(key_padding_mask) if has_pad else lse
    scalars = (H, Tq, Tk, n_rel, left, right, q_offset, k_offset)
    prec = precision(q.dtype)
    arch = tile_arch(dev)
    cfg = {name: with_override(row) for name, row in default_blocks(h, arch).items()}

    # Delta and q'' = RoPE(q) @ P~, read by the dk/dv, dq and dbias kernels.
    c = cfg["delta"]
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=dev)
    qq = torch.empty((B, H, Tq, h), dtype=P.dtype, device=dev)
    n_tiles = triton.cdiv(Tq, c["BLOCK_M"])
    _attn_bwd_delta_kernel[(n_tiles * B * H,)](
        out, do, delta, q, P, w32, s32, qq, *out.stride(), *do.stride(), *q.stride(), H, Tq, q_offset, scale, n_tiles,
        HEAD=h, HAS_P=has_p, BLOCK=c["BLOCK_M"], PRECISION=prec, num_warps=c["num_warps"],
        num_stages=c["num_stages"])

    # RoPE(k) exactly as the forward rotated it (its pass, by its key tiles): the dk/dv, dq and dbias
    # passes read these contiguous rows, and recompute the forward's very probabilities from them.
    kk = rotated_keys(k, w32, s32, k_offset, P.dtype, with_override(forward_blocks(h, arch))["BLOCK_N"])

    c = cfg["dkdv"]
    n_kblocks = triton.cdiv(Tk, c["BLOCK_N"])
    dkk = torch.empty((B, H, Tk, h), dtype=torch.float32, device=dev)  # d(a_k, b_k)
    n_rows = 2 * n_rel - 1  # of the bias table
    with_dq = "dq" not in cfg
    if with_dq:  # each program's sum of d(q''_A, q''_B), each key tile's share of the bias table
        key_groups = _key_groups_per_head(B * H, n_kblocks, dev)
        dqq = torch.zeros((B, H, key_groups, Tq, h), dtype=torch.float32, device=dev)
        db_part = torch.empty((B, H, n_kblocks, n_rows) if has_bias else (1,), dtype=torch.float32, device=dev)
        grid = key_groups * B * H
    else:  # the dq pass writes these; this kernel does not touch them
        key_groups, dqq, db_part, grid = 1, dkk, dkk, n_kblocks * B * H
    _attn_bwd_dkdv_kernel[(grid,)](
        kk, v, do, qq, bias_t, pad_t, pad_start, lse, delta, dkk, dv, dqq, db_part, *strides, *scalars, n_kblocks,
        key_groups, HEAD=h, HAS_BIAS=has_bias, HAS_PAD=has_pad, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
        WITH_DQ=with_dq, N_DIAG=inner_diagonals(n_rel), PRECISION=prec, num_warps=c["num_warps"],
        num_stages=c["num_stages"])
    c = cfg["unrope"]
    n_ktiles = triton.cdiv(Tk, c["BLOCK_M"])
    g_k = torch.empty((B * H * n_ktiles, half), dtype=torch.float32, device=dev)
    _attn_bwd_unrope_kernel[(n_ktiles * B * H,)](
        k, w32, s32, dkk, dk, g_k, *k.stride(), H, Tk, k_offset, n_ktiles, HEAD=h, BLOCK=c["BLOCK_M"],
        num_warps=c["num_warps"], num_stages=c["num_stages"])

    if with_dq:
        # the groups' sums added in a fixed order, rounded to the dot type as the dq pass writes them
        dqq = dqq.sum(2).to(P.dtype)
    else:
        c = cfg["dq"]
        n_qblocks = triton.cdiv(Tq, c["BLOCK_M"])
        dqq = torch.empty((B, H, Tq, h), dtype=P.dtype, device=dev)  # d(q''_A, q''_B)
        # each query tile's share of the bias table
        db_part = torch.empty((B, H, n_qblocks, n_rows) if has_bias else (1,), dtype=torch.float32, device=dev)
        _attn_bwd_dq_kernel[(n_qblocks * B * H,)](
            kk, v, do, qq, bias_t, pad_t, pad_start, lse, delta, dqq, db_part, *strides, *scalars, n_qblocks,
            HEAD=h, HAS_BIAS=has_bias, HAS_PAD=has_pad, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
            N_DIAG=inner_diagonals(n_rel), PRECISION=prec, num_warps=c["num_warps"], num_stages=c["num_stages"])

    c = cfg["unrotate"]
    n_qtiles = triton.cdiv(Tq, c["BLOCK_M"])
    g_q = torch.empty((B * H * n_qtiles, half), dtype=torch.float32, device=dev)
    # dP~ partials bound the programs per (batch, head); without M every tile is its own program
    n_groups = _dq_programs_per_head(B * H, n_qtiles, dev) if has_p else n_qtiles
    dp_part = torch.empty((B * H * n_groups, h, h) if has_p else (1,), dtype=torch.float32, device=dev)
    _attn_bwd_dq_unrotate_kernel[(n_groups * B * H,)](
        q, P, w32, s32, dqq, dq, g_q, dp_part, *q.stride(), H, Tq, q_offset, scale, n_groups,
        HEAD=h, HAS_P=has_p, BLOCK_M=c["BLOCK_M"], PRECISION=prec, num_warps=c["num_warps"],
        num_stages=c["num_stages"])

    # Fixed-order reductions of the per-program partials.
    g = g_q.sum(0) + g_k.sum(0)  # sum_t dphi[t, m] pos[t] over queries and keys
    s_val = s32[0]
    dw = (s_val * g).to(w.dtype)
    ds = (g * w32).sum()
    dM = None
    if has_p:
        perm = layout_perm(h, layout, dev)
        dP = torch.empty((h, h), dtype=torch.float32, device=dev)
        dP[perm[:, None], perm[None, :]] = dp_part.sum(0) / math.sqrt(h)
        Mf = M.float()
        dM = ((dP + dP.T) @ Mf).to(M.dtype)  # P = M M^T
    dbias = db_part.sum((0, 2)).T.contiguous().to(bias.dtype) if has_bias else None
    return dq, dk, dv, dM, dw, ds, dbias


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile list (echo_kernels.aot)
# --------------------------------------------------------------------------------------------------


def aot_specs(arch: int) -> list[KernelSpec]:
    """The launches of the backward kernels at the block sizes of `arch`'s tile table: h in
    {32, 64, 128}, bf16 and fp16, with a bias table and a key-padding mask, with M and without
    (names ending in _no_m); the dk/dv pass summing dq (dkdv_dq) beside the dk/dv and dq passes,
    whichever DQ_IN_KEY_PASS picks."""
    specs = []
    for h in ATTENTION_HEAD_WIDTHS:
        for dt in ("bf16", "fp16"):
            g = {**_LIGHT_BLOCKS[h], **_HEAVY_BLOCKS[h, arch]}
            ptrs = {n: f"*{dt}" for n in ("Q", "K", "KK", "V", "DO", "P", "QQ", "DV", "DQ", "DQQ", "O")}
            ptrs.update(W="*fp32", S="*fp32", Bias="*fp32", Pad="*u8", Lse="*fp32", Delta="*fp32", G="*fp32",
                        DBias="*fp32", DP="*fp32", DKK="*fp32", DK=f"*{dt}", PadStart="*i32", scale="fp32")
            dkdv_ptrs = dict(ptrs, DQQ="*fp32")  # dq's fp32 sums (without dq, a placeholder of that type)
            key_pass = _KEY_PASS_BLOCKS[h, arch]
            for name, fn, ce in (
                ("delta", _attn_bwd_delta_kernel, dict(
                    HEAD=h, HAS_P=True, BLOCK=g["delta"]["BLOCK_M"], PRECISION="tf32")),
                ("delta_no_m", _attn_bwd_delta_kernel, dict(
                    HEAD=h, HAS_P=False, BLOCK=g["delta"]["BLOCK_M"], PRECISION="tf32")),
                ("dkdv", _attn_bwd_dkdv_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=g["dkdv"]["BLOCK_M"], BLOCK_N=g["dkdv"]["BLOCK_N"],
                    WITH_DQ=False, N_DIAG=inner_diagonals(ECHO_MAX_REL_DIST), PRECISION="tf32")),
                ("dkdv_dq", _attn_bwd_dkdv_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=key_pass["BLOCK_M"], BLOCK_N=key_pass["BLOCK_N"],
                    WITH_DQ=True, N_DIAG=inner_diagonals(ECHO_MAX_REL_DIST), PRECISION="tf32")),
                ("unrope", _attn_bwd_unrope_kernel, dict(HEAD=h, BLOCK=g["unrope"]["BLOCK_M"])),
                ("dq", _attn_bwd_dq_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=g["dq"]["BLOCK_M"], BLOCK_N=g["dq"]["BLOCK_N"],
                    N_DIAG=inner_diagonals(ECHO_MAX_REL_DIST), PRECISION="tf32")),
                ("dq_unrotate", _attn_bwd_dq_unrotate_kernel, dict(
                    HEAD=h, HAS_P=True, BLOCK_M=g["unrotate"]["BLOCK_M"], PRECISION="tf32")),
                ("dq_unrotate_no_m", _attn_bwd_dq_unrotate_kernel, dict(
                    HEAD=h, HAS_P=False, BLOCK_M=g["unrotate"]["BLOCK_M"], PRECISION="tf32")),
            ):
                c = {"delta_no_m": g["delta"], "dq_unrotate": g["unrotate"], "dq_unrotate_no_m": g["unrotate"],
                     "dkdv_dq": key_pass}.get(name) or g[name]
                kinds = dkdv_ptrs if name.startswith("dkdv") else ptrs
                specs.append(KernelSpec(
                    f"attention_bwd_{name}_h{h}_{dt}", fn, signature_of(fn, kinds, ce), ce,
                    num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return specs
