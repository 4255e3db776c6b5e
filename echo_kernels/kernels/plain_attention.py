"""Plain flash attention, forward and backward: softmax(q k^T / sqrt(h)) v, no rotation, bias or window.

The floor Echo's attention is measured against (docs/model.md, Kernels): the same online softmax, the
same tiles and launch shapes as echo_kernels.kernels.attention and .attention_backward, and nothing
else, so that `python -m echo_kernels.aot` and the benches show what RoPE, the clamped bias and the
band cost on top. Its loops are staged as in Triton's fused-attention tutorial: every full key (or
query) tile runs a loop with no mask at all, and only the ragged last tile takes the masked one.

Scores are kept in base 2: q k^T is scaled by log2(e) / sqrt(h) so that exp is a bare exp2, and the
log-sum-exp the forward writes for the backward is m + log2(l) in those units.

q, k, v, out and their gradients are (B, H, T, h) contiguous (the launchers make them so).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..checks import int32_offsets
from . import ATTENTION_HEAD_WIDTHS, launch_options
from .attention import default_blocks as forward_blocks
from .attention_backward import default_blocks as backward_blocks
from .attention_common import LOG2E, _tile_and_head, precision, tile_arch, with_override
from .spec import KernelSpec, dtype_named, precision_of, signature_of


@triton.jit
def _load_rows(ptr, rows, n_rows, HEAD: tl.constexpr, MASKED: tl.constexpr):
    """(len(rows), HEAD) rows of a contiguous (T, HEAD) matrix; rows past n_rows read as zeros."""
    offs = rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    if MASKED:
        return tl.load(ptr + offs, mask=rows[:, None] < n_rows, other=0.0)
    return tl.load(ptr + offs)


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, lo, hi, Tk,
               HEAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key tiles lo, lo + BLOCK_N, ... < hi; q holds the base-2 scale."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, cols, Tk, HEAD, MASKED)
        v = _load_rows(V, cols, Tk, HEAD, MASKED)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:  # the last tile always holds a key, so every row's maximum stays finite
            scores = tl.where(cols[None, :] < Tk, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _plain_fwd_kernel(Q, K, V, Out, Lse, Tq, Tk, qk_scale, n_tiles,
                      HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
    """One (BLOCK_M, HEAD) query tile of one (batch, head): its Out rows and base-2 log-sum-exps."""
    pid_m, pid_bh = _tile_and_head(n_tiles)
    Q += pid_bh * Tq * HEAD
    K += pid_bh * Tk * HEAD
    V += pid_bh * Tk * HEAD
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, rows, Tq, HEAD, True)
    q = (q * qk_scale).to(Q.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], tl.float32)
    full = (Tk // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, 0, full, Tk, HEAD, BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, full, Tk, Tk, HEAD, BLOCK_N, True, PRECISION)
    offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(Out + offs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=rows[:, None] < Tq)
    tl.store(Lse + pid_bh * Tq + rows, m_i + tl.log2(l_i), mask=rows < Tq)


@triton.jit
def _plain_bwd_delta_kernel(Out, DO, Delta, T, n_tiles, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """Delta[bh, t] = sum_d Out[t, d] dO[t, d], the softmax correction of the score gradient."""
    pid_m, pid_bh = _tile_and_head(n_tiles)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    o = _load_rows(Out + pid_bh * T * HEAD, rows, T, HEAD, True).to(tl.float32)
    do = _load_rows(DO + pid_bh * T * HEAD, rows, T, HEAD, True).to(tl.float32)
    tl.store(Delta + pid_bh * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, Lse, Delta, lo, hi, Tq, qk_scale,
                HEAD: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dk and dv of one key tile over the query tiles lo, ... < hi, kept transposed (keys, queries)
    as in the tutorial. Past Tq a query reads q = dO = 0 and lse = +inf, so its p is 0: no mask."""
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, rows, Tq, HEAD, MASKED)
        do = _load_rows(DO, rows, Tq, HEAD, MASKED)
        if MASKED:
            lse = tl.load(Lse + rows, mask=rows < Tq, other=float("inf"))
            delta = tl.load(Delta + rows, mask=rows < Tq, other=0.0)
        else:
            lse = tl.load(Lse + rows)
            delta = tl.load(Delta + rows)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _plain_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, Tq, Tk, qk_scale, sm_scale, n_tiles,
                           HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           PRECISION: tl.constexpr):
    """dk and dv of one (BLOCK_N, HEAD) key tile of one (batch, head)."""
    pid_n, pid_bh = _tile_and_head(n_tiles)
    Q += pid_bh * Tq * HEAD
    DO += pid_bh * Tq * HEAD
    Lse += pid_bh * Tq
    Delta += pid_bh * Tq
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(K + pid_bh * Tk * HEAD, cols, Tk, HEAD, True)
    v = _load_rows(V + pid_bh * Tk * HEAD, cols, Tk, HEAD, True)
    dk = tl.zeros([BLOCK_N, HEAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD], tl.float32)
    full = (Tq // BLOCK_M) * BLOCK_M
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, Lse, Delta, 0, full, Tq, qk_scale, HEAD, BLOCK_M, False,
                         PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, Lse, Delta, full, Tq, Tq, qk_scale, HEAD, BLOCK_M, True,
                         PRECISION)
    offs = pid_bh * Tk * HEAD + cols[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols[:, None] < Tk)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < Tk)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, lo, hi, Tk, qk_scale,
              HEAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one query tile over the key tiles lo, ... < hi. Past Tk a key reads k = v = 0, so its
    share of dq, ds k, is 0: no mask but the loads'."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, cols, Tk, HEAD, MASKED)
        v = _load_rows(V, cols, Tk, HEAD, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _plain_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, Tq, Tk, qk_scale, sm_scale, n_tiles,
                         HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    """dq of one (BLOCK_M, HEAD) query tile of one (batch, head)."""
    pid_m, pid_bh = _tile_and_head(n_tiles)
    K += pid_bh * Tk * HEAD
    V += pid_bh * Tk * HEAD
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + pid_bh * Tq * HEAD, rows, Tq, HEAD, True)
    do = _load_rows(DO + pid_bh * Tq * HEAD, rows, Tq, HEAD, True)
    lse = tl.load(Lse + pid_bh * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Tq + rows, mask=rows < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD], tl.float32)
    full = (Tk // BLOCK_N) * BLOCK_N
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, 0, full, Tk, qk_scale, HEAD, BLOCK_N, False, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, full, Tk, Tk, qk_scale, HEAD, BLOCK_N, True, PRECISION)
    offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(DQ + offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None] < Tq)


