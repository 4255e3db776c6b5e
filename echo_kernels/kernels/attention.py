"""Fused Echo attention, forward: rotary, clamped relative bias, band masks, online softmax.

    out[b, t, i] = softmax_j(q'_i . k'_j / sqrt(h) + bias[clamp(i - j) + n - 1, t] + masks) @ v

with q' and k' as the launcher is given them (docs/model.md, Attention):

    M = None        q' = RoPE_s(q),      k' = RoPE_s(k)      the model's default: M folded upstream
    M given         q' = RoPE_s(q) @ M,  k' = RoPE_s(k) @ M  the "rope_then_m" order

("m_then_rope" with an M, RoPE(q M) . RoPE(k M), is the M = None kernel on q M and k M:
echo_kernels.attention multiplies them first.)

The kernel never forms q' and k'. Since q' k'^T = RoPE(q) (M M^T) RoPE(k)^T, the launcher folds
P = M M^T / sqrt(h) once per call, each query tile computes q'' = RoPE(q) @ P on chip (inner dim h),
and each key tile only needs RoPE(k): elementwise, no matrix product per key tile. Without M
(HAS_P false) q'' = RoPE(q) / sqrt(h): the only products left are attention's own, q'' RoPE(k)^T
and p v. The gradients are still those of the formula above (the backward goes through P back to M).

RoPE is done on even/odd columns loaded as two (BLOCK, h/2) tiles, so registers are never
de-interleaved: a = x_even cos - x_odd sin, b = x_even sin + x_odd cos. The layout (half_split or
interleaved) only decides where a and b sit in RoPE(x), so it is folded into P by permuting its rows
and columns: with P~ = P[perm][:, perm], perm = (positions of a) ++ (positions of b),

    q''_A = a_q @ P~_AA + b_q @ P~_BA,   q''_B = a_q @ P~_AB + b_q @ P~_BB
    logits = q''_A @ a_k^T + q''_B @ b_k^T

and the kernel is the same for both layouts (without P the layout does not matter at all: a dot
product does not depend on the order in which its terms are written).

Windows are two ints, left and right (key j kept iff i - left <= j <= i + right, absolute
positions); unbounded sides are a large sentinel, causal is right = min(right, 0). Each query tile
loops only over the key tiles the band reaches, so local attention costs O(T w).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import ATTENTION_HEAD_WIDTHS

UNBOUNDED = 1 << 30  # window side that reaches every key; positions stay far below it
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e)


# --------------------------------------------------------------------------------------------------
# Pieces shared with the backward kernels
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
    """cos and sin of phi[t, m] = (s * pos[t]) * w[m], each (rows, HALF) fp32."""
    w = tl.load(W + tl.arange(0, HALF)).to(tl.float32)
    phi = (s * pos.to(tl.float32))[:, None] * w[None, :]
    return tl.cos(phi), tl.sin(phi)


@triton.jit
def _rope_angles_step(cos0, sin0, first, s, W, HALF: tl.constexpr):
    """cos and sin of phi = (s * (first + t)) * w for the rows t of a tile, by angle addition.

    cos0, sin0: cos and sin of (s * t) * w for t = 0..rows-1, computed once per program. Only the
    h/2 angles s * first * w are evaluated here, not a sine per element: precise sin/cos cost tens of
    instructions each, more than the tile's matrix products.
    """
    w = tl.load(W + tl.arange(0, HALF)).to(tl.float32)
    base = (s * first.to(tl.float32)) * w
    cb = tl.cos(base)[None, :]
    sb = tl.sin(base)[None, :]
    return cb * cos0 - sb * sin0, sb * cos0 + cb * sin0


@triton.jit
def _load_full(ptr, rows, row_ok, stride_t, stride_d, HEAD: tl.constexpr):
    """A (rows, HEAD) fp32 tile; rows not row_ok read as zeros."""
    cols = tl.arange(0, HEAD)
    offs = rows[:, None] * stride_t + cols[None, :] * stride_d
    return tl.load(ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)


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
# (PAST: one bias value, the last row), straddling the diagonal (NEAR: a gather from the table), and
# wholly at i - j <= -(n - 1) (FUTURE: the first row). Each region is its own loop, so no branch sits
# inside a loop body (which would stop Triton from pipelining its loads). NO_BIAS: no table at all.
NO_BIAS: tl.constexpr = tl.constexpr(0)
PAST: tl.constexpr = tl.constexpr(1)
NEAR: tl.constexpr = tl.constexpr(2)
FUTURE: tl.constexpr = tl.constexpr(3)


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
def _bias_tile(rel, Bias, stride_br, head_off, n_rel, REGION: tl.constexpr):
    """bias[clamp(rel) + n - 1, head] for a tile of offsets rel = i - j, fp32 (see the regions)."""
    if REGION == PAST:
        return tl.load(Bias + (2 * n_rel - 2) * stride_br + head_off).to(tl.float32)
    elif REGION == FUTURE:
        return tl.load(Bias + head_off).to(tl.float32)
    elif REGION == NEAR:
        ridx = tl.minimum(tl.maximum(rel, 1 - n_rel), n_rel - 1) + n_rel - 1
        return tl.load(Bias + ridx * stride_br + head_off).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _rotated_k(K, cols, key_ok, stride_kt, stride_kd, cos0, sin0, first, s, W, HALF: tl.constexpr):
    """RoPE halves (fp32) of the key tile at rows cols, whose first position is `first`; keys not
    key_ok are zeros."""
    y1, y2 = _load_pairs(K, cols, key_ok, stride_kt, stride_kd, HALF)
    kcos, ksin = _rope_angles_step(cos0, sin0, first, s, W, HALF)
    return y1 * kcos - y2 * ksin, y1 * ksin + y2 * kcos


@triton.jit
def _key_ok(cols, Tk, Pad, pad_off, stride_pt, HAS_PAD: tl.constexpr):
    """(cols,) keys that exist and are not padding."""
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


# --------------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, lo, hi, qa, qb, qpos, K, V, W, s, cos0, sin0, Bias, stride_br, head_off, n_rel, Pad, pad_off,
    stride_pt, stride_kt, stride_kd, stride_vt, stride_vd, Tk, left, right, k_off,
    HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, REGION: tl.constexpr,
    HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles starting at lo, lo + BLOCK_N, ... < hi (one bias region)."""
    DT = qa.dtype
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        # a padded key's k only reaches its own logits, which the mask replaces
        ak, bk = _rotated_k(K, cols, cols < Tk, stride_kt, stride_kd, cos0, sin0, k_off + start, s, W, HALF)
        logits = tl.dot(qa, tl.trans(ak.to(DT)), input_precision=PRECISION)
        logits = tl.dot(qb, tl.trans(bk.to(DT)), logits, input_precision=PRECISION)
        rel = qpos[:, None] - (k_off + cols)[None, :]  # i - j
        key_ok = _key_ok(cols, Tk, Pad, pad_off, stride_pt, HAS_PAD)
        keep = (rel <= left) & (rel >= -right) & key_ok[None, :]
        logits = tl.where(keep, logits + _bias_tile(rel, Bias, stride_br, head_off, n_rel, REGION), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        # Rows that have seen no key yet keep m = -inf; shift them by 0 so that exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        p = tl.exp2((logits - m_safe[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        # a padded key's v meets p = 0 in the product, and 0 * NaN is NaN: zeroed after the load, whose
        # mask then does not wait on the padding's (a dependent mask costs the pipelined loop registers)
        v = tl.where(key_ok[:, None], _load_full(V, cols, cols < Tk, stride_vt, stride_vd, HEAD), 0.0).to(DT)
        acc = tl.dot(p.to(DT), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, P, W, S, Bias, Pad, Out, Lse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_br, stride_bh, stride_pb, stride_pt,
    H, Tq, Tk, n_rel, left, right, q_off, k_off, scale, n_tiles,
    HEAD: tl.constexpr, HAS_P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, HEAD) query tile of one (batch, head): Out tile and its log-sum-exp.

    P: the folded (h, h) P~ when HAS_P, else a placeholder whose element type is the dot type;
    scale: 1 / sqrt(h), applied to RoPE(q) when there is no P (P~ holds it otherwise)."""
    HALF: tl.constexpr = HEAD // 2
    DT = P.dtype.element_ty  # operand type of every tl.dot (fp32 under the interpreter for bf16)
    pid_m, pid_bh = _tile_and_head(n_tiles)
    b = pid_bh // H
    hd = pid_bh % H
    Q += b * stride_qb + hd * stride_qh
    K += b * stride_kb + hd * stride_kh
    V += b * stride_vb + hd * stride_vh
    s = tl.load(S).to(tl.float32)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qpos = q_off + rows
    x1, x2 = _load_pairs(Q, rows, rows < Tq, stride_qt, stride_qd, HALF)
    cos, sin = _rope_angles(qpos, s, W, HALF)
    a = x1 * cos - x2 * sin
    bq = x1 * sin + x2 * cos
    if HAS_P:
        p_aa, p_ab, p_ba, p_bb = _load_p(P, HALF)
        qa = tl.dot(a.to(DT), p_aa, input_precision=PRECISION)
        qa = tl.dot(bq.to(DT), p_ba, qa, input_precision=PRECISION).to(DT)
        qb = tl.dot(a.to(DT), p_ab, input_precision=PRECISION)
        qb = tl.dot(bq.to(DT), p_bb, qb, input_precision=PRECISION).to(DT)
    else:
        qa = (a * scale).to(DT)
        qb = (bq * scale).to(DT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], tl.float32)
    cos0, sin0 = _rope_angles(tl.arange(0, BLOCK_N), s, W, HALF)
    q_first = q_off + pid_m * BLOCK_M
    lo, hi = _key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M - 1, left, right, q_off, k_off, Tk, BLOCK_N)
    if HAS_BIAS:
        d1, d2 = _split_regions(lo, hi, q_first - n_rel + 2 - k_off - BLOCK_N,
                                q_first + BLOCK_M + n_rel - 2 - k_off, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, lo, d1, qa, qb, qpos, K, V, W, s, cos0, sin0, Bias, stride_br, hd * stride_bh, n_rel, Pad,
            b * stride_pb, stride_pt, stride_kt, stride_kd, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD,
            BLOCK_N, PAST, HAS_PAD, PRECISION)
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, d1, d2, qa, qb, qpos, K, V, W, s, cos0, sin0, Bias, stride_br, hd * stride_bh, n_rel, Pad,
            b * stride_pb, stride_pt, stride_kt, stride_kd, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD,
            BLOCK_N, NEAR, HAS_PAD, PRECISION)
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, d2, hi, qa, qb, qpos, K, V, W, s, cos0, sin0, Bias, stride_br, hd * stride_bh, n_rel, Pad,
            b * stride_pb, stride_pt, stride_kt, stride_kd, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD,
            BLOCK_N, FUTURE, HAS_PAD, PRECISION)
    else:
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, lo, hi, qa, qb, qpos, K, V, W, s, cos0, sin0, Bias, stride_br, hd * stride_bh, n_rel, Pad,
            b * stride_pb, stride_pt, stride_kt, stride_kd, stride_vt, stride_vd, Tk, left, right, k_off, HALF, HEAD,
            BLOCK_N, NO_BIAS, HAS_PAD, PRECISION)

    # A row with no kept key gives zeros and lse = +inf, so that the backward's exp(l - lse) is 0.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    out_offs = pid_bh * Tq * HEAD + rows[:, None] * HEAD + tl.arange(0, HEAD)[None, :]
    tl.store(Out + out_offs, out.to(Out.dtype.element_ty), mask=rows[:, None] < Tq)
    tl.store(Lse + pid_bh * Tq + rows, lse, mask=rows < Tq)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand type of the kernels' tl.dot: the inputs' own, except bf16 under the interpreter."""
    if dtype == torch.bfloat16 and _interpreted():
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


def folded_p(M: torch.Tensor, layout: str) -> torch.Tensor:
    """P~ = (M M^T)[perm][:, perm] / sqrt(h), fp32, (h, h)."""
    h = M.shape[0]
    Mf = M.float()
    perm = layout_perm(h, layout, M.device)
    return ((Mf @ Mf.T) / math.sqrt(h))[perm][:, perm].contiguous()


def p_arg(M: torch.Tensor | None, layout: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, bool]:
    """(P, HAS_P) for the kernels: P~ in the dot type of `dtype` inputs, or without M a one-element
    placeholder that only carries that type."""
    if M is None:
        return torch.zeros(1, dtype=dot_dtype(dtype), device=device), False
    return folded_p(M, layout).to(dot_dtype(dtype)), True


def window_ints(left: int, right: int, causal: bool = False) -> tuple[int, int]:
    """Schema ints (-1 = unbounded) to the kernel's band sides."""
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    if causal:
        right = min(right, 0)
    return left, right


def default_blocks(h: int) -> dict:
    """Forward tile sizes and launch shape per head width."""
    if h <= 64:  # 8 warps: at 4 the (128, 64) tiles spill registers on sm_80 (h = 32) and sm_90 (h = 64)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=16, num_warps=8, num_stages=2)  # 32 keys spill on sm_80


def _short_query_blocks(cfg: dict, Tq: int) -> dict:
    """Decoding (Tq = 1) and other short query runs: a 128-row tile would be almost all padding, so
    the tile shrinks, and a tile of 64 rows or fewer needs no more than 4 warps."""
    cfg = dict(cfg)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(Tq)))
    if cfg["BLOCK_M"] <= 64:
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    return cfg


