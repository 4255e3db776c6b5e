"""Pieces shared by the attention kernels, forward (echo_kernels.kernels.attention) and backward
(echo_kernels.kernels.attention_backward_keys and _queries), and by their launchers.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from .angles import _sincos

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e)


# --------------------------------------------------------------------------------------------------
# Triton pieces
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_pairs(ptr, rows, row_ok, stride_t, stride_d, HALF: tl.constexpr):
    """The even and odd columns of a (rows, 2 HALF) tile as two fp32 (rows, HALF) tiles; rows not
    row_ok read as zeros (past the end, or padded keys: never a NaN that a zero weight would keep)."""
    cols = tl.arange(0, HALF)
    offs = rows[:, None] * stride_t + (2 * cols)[None, :] * stride_d
    mask = row_ok[:, None]
    even = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(ptr + offs + stride_d, mask=mask, other=0.0).to(tl.float32)
    return even, odd


@triton.jit
def _tile_and_head(n_tiles):
    """(tile, batch-head) of this program on a 1-D grid of n_tiles * B * H programs, tiles fastest (so
    that programs running together share a head's keys in L2). A 1-D grid because CUDA caps a grid's
    second axis at 65535, which B * H can pass; its first allows 2**31 - 1."""
    pid = tl.program_id(0)
    return pid % n_tiles, pid // n_tiles


@triton.jit
def _rope_angles(pos, s, W, HALF: tl.constexpr):
    """cos and sin of phi[t, m] = (s * pos[t]) * w[m], each (rows, HALF) fp32, by the rotary kernel's
    _sincos. w is loaded as a whole (rows, HALF) tile, in the layout the compiler gives the pass's
    (rows, HALF) loads: from a (HALF,) vector the angles took a layout of their own, and their sines and
    cosines went through shared memory to the tile's (Triton 3.8)."""
    w = tl.load(W + tl.arange(0, HALF)[None, :] + 0 * pos[:, None]).to(tl.float32)
    phi = (s * pos.to(tl.float32))[:, None] * w
    sin, cos = _sincos(phi)
    return cos, sin


@triton.jit
def _load_full(ptr, rows, row_ok, stride_t, stride_d, HEAD: tl.constexpr):
    """A (rows, HEAD) fp32 tile; rows not row_ok read as zeros."""
    cols = tl.arange(0, HEAD)
    offs = rows[:, None] * stride_t + cols[None, :] * stride_d
    return tl.load(ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _tile_rows(first, rows_left, BLOCK: tl.constexpr, HEAD: tl.constexpr):
    """Offsets of the (BLOCK, HEAD) tile of contiguous HEAD-wide rows from row `first`, and the mask of
    its rows that exist (rows_left of them). Counted from the tile's first row, so that a store after
    the key loops does not reuse the offsets of the tile's load before them, which would then stay in
    registers through every loop (spilled)."""
    local = tl.arange(0, BLOCK)[:, None]
    return first * HEAD + local * HEAD + tl.arange(0, HEAD)[None, :], local < rows_left


@triton.jit
def _load_p(P, HALF: tl.constexpr):
    """The four (HALF, HALF) blocks of the permuted, scaled P (contiguous (2 HALF, 2 HALF))."""
    r = tl.arange(0, HALF)[:, None]
    c = tl.arange(0, HALF)[None, :]
    aa = tl.load(P + r * (2 * HALF) + c)
    ab = tl.load(P + r * (2 * HALF) + c + HALF)
    ba = tl.load(P + (r + HALF) * (2 * HALF) + c)
    bb = tl.load(P + (r + HALF) * (2 * HALF) + c + HALF)
    return aa, ab, ba, bb


# Key tiles fall in three regions by where the clamp of i - j sends them: wholly at i - j >= n - 1
# (PAST: one bias value, the last row), straddling the diagonal (NEAR: the bias varies, so each launcher
# writes it once per call as whole tiles of its own shape, kernels.attention_operands.near_bias_tiles, which
# _near_bias reads; decoding gathers it), and wholly at i - j <= -(n - 1) (FUTURE: the first row). No
# branch sits inside a loop body (it would stop Triton from pipelining its loads): a loop over tiles of
# either far side (FAR) picks the side's one value by a select, and a loop over tiles of any region (ANY)
# a tile of the table with the band's mask in it (_band_bias).
PAST: tl.constexpr = tl.constexpr(1)
NEAR: tl.constexpr = tl.constexpr(2)
FUTURE: tl.constexpr = tl.constexpr(3)
FAR: tl.constexpr = tl.constexpr(4)
ANY: tl.constexpr = tl.constexpr(5)
INT32_MAX: tl.constexpr = tl.constexpr(2**31 - 1)


@triton.jit
def _split_regions(lo, hi, last_past, first_future, BLOCK: tl.constexpr):
    """Tile starts lo, lo + BLOCK, ... < hi, cut at d1 and d2: [lo, d1) start at most last_past,
    [d2, hi) at least first_future, [d1, d2) between. The loops over them may be empty."""
    top = tl.maximum(hi, lo)
    n1 = tl.where(last_past >= lo, (last_past - lo) // BLOCK + 1, 0)
    d1 = tl.minimum(lo + n1 * BLOCK, top)
    n2 = tl.where(first_future > lo, (first_future - lo + BLOCK - 1) // BLOCK, 0)
    d2 = tl.minimum(tl.maximum(lo + n2 * BLOCK, d1), top)
    return d1, d2


@triton.jit
def _regions(lo, hi, last_past, first_future, Bias, stride_br, head_off, n_rel, DT: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """(d1, d2, bias_past, bias_future) of a pass's tiles lo, lo + BLOCK, ... < hi, from either side: the
    NEAR tiles start in [d1, d2) (_split_regions), and each far side's bias is one value, the table's last
    row for PAST tiles and its first for FUTURE ones, rounded to DT (_bias_tile). Without a bias no tile is
    NEAR and both values are 0."""
    if HAS_BIAS:
        d1, d2 = _split_regions(lo, hi, last_past, first_future, BLOCK)
        bias_past = _bias_tile(0, Bias, stride_br, head_off, n_rel, PAST, DT)
        bias_future = _bias_tile(0, Bias, stride_br, head_off, n_rel, FUTURE, DT)
    else:
        d1 = lo
        d2 = lo
        bias_past = 0.0
        bias_future = 0.0
    return d1, d2, bias_past, bias_future


@triton.jit
def _loop_stages(lo, hi, inner_lo, inner_hi, d1, d2):
    """How a pass deals the tiles lo, lo + BLOCK, ... < hi of its program to its loops (the forward and
    both heavy backward passes alike): (inner, inner_end, near_lo, near_hi). No mask can bite the tiles
    in [inner, inner_end) ([inner_lo, inner_hi) cut to [lo, hi)); of those, [near_lo, near_hi) are NEAR
    (the region [d1, d2) of _split_regions cut to them) and the rest far. The masked loop takes the tiles
    before inner and from inner_end on."""
    inner = tl.minimum(tl.maximum(inner_lo, lo), hi)
    inner_end = tl.maximum(tl.minimum(inner_hi, hi), inner)
    near_lo = tl.minimum(tl.maximum(d1, inner), inner_end)
    near_hi = tl.minimum(tl.maximum(d2, inner), inner_end)
    return inner, inner_end, near_lo, near_hi


@triton.jit
def _far_masked_tiles(lo, hi, inner, inner_end, near_lo, near_hi, d1, d2):
    """(end, skip_at, skip, skip_at2, skip2) of the loop over the far tiles that masks can bite, for a pass
    that runs every NEAR tile in a loop of its own: the tiles of [lo, d1) and [d2, hi) outside [inner,
    inner_end) (_loop_stages), as range(lo, end) moved on twice by _skip. Counted without the NEAR tiles,
    the far tiles inside the band are one run: the loop skips it first, then the NEAR tiles."""
    near = d2 - d1
    inner_far = (inner_end - inner) - (near_hi - near_lo)
    inner_rank = inner - tl.minimum(tl.maximum(inner - d1, 0), near)
    return hi - near - inner_far, inner_rank, inner_far, d1, near


@triton.jit
def _skip(start, skip_at, skip):
    """A loop's tile start moved on by skip from skip_at on: one loop walks two runs of tiles,
    [lo, skip_at) then [skip_at + skip, ...), with one copy of its body (each loop is one in the kernel's
    code, with the software pipeliner's prologue and epilogue)."""
    return start + tl.where(start >= skip_at, skip, 0)


@triton.jit
def _bias_tile(rel, Bias, stride_br, head_off, n_rel, REGION: tl.constexpr, DT: tl.constexpr):
    """bias[clamp(rel) + n - 1, head] for a tile of offsets rel = i - j (see the regions), rounded to DT,
    the dot type, and held in fp32: every pass adds the values an additive mask in the inputs' dtype
    would hold, bf16 or fp16 ones for half inputs (docs/model.md, "NEAR bias tables"), whatever the
    bias's own dtype."""
    if REGION == PAST:
        bias = tl.load(Bias + (2 * n_rel - 2) * stride_br + head_off)
    elif REGION == FUTURE:
        bias = tl.load(Bias + head_off)
    else:
        ridx = tl.minimum(tl.maximum(rel, 1 - n_rel), n_rel - 1) + n_rel - 1
        bias = tl.load(Bias + ridx * stride_br + head_off)
    return bias.to(DT).to(tl.float32)


@triton.jit
def _biased_exp(logits, bias, shift):
    """exp(logits + bias - shift), as exp2 of fused multiply-adds: one per entry where the bias is one
    value per row or column, two where it varies. The bias joins the exponent, not the logits: added to
    a tl.dot's result it would become the product's accumulator, and the software pipeliner leaves a
    load that feeds only an accumulator synchronous (docs/model.md, "Kernels")."""
    return tl.exp2(logits * LOG2E + (bias * LOG2E - shift * LOG2E))


@triton.jit
def _plus_bias(logits, bias):
    """logits + bias for a bias that varies per pair, where the sum itself is needed (the forward's row
    maximum), as a fused multiply-add by 1, which the compiler makes an addition again: written as an
    addition, for the reason _biased_exp gives, the bias's load would wait in the pipelined loop."""
    return tl.fma(logits, 1.0, bias)


@triton.jit
def _head_bias_tiles(Tiles, head, n_bias_tiles, ROWS: tl.constexpr, COLS: tl.constexpr):
    """This head's table in Tiles, the (H, n_bias_tiles, ROWS, COLS) tables of the NEAR tiles
    (kernels.attention_operands.near_bias_tiles)."""
    return Tiles + head * n_bias_tiles * (ROWS * COLS)


@triton.jit
def _near_tile(tile_of, start, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The index in this head's table of the NEAR tile whose loop runs from `start`: tiles are STEP, the
    smaller side, apart in i - j (kernels.attention_operands.near_bias_tiles). The masked loops find the
    band's edge tiles the same way, at their own offsets (_band_bias)."""
    STEP: tl.constexpr = ROWS if ROWS < COLS else COLS
    return (tile_of - start) // STEP


@triton.jit
def _bias_table_tile(Tiles, tile, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The (ROWS, COLS) tile `tile` of this head's table (_head_bias_tiles), in fp32. One contiguous block,
    which the pipeline copies in 16-byte pieces (a gather computes an index and issues a 4-byte copy per
    entry)."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    return tl.load(Tiles + rows[:, None] * COLS + tl.arange(0, COLS)[None, :]).to(tl.float32)


@triton.jit
def _near_bias(Tiles, tile_of, start, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The (ROWS, COLS) fp32 bias of the NEAR tile whose loop runs from `start` (_near_tile)."""
    return _bias_table_tile(Tiles, _near_tile(tile_of, start, ROWS, COLS), ROWS, COLS)


@triton.jit
def _edge_cuts(first_row, last_row, col_off, n_cols, left, right):
    """(left_cut, right_cut) for _band_bias, for a tile of rows at positions first_row .. last_row (its last
    real one) against column tiles from position col_off + start, n_cols columns in all: the column tile
    from `start` crosses the edge i - j = left where start < left_cut, the edge i - j = -right where
    start + COLS - 1 > right_cut. Where no real column reaches the right edge, no column tile crosses it
    (right_cut is INT32_MAX), so that the loop's test need not count the real columns."""
    left_cut = last_row - col_off - left
    right_cut = first_row - col_off + right
    return left_cut, tl.where(n_cols - 1 > right_cut, right_cut, INT32_MAX)


@triton.jit
def _band_bias(Tiles, n_near, tile_of, start, d1, d2, left_cut, left_of, right_cut, right_of, n_cols,
               ROWS: tl.constexpr, COLS: tl.constexpr):
    """The (ROWS, COLS) fp32 bias of the tile a masked loop runs from `start`, with the band's mask in it
    (-inf outside -right <= i - j <= left, kernels.attention_operands.near_bias_tiles): a NEAR tile's,
    a far one's that crosses an edge of the band (_edge_cuts; the right edge tested on the tile's last
    column before n_cols) from the table's tiles of that edge, at offsets left_of - start and
    right_of - start (counted from the table's start), else its side's constant tile. Both edges' tiles are
    whole tiles of the band, so one that crosses both may take either. The dk/dv pass's (keys, queries)
    tiles read it as its reversed table is written: j - i for i - j, and the band's sides swapped."""
    # NEAR tiles start in [d1, d2); before them the constant tile of the first side (the table's n_near:
    # PAST seen from a query tile), after them the other's
    tile = tl.where(start < d1, n_near,
                    tl.where(start >= d2, n_near + 1, _near_tile(tile_of, start, ROWS, COLS)))
    far = (start < d1) | (start >= d2)
    tile = tl.where(far & (start < left_cut), _near_tile(left_of, start, ROWS, COLS), tile)
    tile = tl.where(far & (tl.minimum(start + COLS, n_cols) - 1 > right_cut),
                    _near_tile(right_of, start, ROWS, COLS), tile)
    return _bias_table_tile(Tiles, tile, ROWS, COLS)


@triton.jit
def _rotated_rows(X, rows, row_ok, stride_t, stride_d, pos, s, W, HALF: tl.constexpr):
    """RoPE halves a, b (fp32, (rows, HALF)) of the tile of X at `rows` (zeros where not row_ok), at
    positions pos: what the rotation pass writes; the backward's light passes undo it by the sines and
    cosines of the same _rope_angles. Each row's angles directly: a program rotates one tile, so angle
    addition from the tile's first position would spend a precise sine and cosine per element all the
    same, and a rounding more."""
    cos, sin = _rope_angles(pos, s, W, HALF)  # before the loads: the tile then is not live through them
    x1, x2 = _load_pairs(X, rows, row_ok, stride_t, stride_d, HALF)
    return x1 * cos - x2 * sin, x1 * sin + x2 * cos


@triton.jit
def _in_band(rel, left, right):
    """Whether rel = i - j lies in the band -right <= rel <= left, by one unsigned comparison:
    0 <= rel + right <= left + right. Positions stay below 2^30 and each side at most 2^30, so rel + right
    fits int32, and left + right is summed unsigned. tl.cast, not .to: the JIT passes a side equal to 1 as
    a plain int."""
    return (rel + right).to(tl.uint32) <= tl.cast(left, tl.uint32) + tl.cast(right, tl.uint32)


@triton.jit
def _key_ok(cols, Tk, Pad, pad_off, stride_pt, HAS_PAD: tl.constexpr, PAD_TILES: tl.constexpr):
    """(cols,) keys that exist and are not padding. The flags run to whole key tiles, set past Tk (_pad_arg):
    with PAD_TILES one unmasked load says both (PAD_TILES_ON says where that pays)."""
    if HAS_PAD and PAD_TILES:
        return tl.load(Pad + pad_off + cols * stride_pt) == 0
    ok = cols < Tk
    if HAS_PAD:
        padded = tl.load(Pad + pad_off + cols * stride_pt, mask=cols < Tk, other=1)
        ok = ok & (padded == 0)
    return ok


@triton.jit
def _key_range(q_first, q_last, left, right, q_off, k_off, Tk, BLOCK_N: tl.constexpr):
    """[lo, hi) key columns that queries q_first..q_last (rows) can reach; lo a multiple of BLOCK_N."""
    lo = tl.maximum(q_off + q_first - left - k_off, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(q_off + q_last + right - k_off + 1, Tk)
    return lo, hi


@triton.jit
def _inner_keys(q_first, left, right, k_off, k_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[inner_lo, inner_hi): the key tiles (starts multiples of BLOCK_N) no mask can bite for the query
    tile of BLOCK_M rows from position q_first: every key inside the band of every query of the tile
    (from the last query's left edge to the first one's right edge), whole tiles before k_end (Tk,
    or the batch's first padded key). Written so that an unbounded side (2^30) cannot overflow int32."""
    inner_lo = tl.cdiv(tl.maximum(q_first + BLOCK_M - 1 - left - k_off, 0), BLOCK_N) * BLOCK_N
    inner_hi = tl.minimum(q_first - k_off + 1, k_end - right) + right
    return inner_lo, tl.maximum(inner_hi, 0) // BLOCK_N * BLOCK_N


@triton.jit
def _query_tile_stages(row0, q_off, k_off, left, right, Tk, PadStart, Bias, stride_br, head_off, n_rel,
                       DT: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """The key tiles of the query tile of BLOCK_M rows from row row0, as the forward and the dq pass deal
    them to their loops: (lo, hi, d1, d2, inner, inner_end, near_lo, near_hi, bias_past, bias_future).
    [lo, hi) the keys the band reaches (_key_range); the NEAR tiles start in [d1, d2), PAST ones before
    with bias_past, FUTURE ones after with bias_future (without a bias none is NEAR, and both values are
    0); no mask can bite the tiles in [inner, inner_end), of which [near_lo, near_hi) are NEAR
    (_loop_stages): whole, before Tk and, with HAS_PAD, before the batch's first padded key (PadStart: a
    pointer to it)."""
    q_first = q_off + row0
    lo, hi = _key_range(row0, row0 + BLOCK_M - 1, left, right, q_off, k_off, Tk, BLOCK_N)
    k_end = Tk
    if HAS_PAD:
        k_end = tl.minimum(k_end, tl.load(PadStart))
    inner_lo, inner_hi = _inner_keys(q_first, left, right, k_off, k_end, BLOCK_M, BLOCK_N)
    d1, d2, bias_past, bias_future = _regions(lo, hi, q_first - n_rel + 2 - k_off - BLOCK_N,
                                              q_first + BLOCK_M + n_rel - 2 - k_off, Bias, stride_br,
                                              head_off, n_rel, DT, HAS_BIAS, BLOCK_N)
    inner, inner_end, near_lo, near_hi = _loop_stages(lo, hi, inner_lo, inner_hi, d1, d2)
    return lo, hi, d1, d2, inner, inner_end, near_lo, near_hi, bias_past, bias_future


# The backward's passes over key tiles and over query tiles both undo RoPE and sum dS into the bias
# table's rows.


@triton.jit
def _unrope_store(dA, dB, cos, sin, DX, rows, n_rows, HEAD: tl.constexpr):
    """Undo RoPE on (dA, dB): a = x1 cos - x2 sin and b = x1 sin + x2 cos, so dx1 = dA cos + dB sin and
    dx2 = dB cos - dA sin. Writes dx, contiguous rows of HEAD with each pair side by side, as whole rows
    joined on chip (two strided halves would store 2 bytes apiece), and returns (dx1, dx2), fp32."""
    offs = rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    dx1 = dA * cos + dB * sin
    dx2 = dB * cos - dA * sin
    tl.store(DX + offs, tl.interleave(dx1, dx2).to(DX.dtype.element_ty), mask=rows[:, None] < n_rows)
    return dx1, dx2


@triton.jit
def _store_angle_partial(u1, u2, du1, du2, pos, G, g_row):
    """G[g_row, m] = sum_t dphi[t, m] pos[t], from which phi = (s pos) w gives ds and dw.

    dphi = a db - b da for a rotated pair (a, b) and its gradient; a rotation keeps this cross product,
    so it is also x1 dx2 - x2 dx1 for the pair before RoPE and its gradient: a pass that needs no a or b
    does not rotate x for its angles. (u1, u2, du1, du2): (rows, HALF) fp32, either pair."""
    HALF: tl.constexpr = u1.shape[1]
    # A row no query attended has a zero gradient and contributes nothing, even where its x is not
    # finite (a padded key's, say): 0 * NaN would spread to every angle gradient.
    dphi = tl.where((du1 == 0.0) & (du2 == 0.0), 0.0, u1 * du2 - u2 * du1)
    tl.store(G + g_row * HALF + tl.arange(0, HALF), tl.sum(dphi * pos.to(tl.float32)[:, None], 0))


@triton.jit
def _bias_row_sums(ds, db_lo, db_hi, rel, Diag, n_rel, N_DIAG: tl.constexpr):
    """Add a NEAR tile's dS (the sums are right for a tile of any region) to the bias table's sums, row by
    row of the tile (queries in the dq pass, keys in the dk/dv pass): the end rows' (db_lo, db_hi: the
    pairs the clamp sends there; with n = 1 both are row 0). Its pairs on the inner rows, the diagonals
    d = i - j + n - 2 < 2n - 3 (table row d + 1), are stored at Diag[row, d] (rows of N_DIAG), which
    _store_diagonal_sums adds up once the program's loops are done: each (row, d) is one pair, so no two
    tiles write the same place.

    Stored, not summed here: summing the diagonals in the tile means skewing it (a gather along its
    rows), which costs the dq pass's NEAR loop a tenth more instructions than these predicated stores
    (docs/model.md, "Kernels")."""
    db_lo += tl.sum(tl.where(rel <= 1 - n_rel, ds, 0.0), 1)
    db_hi += tl.sum(tl.where((rel >= n_rel - 1) & (rel > 1 - n_rel), ds, 0.0), 1)
    d = rel + n_rel - 2
    rows = tl.arange(0, ds.shape[0])
    tl.store(Diag + rows[:, None] * N_DIAG + d, ds, mask=(d >= 0) & (d < 2 * n_rel - 3))
    return db_lo, db_hi


@triton.jit
def _side_sums(row_sums, db_lo, db_hi, past):
    """Add the row sums of a far tile's dS to the bias table's end row its pairs all take: the last
    (db_hi) for a PAST tile, the first (db_lo) for a FUTURE one; `past` is one value for the tile. By
    products with 1 and 0, a fused multiply-add per sum, where a select then an addition take two."""
    on_past = tl.where(past, 1.0, 0.0)
    return db_lo + row_sums * (1.0 - on_past), db_hi + row_sums * on_past


@triton.jit
def _store_diagonal_sums(DBias, Diag, other0, lo, hi, n_rel, SKEW: tl.constexpr, N_DIAG: tl.constexpr):
    """The bias table's inner rows of one program's share of its gradient, DBias[1 + d] (fp32): the
    sums over the rows of what _bias_row_sums stored at Diag[row, d] from the program's NEAR tiles, once
    those are done (the dq pass calls it after its last loop, when dq'' is stored and its accumulator's
    registers are free). The pair (row, d) has its other index (key in the dq pass, query in the dk/dv
    pass) at other0[row] + SKEW (d - (n - 2)) (SKEW -1 and 1); it was stored iff that lies in [lo, hi),
    the span of the NEAR tiles the program visited. Every thread of the program waits for the others'
    stores first."""
    tl.debug_barrier()
    d = tl.arange(0, N_DIAG)
    other = other0[:, None] + SKEW * (d - (n_rel - 2))[None, :]
    stored = (other >= lo) & (other < hi) & (d < 2 * n_rel - 3)[None, :]
    rows = tl.arange(0, other0.shape[0])
    sums = tl.sum(tl.load(Diag + rows[:, None] * N_DIAG + d[None, :], mask=stored, other=0.0), 0)
    tl.store(DBias + 1 + d, sums, mask=d < 2 * n_rel - 3)


@triton.jit
def _store_bias_sums(DBias, db_lo, db_hi, n_rel):
    """The bias table's end rows of one program's share of its gradient, at DBias (fp32, 2n - 1 values;
    the inner rows are _store_diagonal_sums')."""
    n_rows = 2 * n_rel - 1
    db_lo = tl.sum(db_lo, 0)
    db_hi = tl.sum(db_hi, 0)
    # with n = 1 the table is one row, which both ends share
    tl.store(DBias, tl.where(n_rows == 1, db_lo + db_hi, db_lo))
    tl.store(DBias + n_rows - 1, db_hi, mask=n_rows > 1)

# --------------------------------------------------------------------------------------------------
# Launcher helpers
# --------------------------------------------------------------------------------------------------


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand type of the kernels' tl.dot: the inputs' own, except bf16 under the interpreter."""
    if dtype == torch.bfloat16 and triton_interpreted():
        return torch.float32  # the interpreter mishandles bf16 arithmetic
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def precision(dtype: torch.dtype) -> str:
    """fp32 operands are multiplied exactly (ieee), not in tf32."""
    return "ieee" if dot_dtype(dtype) == torch.float32 else "tf32"


def layout_perm(h: int, layout: str, device) -> torch.Tensor:
    """Positions of RoPE's a-half then b-half in the layout: the row/column order of P~."""
    half = torch.arange(h // 2, device=device)
    if layout == "half_split":
        return torch.cat([half, half + h // 2])
    return torch.cat([2 * half, 2 * half + 1])


def folded_p(M: torch.Tensor, layout: str, keys_rotated: bool = False) -> torch.Tensor:
    """P~, fp32, (h, h): (M M^T)[perm][:, perm] / sqrt(h); with keys_rotated (keys given as k' = RoPE(k) M,
    which the kernels read as they are) M[perm] / sqrt(h), so that q'' = RoPE(q) M / sqrt(h) keeps
    M's column order, the keys'."""
    h = M.shape[0]
    Mf = M.float()
    perm = layout_perm(h, layout, M.device)
    if keys_rotated:
        return (Mf[perm] / math.sqrt(h)).contiguous()
    return ((Mf @ Mf.T) / math.sqrt(h))[perm][:, perm].contiguous()


def p_arg(M: torch.Tensor | None, layout: str, dtype: torch.dtype, device,
          keys_rotated: bool = False) -> tuple[torch.Tensor, bool]:
    """(P, HAS_P) for the kernels: P~ (folded_p) in the dot type of `dtype` inputs, or without M a
    one-element placeholder that only carries that type (never read: no fill, no launch)."""
    if M is None:
        return torch.empty(1, dtype=dot_dtype(dtype), device=device), False
    return folded_p(M, layout, keys_rotated).to(dot_dtype(dtype)), True


# Each kernel module's `default_blocks(h, arch)` holds two tile tables (docs/model.md, "Tile tables").
# sm_90's warpgroup products read their second operand from shared memory, so the same registers hold
# larger tiles there than under sm_80's mma.sync, where every warp keeps whole copies of it. The sm_80
# table serves every GPU but Hopper, so its launches fit the 99 KB of shared memory a block gets on
# sm_86 and sm_89.
TILE_TABLES = (80, 90)
_FORCED_TABLE: list[int] = []


def tile_arch(device: torch.device) -> int:
    """The tile table of launches on `device`: 90 on compute capability 9.x, 80 on every other GPU
    and under the interpreter; inside `tiles_of(arch)`, arch."""
    if _FORCED_TABLE:
        return _FORCED_TABLE[-1]
    if device.type != "cuda":
        return 80
    index = torch.cuda.current_device() if device.index is None else device.index
    return 90 if _major_capability(index) == 9 else 80


@functools.lru_cache(maxsize=None)
def _major_capability(index: int) -> int:
    """Once per GPU: launchers ask at every call (a decoding step is a few of them)."""
    return torch.cuda.get_device_capability(index)[0]


@contextlib.contextmanager
def tiles_of(arch: int):
    """Launch with the tile table of `arch` whatever the device: the ahead-of-time compile captures
    each target's launches so, the tests run sm_90's tiles under the interpreter, and the benches
    time sm_80's on Hopper."""
    if arch not in TILE_TABLES:
        raise ValueError(f"no tile table for sm_{arch}: there are {TILE_TABLES}")
    _FORCED_TABLE.append(arch)
    try:
        yield
    finally:
        _FORCED_TABLE.pop()


# Each kernel module's tables hold rows for 2-byte inputs and, apart, for fp32 (docs/model.md, "Tile
# tables"); inside rows_of(dtype) every launch takes `dtype`'s rows, whatever its inputs'.
_FORCED_ROWS: list[torch.dtype] = []


def exact_rows(dtype: torch.dtype) -> bool:
    """Whether launches with `dtype` inputs take the tables' rows of exact fp32 products (their _FP32
    tables), not those of 2-byte inputs: inputs of 4 bytes or more (bf16, multiplied in fp32 under the
    interpreter, keeps its own); inside rows_of(d), whether d's do."""
    return (_FORCED_ROWS[-1] if _FORCED_ROWS else dtype).itemsize > 2


@contextlib.contextmanager
def rows_of(dtype: torch.dtype):
    """Launch on the tile rows of `dtype` inputs whatever the inputs' dtype: the interpreter, which runs
    no bf16, runs the tiles of the GPU's fast path on fp32 inputs so (the tests of the tile tables,
    benches/static_counts.py)."""
    _FORCED_ROWS.append(dtype)
    try:
        yield
    finally:
        _FORCED_ROWS.pop()


# Tests shrink the tiles (e.g. 16) so that ragged and multi-tile cases happen at small T. The one
# override that the forward and backward launchers both read.
BLOCK_OVERRIDE: dict = {}


def with_override(blocks: dict) -> dict:
    """One launch's row of a tile table, with the tests' BLOCK_OVERRIDE of the sizes it has."""
    return {**blocks, **{k: v for k, v in BLOCK_OVERRIDE.items() if k in blocks}}


# Whether the loops over key tiles take a tile's padding flags by one unmasked load (_key_ok), per tile
# table. Comparing each key with Tk as well kept the column index of every key a thread holds live through
# the masked loops, a register each: on sm_90 the unmasked load takes the forward's masked loop at h = 64
# from 1,031 to 936 instructions (Triton 3.8; 3.6: 1,647 to 1,090; 3.9: 1,153 to 951, and its 36-byte
# spill gone), but on sm_80 from 657 to 869, its selects and byte permutes from 60 to 277, and decoding's
# (16 query rows, sm_90) from 453 to 466 (3.9: 464 to 540), which keeps the compare
# (docs/model.md, "Padding").
PAD_TILES_ON = {80: False, 90: True}


def _pad_arg(key_padding_mask, like, dtype=torch.uint8, tile=1):
    """(flags, batch stride, key stride, whether there are any) of a (B, Tk) bool key_padding_mask, copied
    into rows of whole key tiles of `tile` keys, those past Tk set (padded), so that a kernel loads a tile's
    flags with no mask (_key_ok). int32 for the forward, whose masked loops load a key tile's flags inside
    the pipeline, where a 4-byte element is copied asynchronously and a byte is waited on; the backward
    takes int32 on sm_80's tile table and bytes on sm_90's (attention_backward._PAD_FLAGS)."""
    if key_padding_mask is None:
        return like, 0, 0, False
    B, Tk = key_padding_mask.shape
    pad = torch.ones((B, triton.cdiv(Tk, tile) * tile), dtype=dtype, device=key_padding_mask.device)
    pad[:, :Tk] = key_padding_mask
    return pad, pad.stride(0), pad.stride(1), True


def _bias_arg(bias, like):
    """(bias, row stride, head stride, n, whether there is one): the bias as it is, any float dtype and
    strides; the kernels round what they load of it to the dot type (_bias_tile)."""
    if bias is None:
        return like, 0, 0, 1, False
    return bias, bias.stride(0), bias.stride(1), (bias.shape[0] + 1) // 2, True


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def triton_dtype(dtype: torch.dtype):
    """The Triton type of a dot type (dot_dtype), for a kernel that takes it as a constexpr."""
    return _TRITON_DTYPES[dtype]