# --------------------------------------------------------------------------------------------------
# Launchers: the tiles and launch shapes of Echo's kernels at the same head width
# --------------------------------------------------------------------------------------------------


def _scales(h: int) -> tuple[float, float]:
    """(log2(e) / sqrt(h), 1 / sqrt(h)): the base-2 score scale and the gradients' scale."""
    return LOG2E / math.sqrt(h), 1.0 / math.sqrt(h)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, Tq, h), k, v: (B, H, Tk, h) with Tk >= 1 -> out (B, H, Tq, h) contiguous in q's dtype,
    lse (B, H, Tq) fp32 in base 2."""
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    int32_offsets({"q": q.numel(), "k": k.numel(), "v": v.numel()})  # as the kernels take them: contiguous
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    c = with_override(forward_blocks(h, tile_arch(q.device), q.dtype))
    n_tiles = triton.cdiv(Tq, c["BLOCK_M"])
    _plain_fwd_kernel[(n_tiles * B * H,)](
        q, k, v, out, lse, Tq, Tk, _scales(h)[0], n_tiles, HEAD=h, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
        PRECISION=precision(q.dtype), **launch_options(c))
    return out, lse


def backward(do, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of forward's out, each contiguous in its input's dtype."""
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    qk_scale, sm_scale = _scales(h)
    table = backward_blocks(h, tile_arch(q.device), q.dtype)
    blocks = {name: with_override(table[name]) for name in ("delta", "dkdv", "dq")}
    prec = precision(q.dtype)
    c = blocks["delta"]
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    n_tiles = triton.cdiv(Tq, c["BLOCK_M"])
    _plain_bwd_delta_kernel[(n_tiles * B * H,)](out, do, delta, Tq, n_tiles, HEAD=h, BLOCK=c["BLOCK_M"],
                                                **launch_options(c))
    c = blocks["dkdv"]
    n_tiles = triton.cdiv(Tk, c["BLOCK_N"])
    _plain_bwd_dkdv_kernel[(n_tiles * B * H,)](
        q, k, v, do, lse, delta, dk, dv, Tq, Tk, qk_scale, sm_scale, n_tiles, HEAD=h, BLOCK_M=c["BLOCK_M"],
        BLOCK_N=c["BLOCK_N"], PRECISION=prec, **launch_options(c))
    c = blocks["dq"]
    n_tiles = triton.cdiv(Tq, c["BLOCK_M"])
    _plain_bwd_dq_kernel[(n_tiles * B * H,)](
        q, k, v, do, lse, delta, dq, Tq, Tk, qk_scale, sm_scale, n_tiles, HEAD=h, BLOCK_M=c["BLOCK_M"],
        BLOCK_N=c["BLOCK_N"], PRECISION=prec, **launch_options(c))
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile list (echo_kernels.aot)
# --------------------------------------------------------------------------------------------------


def _tiled(h: int, row: dict, prec: str) -> dict:
    """The constexprs of a launch of a tiled plain kernel on `row` of a tile table."""
    return {"HEAD": h, "BLOCK_M": row["BLOCK_M"], "BLOCK_N": row["BLOCK_N"], "PRECISION": prec}


def aot_specs(arch: int) -> list[KernelSpec]:
    """The plain kernels at Echo's tiles on `arch`'s table: h in {32, 64, 128}, bf16 (the floor of the
    bf16 rows of the attention kernels in the report) and fp32 (on fp32's own rows)."""
    specs = []
    for h in ATTENTION_HEAD_WIDTHS:
        for dt in ("bf16", "fp32"):
            f, g = forward_blocks(h, arch, dtype_named(dt)), backward_blocks(h, arch, dtype_named(dt))
            prec = precision_of(dt)
            ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "DO", "Out", "DQ", "DK", "DV")}
            ptrs.update(Lse="*fp32", Delta="*fp32", qk_scale="fp32", sm_scale="fp32")
            for name, fn, ce, c in (
                ("fwd", _plain_fwd_kernel, _tiled(h, f, prec), f),
                ("bwd_delta", _plain_bwd_delta_kernel, {"HEAD": h, "BLOCK": g["delta"]["BLOCK_M"]},
                 g["delta"]),
                ("bwd_dkdv", _plain_bwd_dkdv_kernel, _tiled(h, g["dkdv"], prec), g["dkdv"]),
                ("bwd_dq", _plain_bwd_dq_kernel, _tiled(h, g["dq"], prec), g["dq"]),
            ):
                specs.append(KernelSpec(f"plain_attention_{name}_h{h}_{dt}", fn, signature_of(fn, ptrs, ce),
                                        ce, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return specs
