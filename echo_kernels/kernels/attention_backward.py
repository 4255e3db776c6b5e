"""Fused Echo attention, backward: dq, dk, dv, dM, ds, dw and dbias without a T x T tensor.

Notation of the forward (echo_kernels.kernels.attention): a, b = RoPE halves, q'' = [a_q b_q] @ P~
(P~ = permuted M M^T / sqrt(h); without M, P~ = I / sqrt(h) and no product is made with it),
logits = q''_A a_k^T + q''_B b_k^T + bias, p = exp(logits - lse).
With D_i = sum_d dO_id O_id, the score gradient is dS = p * (dO v^T - D), and

    dv = p^T dO,    d(a_k, b_k) = dS^T (q''_A, q''_B),    d(q''_A, q''_B) = dS (a_k, b_k)
    d(a_q, b_q) = d(q''_A, q''_B) P~^T,    dP~ = [a_q b_q]^T d(q''_A, q''_B)
    dbias[r, head] = sum of dS over the pairs with clamp(i - j) + n - 1 = r

The passes, in launch order:

    delta      per query row: D
    rotation   q'' = RoPE(q) @ P~ and RoPE(k) in the dot type, by the forward's own pass and tiles
               (echo_kernels.kernels.attention_operands.rotated_rows), so every pass below multiplies the very
               q'' and k' the forward's probabilities came from, loading contiguous rows (written once,
               read by every pass below instead of each tile rotating its rows again); with M, RoPE(q)
               too, which dP~ takes
    dkdv       per key tile, looping over the query tiles the band reaches: dv and d(a_k, b_k) (fp32)
    unrope     per key tile: dk from d(a_k, b_k) (undoing RoPE) and the keys' angle partials (not run
               for keys given rotated, keys_rotated: dk = dk', as the dk/dv pass summed it)
    dq         per query tile, looping over the key tiles: d(q''_A, q''_B) and the tile's share of dbias
    unrotate   a few programs per (batch, head), each over several query tiles: d(a_q, b_q) =
               d(q'') P~^T, dq (undoing RoPE), the queries' angle partials, one dP~ partial per program
               (without M: one program per tile, d(a_q, b_q) = d(q'') / sqrt(h), no dP~ at all)

The kernels of the passes over key tiles (dkdv, unrope) are in attention_backward_keys, those over
query tiles (delta, dq, unrotate) in attention_backward_queries; this module holds their tile tables
and the launcher.

dkdv and dq recompute the logits tile by tile, as flash attention does, and hold only their
accumulators and the operands of the tile at hand: the RoPE undo, the angles and the (h, h) dP~ sums
live in the light passes, which keeps every pass free of register spills under Triton 3.8 (python -m
echo_kernels.aot; docs/model.md, "Tile tables", for 3.6 and 3.9). dphi = a db - b da gives the
gradient of the angles phi = s * pos * w.

Both run three loops over their tiles, as the forward does, so that their code stays small (each loop
is its own copy of the body, with the software pipeliner's prologue and epilogue): the far tiles inside
the band and before any padding, of both sides, with no mask (the bias one value per side, picked by a
select); the tiles straddling the diagonal (NEAR), whose bias each reads whole from the pass's own
table of the few there are (echo_kernels.kernels.attention_operands.near_bias_tiles at the pass's tile shape;
dkdv's (keys, queries) tiles are those of the bias rows reversed, at j - i); then the tiles masks can
bite (attention_common._loop_stages). The dk/dv pass takes the NEAR tiles inside the band unmasked, as
the forward, and its ragged last key tile too (a key's dS reaches only its own rows of dk and dv, and
those past Tk are not stored), and its masked loop takes every other tile, NEAR or far. A pass that sums
dbias (dq, or dkdv summing dq) takes every NEAR tile masked, storing the tile's pairs on the bias table's
inner rows, and its masked loop the far tiles left (attention_common._far_masked_tiles).

dbias is summed where dS already is, in the dq kernel's loop, split by where the clamp sends the
pairs. The two end rows (|i - j| >= n - 1: nearly every pair) are row sums of dS. The 2n - 3 inner
rows are single diagonals i - j = const, which only the tiles straddling the diagonal (NEAR) hold:
each such tile stores its pairs on them at (query, diagonal) in its program's scratch rows, one pair
per place, and the program sums the rows once its loops are done (attention_common._bias_row_sums
and _store_diagonal_sums). Products with q'' and RoPE(k) take their rows [A | B] whole: one tl.dot each.

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

from ..checks import int32_offsets
from . import ATTENTION_HEAD_WIDTHS, ECHO_MAX_REL_DIST, launch_options
from .attention import default_blocks as forward_blocks
from .attention import first_padded_key
from .attention_backward_keys import _attn_bwd_dkdv_kernel, _attn_bwd_unrope_kernel
from .attention_backward_queries import (
    _attn_bwd_delta_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_dq_unrotate_kernel,
)
from .attention_common import (
    PAD_TILES_ON,
    _bias_arg,
    _pad_arg,
    exact_rows,
    layout_perm,
    p_arg,
    precision,
    tile_arch,
    with_override,
)
from .attention_operands import attention_operands, near_bias_args, rotated_rows
from .spec import DTYPE_NAMES, KernelSpec, dtype_named, pointer_types, precision_of, signature_of

# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


# The memory-bound passes, per head width: the same launch on both tile tables. unrotate is the pass with
# M ("rope_then_m": dP~'s products, and P~'s four blocks held through its tiles), unrotate_no_m without;
# each spills nothing under Triton 3.6, 3.8 and 3.9 (with M at h = 64, 64 rows on 8 warps spill on sm_80;
# at h = 128, 8 warps take 1.4 to 1.9 times the instructions per row of 4: docs/model.md, "Light passes").
_LIGHT_BLOCKS = {
    32: {"delta": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1},
         "unrope": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1},
         "unrotate": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2},
         "unrotate_no_m": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2}},
    64: {"delta": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1},
         "unrope": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1},
         "unrotate": {"BLOCK_M": 32, "num_warps": 4, "num_stages": 2},
         "unrotate_no_m": {"BLOCK_M": 64, "num_warps": 8, "num_stages": 1}},
    128: {"delta": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1},
          "unrope": {"BLOCK_M": 32, "num_warps": 4, "num_stages": 1},
          "unrotate": {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1},  # 2 stages spill on sm_80
          "unrotate_no_m": {"BLOCK_M": 16, "num_warps": 8, "num_stages": 2}},
}

# The two passes that recompute the logits, per (head width, tile table). On sm_80 a chain of dots
# puts every warp along the rows of the tile (16 rows each at least; a warp past the tile's rows
# repeats another's products), and each warp then holds whole copies of the second operands: hence
# dkdv's short query tiles (BLOCK_M, those operands' rows) and dq's short key tiles. sm_90's warpgroup
# products read that operand from shared memory, so its tiles can be larger. Each entry is, of the
# shapes tried that spill nothing under Triton 3.6, 3.8 and 3.9, one whose loop inside the band
# executes the fewest instructions per (query, key) pair or nearly (docs/model.md, "Tile tables"),
# except sm_90's dq pass at h = 32 and 64, which keeps 32 keys: 64 run fewer per pair, but 2 CTAs per
# SM where 32 run 4 and 3 (221 and 246 registers under Triton 3.8), and twice the NEAR loop's work.
# Three stages, as the forward's loops, wherever the third keeps every launch's CTAs per SM (the plain
# kernel's too, which takes these rows) under Triton 3.6, 3.8 and 3.9, spills nothing and fits sm_80's
# 99 KB. Two: sm_80's dk/dv at h = 32 (3.6: 3 CTAs per SM to 2) and at h = 128 (103 KB), its dq at
# h = 128 (the plain kernel's: 4 to 3), and sm_90's dq at h = 32 (3.8 in fp16: 3 to 2) and h = 64
# (3.6, no padding: 3 to 2).
_HEAVY_BLOCKS = {
    (32, 80): dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
                   dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)),
    (64, 80): dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
                   # 64 queries: at 128 the tile takes 108 KB of shared memory, past sm_86's and sm_89's 99
                   dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)),
    (128, 80): dict(dkdv=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                    dq=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)),
    (32, 90): dict(dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                   dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
    (64, 90): dict(dkdv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),  # 4 warps spill (3.6)
                   dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
    (128, 90): dict(dkdv=dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
                    dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)),  # 64 keys spill
}

# The dk/dv pass when it also sums dq (DQ_IN_KEY_PASS): dk/dv's accumulators, and per query tile one
# product more and the bias table's sums. On sm_80, the spill-free shape whose loop inside the band
# executes the fewest warp-instructions per (query, key) pair; on sm_90 the fewest too, though they
# spill: the shapes that spill nothing under Triton 3.8 execute more than the dk/dv and dq passes
# together (docs/model.md, "Backward passes").
_KEY_PASS_BLOCKS = {
    (32, 80): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    (64, 80): dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
    (128, 80): dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
    (32, 90): dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    (64, 90): dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    (128, 90): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
}

# The rows of inputs of 4 bytes, per head width, the same on both tile tables (as the forward's
# _FORWARD_BLOCKS_FP32: exact fp32 products, fused multiply-adds on either target): of the shapes tried,
# the largest that spills nothing on either target under Triton 3.8, with the plain kernel's dk/dv and dq
# passes, which take these rows (docs/model.md, "Tile tables"). The light passes keep their rows but
# the unrotate pass, whose products with P~ spill on them: of those tried, the rows that spill nothing
# under Triton 3.6 and 3.8, and least under 3.9 (148 bytes on sm_90 at h = 64, none elsewhere).
_HEAVY_BLOCKS_FP32 = {
    32: {"dkdv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
         "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}},
    64: {"dkdv": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
         "dq": {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2}},
    128: {"dkdv": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1},
          "dq": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1}},
}
_KEY_PASS_BLOCKS_FP32 = {
    32: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2},
    64: {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    128: {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1},
}
_UNROTATE_BLOCKS_FP32 = {
    32: {"BLOCK_M": 32, "num_warps": 4, "num_stages": 2},  # 64 rows spill 504 to 756 bytes under 3.9
    64: {"BLOCK_M": 16, "num_warps": 8, "num_stages": 1},  # 32 rows on 4 warps: 6,108 under 3.9 on sm_90
    128: {"BLOCK_M": 16, "num_warps": 8, "num_stages": 1},  # 4 warps spill under 3.8
}
_LIGHT_BLOCKS_FP32 = {h: {**rows, "unrotate": _UNROTATE_BLOCKS_FP32[h]} for h, rows in _LIGHT_BLOCKS.items()}

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


def default_blocks(h: int, arch: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """{kernel: tile sizes and launch shape} of the backward's passes at head width h (a built
    width) for `dtype` inputs on the tile table of `arch` (attention_common.tile_arch), in launch order,
    chosen so that no launch spills registers under Triton 3.8 (python -m echo_kernels.aot): 2-byte
    inputs take the tile table's rows, those multiplied exactly in fp32 the _FP32 tables'. Without a dq
    pass (sums_dq_in_key_pass) the dk/dv pass takes its row of the key pass's table."""
    exact = exact_rows(dtype)
    light = (_LIGHT_BLOCKS_FP32 if exact else _LIGHT_BLOCKS)[h]
    if sums_dq_in_key_pass(arch):
        heavy = {"dkdv": _KEY_PASS_BLOCKS_FP32[h] if exact else _KEY_PASS_BLOCKS[h, arch]}
    else:
        heavy = _HEAVY_BLOCKS_FP32[h] if exact else _HEAVY_BLOCKS[h, arch]
    return {name: dict(row) for name, row in {**light, **heavy}.items()}


