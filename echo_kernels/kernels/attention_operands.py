"""The passes before attention, each once per call: what every attention pass reads, forward and backward.

- The rotation pass (_rope_rows_kernel, rotated_rows): RoPE(k), and q'' = RoPE(q) / sqrt(h), or
  RoPE(q) @ P~ with M (the "rope_then_m" order), as contiguous [a | b] rows in the dot type, so that the
  attention loops load plain contiguous tiles, which the compiler pipelines as asynchronous copies, and
  spend no sine or cosine (echo_kernels.kernels.attention says why).
- The bias table (_near_bias_kernel, near_bias_tiles): per head, the bias of the few tiles the clamp or
  the band can bite (the NEAR tiles, the two sides' constant tiles, the tiles of the band's edges), with the
  band's mask in it, which the loops read as whole tiles instead of gathering it.

docs/model.md, Kernels, describes both.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..checks import int32_offsets
from ..reference import UNBOUNDED
from . import COMPILE_OPTIONS
from .attention_common import (
    NEAR,
    _bias_tile,
    _load_p,
    _rotated_rows,
    _tile_and_head,
    precision,
    triton_dtype,
)
from .spec import KernelSpec, dtype_named, precision_of, signature_of


@triton.jit
def _rope_rows_kernel(
    X, P, W, S, XX, stride_xb, stride_xh, stride_xt, stride_xd, H, T, x_off, scale, n_tiles,
    HEAD: tl.constexpr, HAS_P: tl.constexpr, INTERLEAVE: tl.constexpr, BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK) tile of rows of one (batch, head), rotated: XX rows [a | b] * scale, or [a b] @ P~
    with HAS_P (the queries' q'' in the "rope_then_m" order), contiguous, in XX's type (the dot type, to
    which the loops would round them anyway). Every pass that reads these rows, forward or backward,
    reads this pass's output, so all of them multiply the very same q'' and k' (and, with M, the
    backward's dP~ the very same RoPE(q): this pass without P, at scale 1). INTERLEAVE (without P): rows
    [a_0 b_0 a_1 b_1 ...] instead, the "interleaved" layout's order, for keys given rotated in it."""
    HALF: tl.constexpr = HEAD // 2
    DT = XX.dtype.element_ty
    pid_t, pid_bh = _tile_and_head(n_tiles)
    X += (pid_bh // H) * stride_xb + (pid_bh % H) * stride_xh
    s = tl.load(S).to(tl.float32)
    rows = pid_t * BLOCK + tl.arange(0, BLOCK)
    a, b = _rotated_rows(X, rows, rows < T, stride_xt, stride_xd, x_off + rows, s, W, HALF)
    if HAS_P:
        p_aa, p_ab, p_ba, p_bb = _load_p(P, HALF)
        xa = tl.dot(a.to(DT), p_aa, input_precision=PRECISION)
        xa = tl.dot(b.to(DT), p_ba, xa, input_precision=PRECISION)
        xb = tl.dot(a.to(DT), p_ab, input_precision=PRECISION)
        xb = tl.dot(b.to(DT), p_bb, xb, input_precision=PRECISION)
    else:
        xa = a * scale
        xb = b * scale
    mask = rows[:, None] < T
    if INTERLEAVE:  # rows stored whole, a and b joined on chip: two strided halves would store 2 bytes apiece
        offs = pid_bh * T * HEAD + rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
        tl.store(XX + offs, tl.interleave(xa, xb).to(DT), mask=mask)
    else:
        offs = pid_bh * T * HEAD + rows[:, None] * HEAD + tl.arange(0, HALF)[None, :]
        tl.store(XX + offs, xa.to(DT), mask=mask)
        tl.store(XX + offs + HALF, xb.to(DT), mask=mask)


@triton.jit
def _near_bias_kernel(Bias, stride_br, stride_bh, Tiles, n_rel, first, n_near, first_right, left_edge0,
                      right_edge0, left, right, n_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      STEP: tl.constexpr, DT: tl.constexpr, FLIP: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of the table of one head, Tiles[head, t] (near_bias_tiles), by the
    gather (_bias_tile) that decoding's NEAR tiles run: for t < n_near the NEAR tile at offset
    i - j = first + STEP t of its top-left entry; the next two, every entry clamped to one end row (PAST,
    then FUTURE); after them those of the band's edges, at left_edge0 + STEP t (before first_right)
    and right_edge0 + STEP t. Outside the band -right <= i - j <= left, every tile but the two constant
    ones holds -inf. The bias is rounded to DT, the dot type (_bias_tile); FLIP: of the rows reversed,
    bias.flip(0)[clamp(rel) + n - 1] = bias[clamp(-rel) + n - 1], the table a pass holding its tiles as
    (keys, queries) reads."""
    pid_t, hd = _tile_and_head(n_tiles)
    top_left = tl.where(pid_t < n_near, first,
                        tl.where(pid_t < first_right, left_edge0, right_edge0)) + pid_t * STEP
    top_left = tl.where(pid_t == n_near, n_rel + BLOCK_N,
                        tl.where(pid_t == n_near + 1, -n_rel - BLOCK_M, top_left))
    rel = top_left + tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]
    if FLIP:
        bias = _bias_tile(-rel, Bias, stride_br, hd * stride_bh, n_rel, NEAR, DT)
    else:
        bias = _bias_tile(rel, Bias, stride_br, hd * stride_bh, n_rel, NEAR, DT)
    # two comparisons, not _in_band: an edge tile's rel lies up to a tile beyond the positions, where
    # rel + right may not fit int32
    outside = ((rel > left) | (rel < -right)) & ((pid_t < n_near) | (pid_t >= n_near + 2))
    offs = (hd * n_tiles + pid_t) * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N \
        + tl.arange(0, BLOCK_N)[None, :]
    tl.store(Tiles + offs, tl.where(outside, float("-inf"), bias).to(Tiles.dtype.element_ty))


def rotated_rows(x: torch.Tensor, w32: torch.Tensor, s32: torch.Tensor, offset: int, dot_type: torch.dtype,
                 block: int, P: torch.Tensor | None = None, scale: float = 1.0,
                 interleave: bool = False) -> torch.Tensor:
    """RoPE(x) for the loops, by tiles of `block` rows (the forward's BLOCK_N, whichever pass asks, so that
    every pass reads the same bits), fewer where x has fewer (a decoding step's query: 16, not 128 rows of
    angles): the keys' k' (scale 1), the queries' q'' = RoPE(q) * scale, or
    RoPE(q) @ P given P (the folded (h, h) P~ of attention_common.p_arg, which holds the scale).
    x: (B, H, T, h) any strides -> (B, H, T, h) contiguous in dot_type, each row [a | b]
    (a = x_even cos - x_odd sin, b = x_even sin + x_odd cos), or with interleave (no P)
    [a_0 b_0 a_1 b_1 ...]."""
    B, H, T, h = x.shape
    xx = torch.empty((B, H, T, h), dtype=dot_type, device=x.device)
    block = min(block, max(16, triton.next_power_of_2(T)))  # tl.dot's least tile side with P
    n_tiles = triton.cdiv(T, block)
    prec = precision(x.dtype)
    warps = tile_pass_warps(block * h, exact_products=P is not None and prec == "ieee")
    if xx.numel():  # a memory-bound pass: nothing to pipeline
        _rope_rows_kernel[(n_tiles * B * H,)](
            x, xx if P is None else P, w32, s32, xx, *x.stride(), H, T, offset, scale, n_tiles, HEAD=h,
            HAS_P=P is not None, INTERLEAVE=interleave, BLOCK=block, PRECISION=prec, num_warps=warps,
            num_stages=1, **COMPILE_OPTIONS)
    return xx


def attention_operands(q: torch.Tensor, k: torch.Tensor, w32: torch.Tensor, s32: torch.Tensor, q_offset: int,
                       k_offset: int, P: torch.Tensor, has_p: bool, layout: str, keys_rotated: bool,
                       block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q'', keys): the rows every pass multiplies, forward and backward alike (rotated_rows' tiles of
    `block` rows). The keys are RoPE(k), rows [a | b]; with keys_rotated, k itself (in the dot type, any
    strides: a decoding cache is not copied), and q'' is written in k's order: the layout's without P
    (whose [a | b] is "half_split"'s), M's columns' with P~ = M[perm] / sqrt(h) (attention_common.p_arg)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    interleave = keys_rotated and not has_p and layout == "interleaved"
    qq = rotated_rows(q, w32, s32, q_offset, P.dtype, block, P if has_p else None, scale, interleave)
    if keys_rotated:
        return qq, k.to(P.dtype)
    return qq, rotated_rows(k, w32, s32, k_offset, P.dtype, block)


def tile_pass_warps(elements: int, exact_products: bool = False) -> int:
    """Warps of a memory-bound pass over tiles of `elements` (RoPE(k), the NEAR bias tiles): 4, and 8 for
    tiles past 64 x 64 elements, where 4 spill registers (sm_90), or for a pass multiplying by P~ in exact
    fp32 (fused multiply-adds, each thread holding whole rows of P~) from 2,048 elements (16 rows at
    h = 128 spill on 4 warps on sm_80)."""
    return 8 if elements > 64 * 64 or (exact_products and elements >= 2048) else 4


class BiasTable(NamedTuple):
    """near_bias_tiles' table: tiles (H, count, block_m, block_n) (fp32, or the forward's dot type) and where
    each of its tiles sits."""

    tiles: torch.Tensor
    count: int
    first: int  # the NEAR tile t < n_near holds the bias at i - j = first + step t in its top-left entry
    n_near: int  # then the PAST constant tile and the FUTURE one
    n_left: int  # then the left edge's tiles, t at left_edge0 + step t, then the right edge's likewise
    left_edge0: int
    right_edge0: int


def _edge_offsets(low: int, high: int, offset: int, step: int) -> tuple[int, int]:
    """(first, count) of the offsets in [low, high] congruent to offset modulo step."""
    first = low + (offset - low) % step
    return first, max(0, (high - first) // step + 1)


def near_bias_tiles(bias: torch.Tensor, n_rel: int, offset: int, block_m: int, block_n: int,
                    left: int = UNBOUNDED, right: int = UNBOUNDED, dtype: torch.dtype = torch.float32,
                    dot: torch.dtype = torch.float32, flip: bool = False) -> BiasTable:
    """The bias of the tiles of a launch's (block_m, block_n) tiles that the clamp or the band can bite, as
    a table of them per head, with the band -right <= i - j <= left in it (-inf outside).

    bias: (2n - 1, H), n = n_rel; offset: q_offset - k_offset. A NEAR tile (attention_common: neither
    wholly at i - j >= n - 1 nor wholly at i - j <= 1 - n) of the query tile at row r0 and the key tile at
    column c0 has i - j = delta + r - c at its entry (r, c), delta = offset + r0 - c0, and
    3 - n - block_m <= delta <= block_n + n - 3. Tile rows are multiples of block_m and tile columns of
    block_n, so the deltas are those of that range congruent to offset modulo step = min(block_m,
    block_n): a few tiles, which every query tile and batch of the launch shares. A pass holding its tiles
    as (keys, queries) (the backward's dk/dv) takes, with flip, the table of bias.flip(0) at -offset, block
    sides and band sides swapped: bias[clamp(i - j)] = bias.flip(0)[clamp(j - i)], and -right <= i - j <=
    left is -left <= j - i <= right.

    After them, two tiles of one value each: the PAST end row bias[2n - 2] and the FUTURE one bias[0], which
    the masked loops read for their far tiles inside the band, so that one loop serves every region.

    Then, for a side of the band that is not UNBOUNDED, the tiles that cross its edge: the left one's at
    left - block_m + 2 <= delta <= left + block_n - 1, the right one's at -right - block_m + 1 <= delta <=
    -right + block_n - 2 (attention_common._band_bias). near_bias_args passes a side as UNBOUNDED where no
    pair of the launch reaches it.

    dtype: the table's, fp32 (the backward's passes) or the forward's dot type, half the bytes per tile;
    dot: the launch's dot type, to which every value is rounded, as every pass rounds the bias
    (attention_common._bias_tile).
    """
    step = min(block_m, block_n)
    first, n_near = _edge_offsets(3 - n_rel - block_m, block_n + n_rel - 3, offset, step)
    first_edge = n_near + 2
    left_first, n_left = _edge_offsets(left - block_m + 2, left + block_n - 1, offset, step) \
        if left < UNBOUNDED else (0, 0)
    right_first, n_right = _edge_offsets(-right - block_m + 1, -right + block_n - 2, offset, step) \
        if right < UNBOUNDED else (0, 0)
    count = first_edge + n_left + n_right
    # each edge's offsets counted from the table's start: tile t of the left edge at left_edge0 + step t
    left_edge0 = left_first - first_edge * step if n_left else 0
    right_edge0 = right_first - (first_edge + n_left) * step if n_right else 0
    H = bias.shape[1]
    int32_offsets({"the bias table (H, tiles, rows, keys)": H * count * block_m * block_n})
    tiles = torch.empty((H, count, block_m, block_n), dtype=dtype, device=bias.device)
    _near_bias_kernel[(count * H,)](bias, *bias.stride(), tiles, n_rel, first, n_near, first_edge + n_left,
                                    left_edge0, right_edge0, left, right, count, BLOCK_M=block_m,
                                    BLOCK_N=block_n, STEP=step, DT=triton_dtype(dot), FLIP=flip, num_stages=1,
                                    num_warps=tile_pass_warps(block_m * block_n), **COMPILE_OPTIONS)
    return BiasTable(tiles, count, first, n_near, n_left, left_edge0, right_edge0)


def near_bias_args(bias: torch.Tensor | None, n_rel: int, offset: int, block_m: int, block_n: int,
                   like: torch.Tensor, band: tuple[int, int] | None = None, Tq: int = 0, Tk: int = 0,
                   dtype: torch.dtype = torch.float32, dot: torch.dtype = torch.float32,
                   flip: bool = False) -> BiasTable:
    """A launch's table of (block_m, block_n) bias tiles (near_bias_tiles), with the band (left, right) in
    it when one is given; a side that no pair of i - j in [offset - Tk + 1, offset + Tq - 1] reaches gets no
    tiles of its edge. Without a bias (None), the placeholder `like`, which no loop reads."""
    if bias is None:
        return BiasTable(like, 1, 0, 0, 0, 0, 0)
    left, right = band if band is not None else (UNBOUNDED, UNBOUNDED)
    return near_bias_tiles(bias, n_rel, offset, block_m, block_n,
                           left if left < offset + Tq - 1 else UNBOUNDED,
                           right if right < Tk - 1 - offset else UNBOUNDED, dtype, dot, flip)


def aot_specs_of(h: int, dt: str, blocks: dict) -> list[KernelSpec]:
    """The launches of these passes at head width h, dtype dt ("bf16", "fp16" or "fp32") and the forward's
    tiles `blocks`: the rotation of the keys and of the queries (rope; rope_p: q'' = RoPE(q) @ P~, the
    "rope_then_m" order; at h = 64 bf16, rope_..._interleaved: the queries of a decoding step against keys
    cached rotated in the "interleaved" layout), and the NEAR tiles' bias (near_bias_tiles). The forward's
    module lists them beside its own (echo_kernels.kernels.attention.aot_specs)."""
    specs = []
    ptrs = {"X": f"*{dt}", "P": f"*{dt}", "XX": f"*{dt}", "W": "*fp32", "S": "*fp32", "scale": "fp32"}
    for has_p, suffix in ((False, ""), (True, "_p")):  # k' and q'' without M; q'' = RoPE(q) @ P~
        ce = dict(HEAD=h, HAS_P=has_p, INTERLEAVE=False, BLOCK=blocks["BLOCK_N"], PRECISION=precision_of(dt))
        warps = tile_pass_warps(h * blocks["BLOCK_N"], exact_products=has_p and precision_of(dt) == "ieee")
        specs.append(KernelSpec(f"attention_rope{suffix}_h{h}_{dt}", _rope_rows_kernel,
                                signature_of(_rope_rows_kernel, ptrs, ce), ce, num_warps=warps, num_stages=1))
    if h == 64 and dt == "bf16":  # a decoding step's query: one row, a tile of 16
        ce = dict(ce, HAS_P=False, INTERLEAVE=True, BLOCK=16)
        specs.append(KernelSpec(f"attention_rope_h{h}_{dt}_interleaved", _rope_rows_kernel,
                                signature_of(_rope_rows_kernel, ptrs, ce), ce,
                                num_warps=tile_pass_warps(h * 16), num_stages=1))
    ce = dict(BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"],
              STEP=min(blocks["BLOCK_M"], blocks["BLOCK_N"]), DT=triton_dtype(dtype_named(dt)), FLIP=False)
    specs.append(KernelSpec(f"attention_near_bias_h{h}_{dt}", _near_bias_kernel,
                            signature_of(_near_bias_kernel, {"Bias": "*fp32", "Tiles": f"*{dt}"}, ce), ce,
                            num_warps=tile_pass_warps(blocks["BLOCK_M"] * blocks["BLOCK_N"]), num_stages=1))
    return specs
