"""Triton kernels of y = RoPE(x @ M), forward and backward, and their launchers (ECHO_SPEC 3).

    x: (B, T, H, h), any strides (e.g. a transpose(1, 2) view of (B, H, T, h)); M: (h, h);
    w: (h/2,); s: scalar (a tensor when learned, else a float); positions offset + t.

With u = x @ M, pair m is (u[2m], u[2m+1]). De-interleaving registers is awkward, so M is split by
columns instead: u_e = x @ M[:, 0::2] and u_o = x @ M[:, 1::2] are two dots against column slices
of M loaded with strides. At phi = (s * t) * w[m]

    a = u_e cos(phi) - u_o sin(phi),   b = u_e sin(phi) + u_o cos(phi)

and a, b go to their output columns by layout: half_split [a..., b...], interleaved [a0, b0, ...].

A program owns a block of BLOCK_T positions of one batch row and HEADS heads. The angles depend on
the position only, so cos/sin are computed once per program and reused for each head; M's slices
are loaded once per program and stay on chip. No cos/sin table ever goes through device memory.

Backward, with g = RoPE^T(dy) in pair form (du_e, du_o) = (da cos + db sin, db cos - da sin):

    dx = du_e @ M[:, 0::2]^T + du_o @ M[:, 1::2]^T
    dM[:, 0::2] = sum over tokens of x^T du_e,  dM[:, 1::2] = x^T du_o
    dphi = a db - b da   (da/dphi = -b, db/dphi = a),  so  dw[m] = s sum_t t dphi,  ds = sum_m w[m] sum_t t dphi

The backward program recomputes u from x (two more dots; x is read anyway for dM), so nothing but
the inputs is saved. dM and sum_t t dphi are written as per-program partials and summed by torch
in a fixed order: deterministic, no float atomics.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Dtypes the kernels take for x (float64 stays with the reference).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 80, 128)  # the widths that aot_specs() compiles; any even h >= 2 works
BLOCK_T = 64  # one warpgroup's worth of rows for the Hopper wgmma


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
    return tl.cos(phi), tl.sin(phi), pos


@triton.jit
def _pair_columns(p, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns of a_m and b_m in the laid-out vector."""
    if INTERLEAVED:
        return 2 * p, 2 * p + 1
    return p, p + HEAD_DIM // 2


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, OPERAND: tl.constexpr):
    """a @ b with fp32 accumulation: exact fp32 (ieee) for fp32 inputs, else tensor cores in the
    input's half type (M is rounded to it: the same error as the half input itself)."""
    if DOT_FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(OPERAND), b.to(OPERAND))