def inner_diagonals(n_rel: int) -> int:
    """N_DIAG of the dq and dk/dv kernels: the 2n - 3 inner rows of a (2n - 1)-row bias table rounded
    up to a power of two (a tile's length in Triton), at least 1."""
    return triton.next_power_of_2(max(2 * n_rel - 3, 1))


def _diagonal_scratch(programs: int, rows: int, n_diag: int, has_bias: bool, device) -> torch.Tensor:
    """(programs, rows, n_diag) fp32, where each program of a pass that sums dbias stores the inner-row
    pairs of dS of its NEAR tiles and adds them up (attention_common._bias_row_sums); without a bias
    table a one-element placeholder. Not zeroed: a program reads back only what it stored."""
    shape = (programs, rows, n_diag) if has_bias else (1,)
    int32_offsets({"the dbias scratch (programs, rows, 2n - 3 rounded up to a power "
                   "of two)": math.prod(shape)})
    return torch.empty(shape, dtype=torch.float32, device=device)


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


# How the dk/dv and dq passes read the key-padding mask, per tile table. On sm_80, with the mask as bytes,
# the compiler gives the products of the tiles loaded under it (RoPE(k), v) operands of k-width 4 where
# the other products have 2, and then copies neither q'' nor dO, which feed one of each, asynchronously,
# in any loop. As int32 flags every load of both passes is an asynchronous copy, and dk/dv's loop inside
# the band at h = 64 executes 253 instructions where it executed 432 (Triton 3.8). On sm_90 the bytes
# cost dk/dv nothing, and as int32 the dq pass at h = 64 holds 205 registers where it holds 168, one CTA
# per SM fewer (docs/model.md, "Kernels").
_PAD_FLAGS = {80: torch.int32, 90: torch.uint8}


