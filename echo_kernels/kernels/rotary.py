"""Triton kernels of y = RoPE(x @ M), forward and backward, and their launchers (docs/model.md,
Rotary embedding).

    x: (B, T, H, h), any strides (e.g. a transpose(1, 2) view of (B, H, T, h)); M: (h, h);
    w: (h/2,); s: scalar (a tensor when learned, else a float); positions offset + t.

With u = x @ M, pair m is (u[2m], u[2m+1]). De-interleaving registers is awkward, so M is split by
columns instead: u_e = x @ M[:, 0::2] and u_o = x @ M[:, 1::2] are two dots against column slices
of M loaded with strides. At phi = (s * t) * w[m]

    a = u_e cos(phi) - u_o sin(phi),   b = u_e sin(phi) + u_o cos(phi)

and a, b go to their output columns by layout: half_split [a..., b...], interleaved [a0, b0, ...] (its
rows stored and read whole, a and b joined or split on chip).

A program owns a block of BLOCK_T positions of one batch row and HEADS heads. The angles depend on
the position only, so cos/sin are computed once per program and reused for each head; M's slices
are loaded once per program and stay on chip. No cos/sin table ever goes through device memory.

Backward, with g = RoPE^T(dy) in pair form (du_e, du_o) = (da cos + db sin, db cos - da sin):

    dx = du_e @ M[:, 0::2]^T + du_o @ M[:, 1::2]^T
    dM[:, 0::2] = sum over tokens of x^T du_e,  dM[:, 1::2] = x^T du_o
    dphi = a db - b da   (da/dphi = -b, db/dphi = a),  so  dw[m] = s sum_t t dphi,
    ds = sum_m w[m] sum_t t dphi

and dphi = u_e du_o - u_o du_e, the form the kernel uses (no a, b). The backward program recomputes u
from x (two more dots; x is read anyway for dM), so nothing but the inputs is saved. It loads each
head's x and dy tiles one head ahead, into registers (see the kernel). dM and sum_t t dphi are
written as per-program partials and summed by torch in a fixed order: deterministic, no float atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import triton_interpreted
from ..checks import int32_offsets
from . import launch_options
from .angles import _sincos
from .spec import KernelSpec

HEAD_DIMS = (32, 64, 80, 128)  # the widths that aot_specs() compiles; any even h >= 2 works
BLOCK_T = 64  # forward: one warpgroup's worth of rows for the Hopper wgmma
BLOCK_T_BWD = 32  # backward: half the rows, for the registers its dM accumulators need (16: see _config)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_m_slices(M, stride_mk, stride_mn, k, p, k_mask, p_mask, TRANSPOSE: tl.constexpr):
    """M[:, 0::2] and M[:, 1::2] as (BLOCK_K, BLOCK_P), or their transposes (BLOCK_P, BLOCK_K)."""
    if TRANSPOSE:
        base = M + k[None, :] * stride_mk + (2 * p)[:, None] * stride_mn
        mask = p_mask[:, None] & k_mask[None, :]
    else:
        base = M + k[:, None] * stride_mk + (2 * p)[None, :] * stride_mn
        mask = k_mask[:, None] & p_mask[None, :]
    m_even = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    m_odd = tl.load(base + stride_mn, mask=mask, other=0.0).to(tl.float32)
    return m_even, m_odd


@triton.jit
def _angles(W, S, s_value, stride_w, offset, t, p, p_mask, S_IS_TENSOR: tl.constexpr):
    """cos and sin of phi[t, m] = (s * (offset + t)) * w[m], (BLOCK_T, BLOCK_P), fp32; and s * pos."""
    if S_IS_TENSOR:
        s = tl.load(S).to(tl.float32)  # a learned s stays on the device: no host sync
    else:
        s = s_value
    pos = (offset + t).to(tl.float32)
    w = tl.load(W + p * stride_w, mask=p_mask, other=0.0).to(tl.float32)
    phi = (s * pos)[:, None] * w[None, :]  # same order as the reference: (s * t) * w
    sin, cos = _sincos(phi)
    return cos, sin, pos


@triton.jit
def _pair_offsets(r, p, stride_t, stride_d, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr):
    """Offsets in a tile of rows r of the laid-out pairs: of a's and of b's columns in "half_split"
    [a | b], (rows, BLOCK_P) each; and of whole rows, (rows, 2 BLOCK_P), with the columns that exist,
    for "interleaved" [a0 b0 a1 b1 ...], which is read and written whole, split and joined on chip
    (as two strided halves it would take a 2-byte access per element)."""
    a = r[:, None] * stride_t + p[None, :] * stride_d
    c = tl.arange(0, 2 * BLOCK_P)
    return a, a + (HEAD_DIM // 2) * stride_d, r[:, None] * stride_t + c[None, :] * stride_d, c < HEAD_DIM


@triton.jit
def _tile(P, b, t0, head, stride_b, stride_t, stride_h):
    """Address of P[b, t0, head, 0], in int64: B T H h may pass 2^31 elements."""
    return P + b.to(tl.int64) * stride_b + t0.to(tl.int64) * stride_t + head.to(tl.int64) * stride_h


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32: exact (ieee) for fp32 operands, tensor cores for half ones."""
    if DOT_FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _rotary_fwd_kernel(
    X, M, W, S, Y,
    s_value, offset, T, H, n_head_chunks, n_t_blocks,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    stride_mk, stride_mn, stride_w,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HEADS, INTERLEAVED: tl.constexpr, S_IS_TENSOR: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Y[b, t, head, :] = layout(rotate(X[b, t, head, :] @ M)) for one (t block, b, head chunk)."""
    # a 1-D grid, t blocks fastest: CUDA caps a grid's second axis at 65535, which B * chunks can pass
    pid_t = tl.program_id(0) % n_t_blocks
    pid_bc = tl.program_id(0) // n_t_blocks
    pid_b = pid_bc // n_head_chunks
    head0 = (pid_bc % n_head_chunks) * HEADS
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)  # input features, padded to a power of two (h = 80 -> 128)
    p = tl.arange(0, BLOCK_P)  # pairs, padded likewise (40 -> 64)
    t_mask, k_mask, p_mask = t < T, k < HEAD_DIM, p < HEAD_DIM // 2

    # Dot operands: fp32 for fp32 x (and for bf16 under the interpreter, which mishandles bf16:
    # there the conversion comes right after each load), else x's half type, M rounded to it.
    operand = tl.float32 if DOT_FP32 else X.dtype.element_ty
    m_even, m_odd = _load_m_slices(M, stride_mk, stride_mn, k, p, k_mask, p_mask, False)
    m_even, m_odd = m_even.to(operand), m_odd.to(operand)
    cos, sin, _ = _angles(W, S, s_value, stride_w, offset, t, p, p_mask, S_IS_TENSOR)

    # Scalar int64 bases, small int32 offsets within a tile: a tile of 64-bit pointers would hold
    # two registers per element for the whole head loop.
    r = tl.arange(0, BLOCK_T)
    x_offsets = r[:, None] * stride_xt + k[None, :] * stride_xd
    a_offsets, b_offsets, pair_offsets, pair_ok = _pair_offsets(r, p, stride_yt, stride_yd, HEAD_DIM, BLOCK_P)
    x_mask = t_mask[:, None] & k_mask[None, :]
    for i in range(tl.minimum(HEADS, H - head0)):  # HEADS need not divide H: stop at the last head
        head = head0 + i
        x = tl.load(_tile(X, pid_b, pid_t * BLOCK_T, head, stride_xb, stride_xt, stride_xh) + x_offsets,
                    mask=x_mask, other=0.0)
        x = x.to(operand)
        u_e = _dot(x, m_even, DOT_FP32)
        u_o = _dot(x, m_odd, DOT_FP32)
        a = u_e * cos - u_o * sin
        b = u_e * sin + u_o * cos
        y = _tile(Y, pid_b, pid_t * BLOCK_T, head, stride_yb, stride_yt, stride_yh)
        if INTERLEAVED:
            pairs = tl.reshape(tl.join(a, b), (BLOCK_T, 2 * BLOCK_P))  # [a0 b0 a1 b1 ...]
            tl.store(y + pair_offsets, pairs.to(Y.dtype.element_ty),
                     mask=t_mask[:, None] & pair_ok[None, :])
        else:
            y_mask = t_mask[:, None] & p_mask[None, :]
            tl.store(y + a_offsets, a.to(Y.dtype.element_ty), mask=y_mask)
            tl.store(y + b_offsets, b.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _unit_tiles(first, n_heads, pid, n_programs, n_t_blocks, n_head_chunks, HEADS, T, X, DY, DX,
                stride_xb, stride_xt, stride_xh, stride_dyb, stride_dyt, stride_dyh, stride_dxb, stride_dxt,
                stride_dxh, BLOCK_T: tl.constexpr):
    """The unit that opens with a backward program's head number `first` of its n_heads (its units are
    pid, pid + n_programs, ..., each HEADS heads of one t block and batch row): its positions, which of
    its rows to read (none past T, none past the program's last unit), and its first head's x, dy and dx
    tiles. The row limit takes the unit's case as a scalar, not as `(rows < T) & (first < n_heads)`:
    Triton 3.9's interpreter holds a vector `&` a scalar as int32, and refuses that as a mask."""
    unit = pid + (first // HEADS) * n_programs
    pid_t = unit % n_t_blocks
    pid_b = unit // n_t_blocks // n_head_chunks
    head0 = (unit // n_t_blocks % n_head_chunks) * HEADS
    t0 = pid_t * BLOCK_T
    rows = t0 + tl.arange(0, BLOCK_T)
    x = _tile(X, pid_b, t0, head0, stride_xb, stride_xt, stride_xh)
    dy = _tile(DY, pid_b, t0, head0, stride_dyb, stride_dyt, stride_dyh)
    dx = _tile(DX, pid_b, t0, head0, stride_dxb, stride_dxt, stride_dxh)
    return rows, rows < tl.where(first < n_heads, T, 0), head0, x, dy, dx


@triton.jit
def _head_tiles(x_tile, dy_tile, rows_ok, k_mask, p_mask, pair_ok, x_offsets, da_offsets, db_offsets,
                dy_offsets, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """One head's token tiles of x and of dy's halves (da, db) from their first rows' addresses, in
    their own dtype; zeros in the rows not rows_ok. Offsets of _pair_offsets."""
    x = tl.load(x_tile + x_offsets, mask=rows_ok[:, None] & k_mask[None, :], other=0.0)
    if INTERLEAVED:
        dy = tl.load(dy_tile + dy_offsets, mask=rows_ok[:, None] & pair_ok[None, :], other=0.0)
        da, db = tl.split(tl.reshape(dy, (BLOCK_T, BLOCK_P, 2)))
    else:
        da = tl.load(dy_tile + da_offsets, mask=rows_ok[:, None] & p_mask[None, :], other=0.0)
        db = tl.load(dy_tile + db_offsets, mask=rows_ok[:, None] & p_mask[None, :], other=0.0)
    return x, da, db


@triton.jit
def _rotary_bwd_kernel(
    X, M, W, S, DY, DX, DM_PART, G_PART,
    s_value, offset, T, H, n_head_chunks, n_units,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_dyb, stride_dyt, stride_dyh, stride_dyd,
    stride_dxb, stride_dxt, stride_dxh, stride_dxd,
    stride_mk, stride_mn, stride_w,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HEADS, INTERLEAVED: tl.constexpr, S_IS_TENSOR: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """dx for the units pid, pid + P, ... (a unit: a t block, a batch row, a head chunk), and this
    program's partial sums of dM (DM_PART[pid], laid out as M) and of t dphi (G_PART[pid, m])."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_t_blocks = tl.cdiv(T, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    p = tl.arange(0, BLOCK_P)
    k_mask, p_mask = k < HEAD_DIM, p < HEAD_DIM // 2

    operand = tl.float32 if DOT_FP32 else X.dtype.element_ty  # as in the forward kernel
    m_even, m_odd = _load_m_slices(M, stride_mk, stride_mn, k, p, k_mask, p_mask, False)
    mt_even, mt_odd = _load_m_slices(M, stride_mk, stride_mn, k, p, k_mask, p_mask, True)
    m_even, m_odd = m_even.to(operand), m_odd.to(operand)
    mt_even, mt_odd = mt_even.to(operand), mt_odd.to(operand)

    r = tl.arange(0, BLOCK_T)
    x_offsets = r[:, None] * stride_xt + k[None, :] * stride_xd
    dx_offsets = r[:, None] * stride_dxt + k[None, :] * stride_dxd
    da_offsets, db_offsets, dy_offsets, pair_ok = _pair_offsets(r, p, stride_dyt, stride_dyd, HEAD_DIM,
                                                                BLOCK_P)

    dm_even = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    dm_odd = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    t_dphi = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)  # t dphi, summed over heads and units by row
    # The program's heads are numbered across its units (pid < n_units: the launcher's n_programs is at
    # most n_units), so that each head's tiles are loaded while the head before it runs, from one unit
    # to the next too.
    n_heads = tl.cdiv(n_units - pid, n_programs) * HEADS
    _, later_ok, _, x_later, dy_later, _ = _unit_tiles(
        0, n_heads, pid, n_programs, n_t_blocks, n_head_chunks, HEADS, T, X, DY, DX, stride_xb, stride_xt,
        stride_xh, stride_dyb, stride_dyt, stride_dyh, stride_dxb, stride_dxt, stride_dxh, BLOCK_T)
    x_next, da_next, db_next = _head_tiles(x_later, dy_later, later_ok, k_mask, p_mask, pair_ok, x_offsets,
                                           da_offsets, db_offsets, dy_offsets, INTERLEAVED, BLOCK_T, BLOCK_P)
    for first in range(0, n_heads, HEADS):
        rows, rows_ok, head, x_head, dy_head, dx_head = _unit_tiles(
            first, n_heads, pid, n_programs, n_t_blocks, n_head_chunks, HEADS, T, X, DY, DX, stride_xb,
            stride_xt, stride_xh, stride_dyb, stride_dyt, stride_dyh, stride_dxb, stride_dxt, stride_dxh,
            BLOCK_T)
        cos, sin, pos = _angles(W, S, s_value, stride_w, offset, rows, p, p_mask, S_IS_TENSOR)
        _, later_ok, _, x_later, dy_later, _ = _unit_tiles(
            first + HEADS, n_heads, pid, n_programs, n_t_blocks, n_head_chunks, HEADS, T, X, DY, DX,
            stride_xb, stride_xt, stride_xh, stride_dyb, stride_dyt, stride_dyh, stride_dxb, stride_dxt,
            stride_dxh, BLOCK_T)
        dx_mask = rows_ok[:, None] & k_mask[None, :]
        heads_here = tl.minimum(HEADS, H - head)  # HEADS need not divide H: stop at the last head
        for i in range(heads_here):
            x, da, db = x_next.to(operand), da_next.to(tl.float32), db_next.to(tl.float32)
            # The next head's tiles (the next unit's first after the last), loaded now and used an
            # iteration later, so that their latency hides behind this head's work. Into registers,
            # not pipelined through shared memory: from there the compiler would read dy straight into
            # the products' operand layout, the whole tile in every warp, and every warp would run the
            # conjugate rotation with cos and sin held in that layout (sm_80 spills at h = 80 and 128).
            # From registers the rotation runs in the tile's own layout and only du goes to the products.
            same_unit = i + 1 < heads_here
            x_next, da_next, db_next = _head_tiles(
                tl.where(same_unit, x_head + stride_xh, x_later),
                tl.where(same_unit, dy_head + stride_dyh, dy_later),
                tl.where(same_unit, rows_ok, later_ok),
                k_mask, p_mask, pair_ok, x_offsets, da_offsets, db_offsets, dy_offsets, INTERLEAVED, BLOCK_T,
                BLOCK_P)
            # Transposed products: M's slices as first operands, which mma.sync spreads over the
            # warps (as second operands each warp would hold all four whole: sm_80 spills).
            x_t = tl.trans(x)
            u_e = tl.trans(_dot(mt_even, x_t, DOT_FP32))
            u_o = tl.trans(_dot(mt_odd, x_t, DOT_FP32))
            du_e = da * cos + db * sin  # the conjugate rotation
            du_o = db * cos - da * sin
            # dphi = a db - b da without forming a and b; rows past T hold dphi = 0
            t_dphi += (u_e * du_o - u_o * du_e) * pos[:, None]

            du_e, du_o = du_e.to(operand), du_o.to(operand)
            dx = tl.trans(_dot(m_even, tl.trans(du_e), DOT_FP32) + _dot(m_odd, tl.trans(du_o), DOT_FP32))
            tl.store(dx_head + dx_offsets, dx.to(DX.dtype.element_ty), mask=dx_mask)
            dm_even += _dot(x_t, du_e, DOT_FP32)
            dm_odd += _dot(x_t, du_o, DOT_FP32)
            head += 1
            x_head += stride_xh
            dy_head += stride_dyh
            dx_head += stride_dxh
    g = tl.sum(t_dphi, axis=0)

    dm_part = DM_PART + pid.to(tl.int64) * HEAD_DIM * HEAD_DIM + k[:, None] * HEAD_DIM + (2 * p)[None, :]
    dm_mask = k_mask[:, None] & p_mask[None, :]
    tl.store(dm_part, dm_even, mask=dm_mask)
    tl.store(dm_part + 1, dm_odd, mask=dm_mask)
    tl.store(G_PART + pid * (HEAD_DIM // 2) + p, g, mask=p_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _config(h: int, dtype: torch.dtype, backward: bool) -> dict:
    """Block sizes and warps of a launch (the same as aot_specs() compiles)."""
    block_k = triton.next_power_of_2(h)
    block_p = max(16, triton.next_power_of_2(h // 2))  # tl.dot needs every dim >= 16
    block_k = max(16, block_k)
    # The interpreter mishandles bf16 dots: do them in fp32 there (tests use fp32/fp16 anyway).
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreted())
    block_t = BLOCK_T_BWD if backward else BLOCK_T
    cfg = dict(BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_P=block_p, DOT_FP32=dot_fp32, num_stages=3)
    if backward:
        # From h = 64 up, and for fp32 (dots on the FMA units, operands in registers), token tiles
        # of 16 rows; the two (BLOCK_K, BLOCK_P) fp32 dM accumulators spread over 8 warps from h = 128
        # (80 pads to it; on 4 they spill) and for fp32 at 64 (4 fill all 255 registers). At h = 64
        # (bf16, Triton 3.8), 4 warps run a 16-token tile in 38% fewer warp-instructions than 8 on
        # sm_80 (4 x 191 against 8 x 154, python -m echo_kernels.aot) and 53% fewer on sm_90, and fit
        # 3 CTAs per SM against 1.
        if block_k >= 64 or dtype == torch.float32:
            cfg["BLOCK_T"] = BLOCK_T_BWD // 2
        cfg["num_warps"] = 8 if block_k >= 128 or (block_k >= 64 and dtype == torch.float32) else 4
        cfg["num_stages"] = 1  # the kernel loads one head ahead itself: nothing for the pipeliner
    else:
        # 8 warps from h = 64 up: at 4, h = 64 spills registers on sm_80 and sm_90. fp32 dots run
        # on the FMA units with their operands in registers, and wgmma is out of reach anyway:
        # half the token rows there.
        cfg["num_warps"] = 8 if block_k >= 64 else 4
        if dtype == torch.float32:
            cfg["BLOCK_T"] = BLOCK_T // 2
    return cfg


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_available(device: torch.device) -> int:
    """Programs that run at once on the device; a few under the interpreter, to test the loops."""
    if device.type != "cuda":
        return 3
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _heads_per_program(n_blocks: int, H: int, wanted: int) -> int:
    """Largest divisor d of H that still leaves n_blocks * H / d >= wanted programs (else 1).

    More heads per program amortise cos/sin and the M load; a divisor keeps programs equal."""
    for d in range(H, 0, -1):
        if H % d == 0 and n_blocks * (H // d) >= wanted:
            return d
    return 1


def _s_args(s: Tensor | None, s_value: float, w: Tensor) -> tuple[Tensor, float, bool]:
    # With s a float, the pointer argument is never read: pass w so the signature stays the same.
    return (s, 0.0, True) if s is not None else (w, float(s_value), False)


def rotary_forward(
    x: Tensor, M: Tensor, w: Tensor, s: Tensor | None, s_value: float, offset: int, layout: str
) -> Tensor:
    """y = RoPE(x @ M) at positions offset + t.   x: (B, T, H, h) any strides -> y like x.

    s: the scale as a 1-element tensor, or None to use the float s_value."""
    B, T, H, h = x.shape
    int32_offsets({"x": x, "y": x.numel()})
    y = torch.empty_like(x)  # x's strides where x is dense (a (B, H, T, h) view stays one)
    if y.numel() == 0:
        return y
    cfg = _config(h, x.dtype, backward=False)
    n_t_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    heads = _heads_per_program(n_t_blocks * B, H, 4 * _programs_available(x.device))
    n_head_chunks = triton.cdiv(H, heads)
    s_ptr, s_value, s_is_tensor = _s_args(s, s_value, w)
    _rotary_fwd_kernel[(n_t_blocks * B * n_head_chunks,)](
        x, M, w, s_ptr, y,
        s_value, offset, T, H, n_head_chunks, n_t_blocks,
        *x.stride(), *y.stride(), *M.stride(), w.stride(0),
        HEAD_DIM=h, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=cfg["BLOCK_P"],
        HEADS=heads, INTERLEAVED=layout == "interleaved", S_IS_TENSOR=s_is_tensor, DOT_FP32=cfg["DOT_FP32"],
        **launch_options(cfg),
    )
    return y


def rotary_backward(
    dy: Tensor, x: Tensor, M: Tensor, w: Tensor, s: Tensor | None, s_value: float, offset: int, layout: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dM, dw, ds) of y = RoPE(x @ M); dy: (B, T, H, h) any strides.

    dx is laid out like x, dM, dw contiguous in M's and w's dtypes, ds a 0-d fp32 tensor (the
    gradient of s whether s is a tensor or a float)."""
    B, T, H, h = x.shape
    int32_offsets({"x": x, "dy": dy, "dx": x.numel()})
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros(M.shape, dtype=M.dtype, device=M.device), torch.zeros(
            w.shape, dtype=w.dtype, device=w.device
        ), torch.zeros((), dtype=torch.float32, device=x.device)
    cfg = _config(h, x.dtype, backward=True)
    n_t_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    available = _programs_available(x.device)
    # Each program writes an h x h partial of dM, so programs loop over units of work (persistent)
    # rather than being one per unit; units a few times the programs keep the tail short.
    heads = _heads_per_program(n_t_blocks * B, H, 4 * available)
    n_head_chunks = triton.cdiv(H, heads)
    n_units = n_t_blocks * B * n_head_chunks
    n_programs = min(n_units, available)
    dm_part = torch.empty((n_programs, h, h), dtype=torch.float32, device=x.device)
    g_part = torch.empty((n_programs, h // 2), dtype=torch.float32, device=x.device)
    s_ptr, s_val, s_is_tensor = _s_args(s, s_value, w)
    _rotary_bwd_kernel[(n_programs,)](
        x, M, w, s_ptr, dy, dx, dm_part, g_part,
        s_val, offset, T, H, n_head_chunks, n_units,
        *x.stride(), *dy.stride(), *dx.stride(), *M.stride(), w.stride(0),
        HEAD_DIM=h, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=cfg["BLOCK_P"],
        HEADS=heads, INTERLEAVED=layout == "interleaved", S_IS_TENSOR=s_is_tensor, DOT_FP32=cfg["DOT_FP32"],
        **launch_options(cfg),
    )
    # Fixed-order sums over the partials: the same bits on every run.
    dM = dm_part.sum(0).to(M.dtype)
    g = g_part.sum(0)  # sum over tokens of t * dphi[t, m]
    s_f32 = s.to(torch.float32).reshape(()) if s is not None else float(s_value)
    dw = (s_f32 * g).to(w.dtype)
    ds = (g * w.to(torch.float32)).sum()
    return dx, dM, dw, ds


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (echo_kernels.aot)
# --------------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(h: int, dtype: torch.dtype, backward: bool, layout: str = "half_split"):
    cfg = _config(h, dtype, backward)
    xt = "*" + _TRITON_TYPES[dtype]
    i32 = "i32"
    if backward:
        pointers = {"X": xt, "M": "*fp32", "W": "*fp32", "S": "*fp32", "DY": xt, "DX": xt,
                    "DM_PART": "*fp32", "G_PART": "*fp32"}
        scalars = ["offset", "T", "H", "n_head_chunks", "n_units"]
        strided = ["x", "dy", "dx"]
    else:
        pointers = {"X": xt, "M": "*fp32", "W": "*fp32", "S": "*fp32", "Y": xt}
        scalars = ["offset", "T", "H", "n_head_chunks", "n_t_blocks"]
        strided = ["x", "y"]
    signature = dict(pointers, s_value="fp32", **{n: i32 for n in scalars}, HEADS=i32)
    constexprs = {}
    for name in strided:
        for dim in "bth":
            signature[f"stride_{name}{dim}"] = i32
        # The feature stride is 1 in practice, and the JIT specialises an int argument equal to 1.
        signature[f"stride_{name}d"] = "constexpr"
        constexprs[f"stride_{name}d"] = 1
    signature.update(stride_mk=i32, stride_mn="constexpr", stride_w="constexpr")
    constexprs.update(stride_mn=1, stride_w=1)
    meta = dict(
        HEAD_DIM=h, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=cfg["BLOCK_P"],
        INTERLEAVED=layout == "interleaved", S_IS_TENSOR=True, DOT_FP32=cfg["DOT_FP32"],
    )
    signature.update({name: "constexpr" for name in meta})
    constexprs.update(meta)
    kind = "bwd" if backward else "fwd"
    return KernelSpec(
        name=f"rotary_{kind}_h{h}_{_TRITON_TYPES[dtype]}_{layout}",
        fn=_rotary_bwd_kernel if backward else _rotary_fwd_kernel,
        signature=signature, constexprs=constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def aot_specs(arch: int) -> list:
    """The launches to compile ahead of time, the same for every target `arch`: bf16 (the speed case)
    at every h, forward and backward, plus fp16, fp32 and the interleaved layout at h = 64."""
    specs = []
    for backward in (False, True):
        specs += [_spec(h, torch.bfloat16, backward) for h in HEAD_DIMS]
        specs += [_spec(64, torch.float16, backward), _spec(64, torch.float32, backward)]
        specs.append(_spec(64, torch.bfloat16, backward, "interleaved"))
    return specs