@triton.jit
def _rotary_fwd_kernel(
    X, M, W, S, Y,
    s_value, offset, T, H, n_head_chunks,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    stride_mk, stride_mn, stride_w,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HEADS: tl.constexpr, INTERLEAVED: tl.constexpr, S_IS_TENSOR: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Y[b, t, head, :] = layout(rotate(X[b, t, head, :] @ M)) for one (t block, b, head chunk)."""
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1) // n_head_chunks
    head0 = (tl.program_id(1) % n_head_chunks) * HEADS
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)  # input features, padded to a power of two (h = 80 -> 128)
    p = tl.arange(0, BLOCK_P)  # pairs, padded likewise (40 -> 64)
    t_mask, k_mask, p_mask = t < T, k < HEAD_DIM, p < HEAD_DIM // 2

    m_even, m_odd = _load_m_slices(M, stride_mk, stride_mn, k, p, k_mask, p_mask, False)
    cos, sin, _ = _angles(W, S, s_value, stride_w, offset, t, p, p_mask, S_IS_TENSOR)
    col_a, col_b = _pair_columns(p, HEAD_DIM, INTERLEAVED)
    operand = X.dtype.element_ty

    x_rows = X + pid_b.to(tl.int64) * stride_xb + t[:, None].to(tl.int64) * stride_xt
    y_rows = Y + pid_b.to(tl.int64) * stride_yb + t[:, None].to(tl.int64) * stride_yt
    for i in range(HEADS):
        head = head0 + i
        x_mask = t_mask[:, None] & k_mask[None, :] & (head < H)
        x = tl.load(x_rows + head * stride_xh + k[None, :] * stride_xd, mask=x_mask, other=0.0)
        x = x.to(tl.float32)  # the interpreter mishandles bf16: fp32 right after the load
        u_e = _dot(x, m_even, DOT_FP32, operand)
        u_o = _dot(x, m_odd, DOT_FP32, operand)
        a = u_e * cos - u_o * sin
        b = u_e * sin + u_o * cos
        y_mask = t_mask[:, None] & p_mask[None, :] & (head < H)
        y_head = y_rows + head * stride_yh
        tl.store(y_head + col_a[None, :] * stride_yd, a.to(Y.dtype.element_ty), mask=y_mask)
        tl.store(y_head + col_b[None, :] * stride_yd, b.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _rotary_bwd_kernel(
    X, M, W, S, DY, DX, DM_PART, G_PART,
    s_value, offset, T, H, n_head_chunks, n_units,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_dyb, stride_dyt, stride_dyh, stride_dyd,
    stride_dxb, stride_dxt, stride_dxh, stride_dxd,
    stride_mk, stride_mn, stride_w,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HEADS: tl.constexpr, INTERLEAVED: tl.constexpr, S_IS_TENSOR: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """dx for the units pid, pid + P, ... (a unit: a t block, a batch row, a head chunk), and this
    program's partial sums of dM (DM_PART[pid], laid out as M) and of t dphi (G_PART[pid, m])."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_t_blocks = tl.cdiv(T, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    p = tl.arange(0, BLOCK_P)
    k_mask, p_mask = k < HEAD_DIM, p < HEAD_DIM // 2

    m_even, m_odd = _load_m_slices(M, stride_mk, stride_mn, k, p, k_mask, p_mask, False)
    mt_even, mt_odd = _load_m_slices(M, stride_mk, stride_mn, k, p, k_mask, p_mask, True)
    col_a, col_b = _pair_columns(p, HEAD_DIM, INTERLEAVED)
    operand = X.dtype.element_ty

    dm_even = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    dm_odd = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    g = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for unit in range(pid, n_units, n_programs):
        pid_t = unit % n_t_blocks
        pid_b = unit // n_t_blocks // n_head_chunks
        head0 = (unit // n_t_blocks % n_head_chunks) * HEADS
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        cos, sin, pos = _angles(W, S, s_value, stride_w, offset, t, p, p_mask, S_IS_TENSOR)
        x_rows = X + pid_b.to(tl.int64) * stride_xb + t[:, None].to(tl.int64) * stride_xt
        dy_rows = DY + pid_b.to(tl.int64) * stride_dyb + t[:, None].to(tl.int64) * stride_dyt
        dx_rows = DX + pid_b.to(tl.int64) * stride_dxb + t[:, None].to(tl.int64) * stride_dxt
        dphi = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
        for i in range(HEADS):
            head = head0 + i
            x_mask = t_mask[:, None] & k_mask[None, :] & (head < H)
            x = tl.load(x_rows + head * stride_xh + k[None, :] * stride_xd, mask=x_mask, other=0.0)
            x = x.to(tl.float32)
            u_e = _dot(x, m_even, DOT_FP32, operand)
            u_o = _dot(x, m_odd, DOT_FP32, operand)
            a = u_e * cos - u_o * sin
            b = u_e * sin + u_o * cos

            dy_mask = t_mask[:, None] & p_mask[None, :] & (head < H)
            dy_head = dy_rows + head * stride_dyh
            da = tl.load(dy_head + col_a[None, :] * stride_dyd, mask=dy_mask, other=0.0).to(tl.float32)
            db = tl.load(dy_head + col_b[None, :] * stride_dyd, mask=dy_mask, other=0.0).to(tl.float32)
            dphi += a * db - b * da
            du_e = da * cos + db * sin  # the conjugate rotation
            du_o = db * cos - da * sin

            dx = _dot(du_e, mt_even, DOT_FP32, operand) + _dot(du_o, mt_odd, DOT_FP32, operand)
            tl.store(dx_rows + head * stride_dxh + k[None, :] * stride_dxd, dx.to(DX.dtype.element_ty), mask=x_mask)
            x_t = tl.trans(x)
            dm_even += _dot(x_t, du_e, DOT_FP32, operand)
            dm_odd += _dot(x_t, du_o, DOT_FP32, operand)
        g += tl.sum(dphi * pos[:, None], axis=0)  # rows past T hold dphi = 0

    dm_part = DM_PART + pid.to(tl.int64) * HEAD_DIM * HEAD_DIM + k[:, None] * HEAD_DIM + (2 * p)[None, :]
    dm_mask = k_mask[:, None] & p_mask[None, :]
    tl.store(dm_part, dm_even, mask=dm_mask)
    tl.store(dm_part + 1, dm_odd, mask=dm_mask)
    tl.store(G_PART + pid * (HEAD_DIM // 2) + p, g, mask=p_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(h: int, dtype: torch.dtype, backward: bool) -> dict:
    """Block sizes and warps of a launch (the same as aot_specs() compiles)."""
    block_k = triton.next_power_of_2(h)
    block_p = max(16, triton.next_power_of_2(h // 2))  # tl.dot needs every dim >= 16
    block_k = max(16, block_k)
    # The backward holds two (BLOCK_K, BLOCK_P) fp32 accumulators of dM: spread them over 8 warps
    # from h = 80 up, so that nothing spills.
    num_warps = 8 if backward and block_k >= 128 else 4
    # The interpreter mishandles bf16 dots: do them in fp32 there (tests use fp32/fp16 anyway).
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreted())
    return dict(BLOCK_T=BLOCK_T, BLOCK_K=block_k, BLOCK_P=block_p, DOT_FP32=dot_fp32, num_warps=num_warps)


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
    y = torch.empty_like(x)  # x's strides where x is dense (a (B, H, T, h) view stays one)
    if y.numel() == 0:
        return y
    cfg = _config(h, x.dtype, backward=False)
    n_t_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    heads = _heads_per_program(n_t_blocks * B, H, 4 * _programs_available(x.device))
    n_head_chunks = triton.cdiv(H, heads)
    s_ptr, s_value, s_is_tensor = _s_args(s, s_value, w)
    _rotary_fwd_kernel[(n_t_blocks, B * n_head_chunks)](
        x, M, w, s_ptr, y,
        s_value, offset, T, H, n_head_chunks,
        *x.stride(), *y.stride(), *M.stride(), w.stride(0),
        HEAD_DIM=h, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=cfg["BLOCK_P"],
        HEADS=heads, INTERLEAVED=layout == "interleaved", S_IS_TENSOR=s_is_tensor, DOT_FP32=cfg["DOT_FP32"],
        num_warps=cfg["num_warps"],
    )
    return y


def rotary_backward(
    dy: Tensor, x: Tensor, M: Tensor, w: Tensor, s: Tensor | None, s_value: float, offset: int, layout: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dM, dw, ds) of y = RoPE(x @ M); dy: (B, T, H, h) any strides.

    dx is laid out like x, dM, dw contiguous in M's and w's dtypes, ds a 0-d fp32 tensor (the
    gradient of s whether s is a tensor or a float)."""
    B, T, H, h = x.shape
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
        num_warps=cfg["num_warps"],
    )
    # Fixed-order sums over the partials: the same bits on every run.
    dM = dm_part.sum(0).to(M.dtype)
    g = g_part.sum(0)  # sum over tokens of t * dphi[t, m]
    s_f32 = s.to(torch.float32).reshape(()) if s is not None else float(s_value)
    dw = (s_f32 * g).to(w.dtype)
    ds = (g * w.to(torch.float32)).sum()
    return dx, dM, dw, ds