def _common_args(v, do, bias, key_padding_mask, arch: int, key_tile: int):
    """The bias and padding arguments and the strides the dkdv, dq and dbias passes share, on the tile
    table of `arch`; the padding flags in rows of whole key tiles of the passes' largest, key_tile."""
    bias_t, sbr, sbh, n_rel, has_bias = _bias_arg(bias, v)
    pad_t, spb, spt, has_pad = _pad_arg(key_padding_mask, v, _PAD_FLAGS[arch], key_tile)
    strides = (*v.stride(), *do.stride(), sbr, sbh, spb, spt)
    return bias_t, pad_t, strides, n_rel, has_bias, has_pad


def backward(do, q, k, v, out, lse, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout,
             keys_rotated=False):
    """Gradients of the forward launcher's out. Returns dq, dk, dv (input dtype, contiguous),
    dM (M's dtype, or None without M), dw (w's dtype), ds (fp32 scalar), dbias (bias's dtype, or None).
    keys_rotated: k was given as k' (the forward's keys_rotated): dk = dk', and the angles' gradients
    come from the queries alone."""
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    half = h // 2
    dev = q.device
    if Tq == 0 or Tk == 0 or B * H == 0:
        dbias = torch.zeros_like(bias) if bias is not None else None
        dM = torch.zeros_like(M) if M is not None else None
        return (q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), dM, torch.zeros_like(w),
                torch.zeros((), device=dev), dbias)
    int32_offsets({"the output's gradient": do})
    # every element written: dv by the dk/dv pass, dk by the unrope pass, dq by the unrotate pass (each
    # stores its whole tile, zeros where no pair reaches; tests/test_attention.py starts them as NaN)
    dq = torch.empty((B, H, Tq, h), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, Tk, h), dtype=k.dtype, device=dev)
    dv = torch.empty((B, H, Tk, h), dtype=v.dtype, device=dev)

    P, has_p = p_arg(M, layout, q.dtype, dev, keys_rotated)
    scale = 1.0 / math.sqrt(h)
    w32 = w.detach().float().contiguous()
    s32 = torch.as_tensor(s, dtype=torch.float32, device=dev).detach().reshape(1)
    arch = tile_arch(dev)
    cfg = {name: with_override(row) for name, row in default_blocks(h, arch, q.dtype).items()}
    # powers of two: a multiple of each
    key_tile = max(row["BLOCK_N"] for row in cfg.values() if "BLOCK_N" in row)
    bias_t, pad_t, strides, n_rel, has_bias, has_pad = _common_args(v, do, bias, key_padding_mask, arch,
                                                                    key_tile)
    pad_start = first_padded_key(pad_t) if has_pad else lse
    sizes, band = (H, Tq, Tk, n_rel), (left, right, q_offset, k_offset)
    prec = precision(q.dtype)

    c = cfg["delta"]
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=dev)
    n_tiles = triton.cdiv(Tq, c["BLOCK_M"])
    _attn_bwd_delta_kernel[(n_tiles * B * H,)](
        out, do, delta, *out.stride(), *do.stride(), H, Tq, n_tiles, HEAD=h, BLOCK=c["BLOCK_M"],
        **launch_options(c))

    # q'' and the keys exactly as the forward had them (its pass, by its tiles): the dk/dv, dq and dbias
    # passes read these contiguous rows, and recompute the forward's very probabilities from them.
    block = with_override(forward_blocks(h, arch, q.dtype))["BLOCK_N"]
    qq, kk = attention_operands(q, k, w32, s32, q_offset, k_offset, P, has_p, layout, keys_rotated, block)
    kk = kk.contiguous()

    c = cfg["dkdv"]
    with_dq = "dq" not in cfg
    # the bias as (keys, queries) tiles: the table of the reversed bias rows at j - i, with the band's mask
    # in them (sides swapped) for the masked loop, which then compares no j - i; summing dq, its masked
    # loops compare (their far tiles take one bias value per side, not a tile)
    near = near_bias_args(bias_t if has_bias else None, n_rel, k_offset - q_offset, c["BLOCK_N"],
                          c["BLOCK_M"], lse, None if with_dq else (right, left), Tk, Tq, dot=P.dtype,
                          flip=True)
    n_kblocks = triton.cdiv(Tk, c["BLOCK_N"])
    dkk = torch.empty((B, H, Tk, h), dtype=torch.float32, device=dev)  # d(a_k, b_k)
    n_rows = 2 * n_rel - 1  # of the bias table
    n_diag = inner_diagonals(n_rel)
    if with_dq:  # each program's sum of d(q''_A, q''_B), each key tile's share of the bias table
        key_groups = _key_groups_per_head(B * H, n_kblocks, dev)
        int32_offsets({"the key pass's sums of dq (B, H, groups, Tq, h)": B * H * key_groups * Tq * h})
        dqq = torch.zeros((B, H, key_groups, Tq, h), dtype=torch.float32, device=dev)
        db_part = torch.empty((B, H, n_kblocks, n_rows) if has_bias else (1,), dtype=torch.float32,
                              device=dev)
        diag = _diagonal_scratch(B * H * n_kblocks, c["BLOCK_N"], n_diag, has_bias, dev)
        grid = key_groups * B * H
    else:  # the dq pass writes these; this kernel does not touch them
        key_groups, dqq, db_part, diag, grid = 1, dkk, dkk, dkk, n_kblocks * B * H
    _attn_bwd_dkdv_kernel[(grid,)](
        kk, v, do, qq, bias_t, near.tiles, pad_t, pad_start, lse, delta, dkk, dv, dqq, db_part, diag,
        *strides, *sizes, near.count, near.first, near.n_near, near.left_edge0, near.right_edge0, *band,
        n_kblocks, key_groups, HEAD=h, HAS_BIAS=has_bias, HAS_PAD=has_pad, BLOCK_M=c["BLOCK_M"],
        BLOCK_N=c["BLOCK_N"], WITH_DQ=with_dq, N_DIAG=n_diag, PRECISION=prec,
        **launch_options(c))
    if keys_rotated:  # d(keys) is dk itself: no RoPE to undo, no angle partials
        dk.copy_(dkk)
    else:
        c = cfg["unrope"]
        n_ktiles = triton.cdiv(Tk, c["BLOCK_M"])
        g_k = torch.empty((B * H * n_ktiles, half), dtype=torch.float32, device=dev)
        _attn_bwd_unrope_kernel[(n_ktiles * B * H,)](
            k, w32, s32, dkk, dk, g_k, *k.stride(), H, Tk, k_offset, n_ktiles, HEAD=h, BLOCK=c["BLOCK_M"],
            **launch_options(c))

    if with_dq:
        # the groups' sums added in a fixed order, rounded to the dot type as the dq pass writes them
        dqq = dqq.sum(2).to(P.dtype)
    else:
        c = cfg["dq"]
        n_qblocks = triton.cdiv(Tq, c["BLOCK_M"])
        dqq = torch.empty((B, H, Tq, h), dtype=P.dtype, device=dev)  # d(q''_A, q''_B)
        # each query tile's share of the bias table
        db_part = torch.empty((B, H, n_qblocks, n_rows) if has_bias else (1,), dtype=torch.float32,
                              device=dev)
        near = near_bias_args(bias_t if has_bias else None, n_rel, q_offset - k_offset, c["BLOCK_M"],
                              c["BLOCK_N"], lse, dot=P.dtype)
        diag = _diagonal_scratch(B * H * n_qblocks, c["BLOCK_M"], n_diag, has_bias, dev)
        _attn_bwd_dq_kernel[(n_qblocks * B * H,)](
            kk, v, do, qq, bias_t, near.tiles, pad_t, pad_start, lse, delta, dqq, db_part, diag, *strides,
            *sizes, near.count, near.first, *band, n_qblocks, HEAD=h, HAS_BIAS=has_bias, HAS_PAD=has_pad,
            PAD_TILES=PAD_TILES_ON[arch], BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], N_DIAG=n_diag,
            PRECISION=prec, **launch_options(c))

    if keys_rotated and not has_p and layout == "interleaved":  # d(q'') in the unrotate pass's [a | b] order
        dqq = dqq[..., layout_perm(h, layout, dev)].contiguous()
    c = cfg["unrotate" if has_p else "unrotate_no_m"]
    n_qtiles = triton.cdiv(Tq, c["BLOCK_M"])
    g_q = torch.empty((B * H * n_qtiles, half), dtype=torch.float32, device=dev)
    # dP~ partials bound the programs per (batch, head); without M every tile is its own program
    n_groups = _dq_programs_per_head(B * H, n_qtiles, dev) if has_p else n_qtiles
    dp_part = torch.empty((B * H * n_groups, h, h) if has_p else (1,), dtype=torch.float32, device=dev)
    # with M, dP~ takes RoPE(q) as the rotation pass writes it (rows [a | b], not stored beside q'')
    rows = rotated_rows(q, w32, s32, q_offset, P.dtype, block) if has_p else q
    _attn_bwd_dq_unrotate_kernel[(n_groups * B * H,)](
        rows, P, w32, s32, dqq, dq, g_q, dp_part, *rows.stride(), H, Tq, q_offset, scale, n_groups,
        HEAD=h, HAS_P=has_p, BLOCK_M=c["BLOCK_M"], PRECISION=prec, **launch_options(c))

    # Fixed-order reductions of the per-program partials.
    g = g_q.sum(0)  # sum_t dphi[t, m] pos[t] over the queries, and the keys where the op rotated them
    if not keys_rotated:
        g = g + g_k.sum(0)
    s_val = s32[0]
    dw = (s_val * g).to(w.dtype)
    ds = (g * w32).sum()
    dM = None
    if has_p and keys_rotated:  # P~ = M[perm] / sqrt(h)
        dM = torch.empty_like(M, dtype=torch.float32)
        dM[layout_perm(h, layout, dev)] = dp_part.sum(0) / math.sqrt(h)
        dM = dM.to(M.dtype)
    elif has_p:
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
    {32, 64, 128}, bf16, fp16 and fp32, with a bias table and a key-padding mask, with M and without
    (names ending in _no_m); the dk/dv pass summing dq (dkdv_dq) beside the dk/dv and dq passes,
    whichever DQ_IN_KEY_PASS picks."""
    specs = []
    pad_flags = pointer_types()[_PAD_FLAGS[arch]]
    for h in ATTENTION_HEAD_WIDTHS:
        for dt in DTYPE_NAMES:
            with dq_in_key_pass(False):
                g = default_blocks(h, arch, dtype_named(dt))
            with dq_in_key_pass(True):
                key_pass = default_blocks(h, arch, dtype_named(dt))["dkdv"]
            prec = precision_of(dt)
            ptrs = {n: f"*{dt}" for n in ("Q", "K", "KK", "V", "DO", "P", "QQ", "DV", "DQ", "DQQ", "O")}
            ptrs.update(W="*fp32", S="*fp32", Bias="*fp32", Tiles="*fp32", Pad=pad_flags, Lse="*fp32",
                        Delta="*fp32", G="*fp32", DBias="*fp32", Diag="*fp32", DP="*fp32", DKK="*fp32",
                        DK=f"*{dt}", PadStart="*i32", scale="fp32")
            dkdv_ptrs = dict(ptrs, DQQ="*fp32")  # dq's fp32 sums (without dq, a placeholder of that type)
            for name, fn, ce in (
                ("delta", _attn_bwd_delta_kernel, dict(HEAD=h, BLOCK=g["delta"]["BLOCK_M"])),
                ("dkdv", _attn_bwd_dkdv_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=g["dkdv"]["BLOCK_M"],
                    BLOCK_N=g["dkdv"]["BLOCK_N"], WITH_DQ=False, N_DIAG=inner_diagonals(ECHO_MAX_REL_DIST),
                    PRECISION=prec)),
                ("dkdv_dq", _attn_bwd_dkdv_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=key_pass["BLOCK_M"],
                    BLOCK_N=key_pass["BLOCK_N"], WITH_DQ=True, N_DIAG=inner_diagonals(ECHO_MAX_REL_DIST),
                    PRECISION=prec)),
                ("unrope", _attn_bwd_unrope_kernel, dict(HEAD=h, BLOCK=g["unrope"]["BLOCK_M"])),
                ("dq", _attn_bwd_dq_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, PAD_TILES=PAD_TILES_ON[arch],
                    BLOCK_M=g["dq"]["BLOCK_M"], BLOCK_N=g["dq"]["BLOCK_N"],
                    N_DIAG=inner_diagonals(ECHO_MAX_REL_DIST), PRECISION=prec)),
                ("dq_unrotate", _attn_bwd_dq_unrotate_kernel, dict(
                    HEAD=h, HAS_P=True, BLOCK_M=g["unrotate"]["BLOCK_M"], PRECISION=prec)),
                ("dq_unrotate_no_m", _attn_bwd_dq_unrotate_kernel, dict(
                    HEAD=h, HAS_P=False, BLOCK_M=g["unrotate_no_m"]["BLOCK_M"], PRECISION=prec)),
            ):
                c = {"dq_unrotate": g["unrotate"], "dq_unrotate_no_m": g["unrotate_no_m"],
                     "dkdv_dq": key_pass}.get(name) or g[name]
                kinds = dkdv_ptrs if name.startswith("dkdv") else ptrs
                specs.append(KernelSpec(
                    f"attention_bwd_{name}_h{h}_{dt}", fn, signature_of(fn, kinds, ce), ce,
                    num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return specs