# Tests shrink the tiles (e.g. 16) so that ragged and multi-tile cases happen at small T.
BLOCK_OVERRIDE: dict = {}


def _blocks_for(h: int, defaults) -> dict:
    cfg = defaults(h)
    cfg.update(BLOCK_OVERRIDE)
    return cfg


def _pad_arg(key_padding_mask, like):
    if key_padding_mask is None:
        return like, 0, 0, False
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return pad, pad.stride(0), pad.stride(1), True


def _bias_arg(bias, like):
    if bias is None:
        return like, 0, 0, 1, False
    return bias, bias.stride(0), bias.stride(1), (bias.shape[0] + 1) // 2, True


def forward(q, k, v, M, w, s, bias, key_padding_mask, left, right, q_offset, k_offset, layout):
    """Launch the forward kernel. q: (B, H, Tq, h); k, v: (B, H, Tk, h), any strides; M: (h, h) or None.

    left/right: kernel band sides (see window_ints). Returns out (B, H, Tq, h) in q's dtype,
    contiguous, and lse (B, H, Tq) fp32 (+inf on rows with no key).
    """
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    out = torch.empty((B, H, Tq, h), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if Tq == 0 or B * H == 0:
        return out, lse
    P, has_p = p_arg(M, layout, q.dtype, q.device)
    w32 = w.detach().float().contiguous()
    s32 = torch.as_tensor(s, dtype=torch.float32, device=q.device).detach().reshape(1)
    bias_t, sbr, sbh, n_rel, has_bias = _bias_arg(bias, q)
    pad_t, spb, spt, has_pad = _pad_arg(key_padding_mask, q)
    cfg = _short_query_blocks(_blocks_for(h, default_blocks), Tq)
    n_tiles = triton.cdiv(Tq, cfg["BLOCK_M"])
    _attn_fwd_kernel[(n_tiles * B * H,)](
        q, k, v, P, w32, s32, bias_t, pad_t, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        sbr, sbh, spb, spt,
        H, Tq, Tk, n_rel, left, right, q_offset, k_offset, 1.0 / math.sqrt(h), n_tiles,
        HEAD=h, HAS_P=has_p, HAS_BIAS=has_bias, HAS_PAD=has_pad,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION=precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile list (echo_kernels.aot)
# --------------------------------------------------------------------------------------------------


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument of `fn`: pointers as given, constexprs as such, the rest i32."""
    import inspect

    py = getattr(fn, "fn", fn)  # JITFunction or interpreter wrapper around the Python function
    names = list(inspect.signature(py).parameters)
    return {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}


def aot_specs() -> list:
    """The launches of the forward and backward kernels at their default block sizes:
    h in {32, 64, 128}, bf16 and fp16, with a bias table (n = 15) and a key-padding mask, with M
    ("rope_then_m": P folded into q) and without (names ending in _no_m: the model's default order)."""
    from .. import aot
    from . import attention_backward as bwd

    specs = []
    for h in ATTENTION_HEAD_WIDTHS:
        for dt in ("bf16", "fp16"):
            f = default_blocks(h)
            ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "P", "Out")}
            ptrs.update(W="*fp32", S="*fp32", Bias="*fp32", Pad="*u8", Lse="*fp32", scale="fp32")
            for has_p, suffix in ((True, ""), (False, "_no_m")):
                ce = dict(HEAD=h, HAS_P=has_p, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=f["BLOCK_M"],
                          BLOCK_N=f["BLOCK_N"], PRECISION="tf32")
                specs.append(aot.KernelSpec(
                    f"attention_fwd{suffix}_h{h}_{dt}", _attn_fwd_kernel, _signature(_attn_fwd_kernel, ptrs, ce),
                    ce, num_warps=f["num_warps"], num_stages=f["num_stages"]))
                if h == 64 and dt == "bf16":  # the decoding launch (Tq = 1 against a KV cache)
                    d = _short_query_blocks(f, 1)
                    ce = dict(ce, BLOCK_M=d["BLOCK_M"])
                    specs.append(aot.KernelSpec(
                        f"attention_fwd_decode{suffix}_h{h}_{dt}", _attn_fwd_kernel,
                        _signature(_attn_fwd_kernel, ptrs, ce), ce, num_warps=d["num_warps"],
                        num_stages=d["num_stages"]))

            g = bwd.default_blocks(h)
            ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "DO", "P", "QQ", "DV", "DQ", "DQQ", "O")}
            ptrs.update(W="*fp32", S="*fp32", Bias="*fp32", Pad="*u8", Lse="*fp32", Delta="*fp32", G="*fp32",
                        DBias="*fp32", DP="*fp32", DKK="*fp32", DK=f"*{dt}", scale="fp32")
            for name, fn, ce in (
                ("delta", bwd._attn_bwd_delta_kernel, dict(
                    HEAD=h, HAS_P=True, BLOCK=g["delta"]["BLOCK_M"], PRECISION="tf32")),
                ("delta_no_m", bwd._attn_bwd_delta_kernel, dict(
                    HEAD=h, HAS_P=False, BLOCK=g["delta"]["BLOCK_M"], PRECISION="tf32")),
                ("dkdv", bwd._attn_bwd_dkdv_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=g["dkdv"]["BLOCK_M"], BLOCK_N=g["dkdv"]["BLOCK_N"],
                    PRECISION="tf32")),
                ("unrope", bwd._attn_bwd_unrope_kernel, dict(HEAD=h, BLOCK=g["unrope"]["BLOCK_M"])),
                ("dq", bwd._attn_bwd_dq_kernel, dict(
                    HEAD=h, HAS_BIAS=True, HAS_PAD=True, BLOCK_M=g["dq"]["BLOCK_M"], BLOCK_N=g["dq"]["BLOCK_N"],
                    PRECISION="tf32")),
                ("dq_unrotate", bwd._attn_bwd_dq_unrotate_kernel, dict(
                    HEAD=h, HAS_P=True, BLOCK_M=g["unrotate"]["BLOCK_M"], PRECISION="tf32")),
                ("dq_unrotate_no_m", bwd._attn_bwd_dq_unrotate_kernel, dict(
                    HEAD=h, HAS_P=False, BLOCK_M=g["unrotate"]["BLOCK_M"], PRECISION="tf32")),
                ("dbias", bwd._attn_bwd_dbias_diag_kernel, dict(
                    HEAD=h, HAS_PAD=True, BLOCK_M=g["diag"]["BLOCK_M"], PRECISION="tf32")),
            ):
                c = g[{"delta_no_m": "delta", "dq_unrotate": "unrotate", "dq_unrotate_no_m": "unrotate",
                       "dbias": "diag"}.get(name, name)]
                specs.append(aot.KernelSpec(
                    f"attention_bwd_{name}_h{h}_{dt}", fn, _signature(fn, ptrs, ce), ce,
                    num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return specs
