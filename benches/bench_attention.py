"""echo_attention throughput against its peers, in one run (`pytest benches/bench_attention.py`).

The maths is the default order as the model calls it: M is folded into the q and k projections
upstream, so the op gets M=None and rotates by RoPE only; then the clamped relative bias and the band
mask. Peers doing that same maths:
- kernel (ours): echo_kernels.echo_attention as shipped, ECHO_BACKEND=auto: the fused Triton kernel on a
  GPU, the blocked CPU path (echo_kernels.kernels.attention_cpu) on the CPU;
- reference: echo_kernels.reference.echo_attention (chunked plain PyTorch), eager;
- compiled: torch.compile of the reference;
- on a GPU: FlexAttention (RoPE by a separate PyTorch pass, the bias
  table in a score_mod, the window as a block mask), compiled as FlexAttention must be; SDPA with a
  dense additive bias (bias + band mask materialised as a (1, H, T, T) tensor);
- on a GPU, global shapes only: plain (echo_kernels.plain_attention), flash attention with no RoPE, bias
  or window on the same tiles as the kernel: the floor, not the same maths (its backward has no bias
  gradient to take); its ratio to the kernel is what the extras cost;
- on Hopper, the encoder shapes: kernel_sm80_tiles, the kernel on sm_80's tile table instead of its
  own (docs/model.md, "Tile tables"): what sm_90's larger tiles gain;
- on a GPU, the encoder shapes: kernel_2_stages, the kernel with every pass pipelined two stages deep
  (the tile tables take three where it fits: docs/model.md, "Tile tables"): what the third stage gains;
- on a GPU, forward and backward: kernel_other_dq, the kernel with the dk/dv pass summing dq where
  its tile table has the dq pass do it, or the other way round (docs/model.md, "Backward
  passes"): the two backward shapes, timed against each other.
And the same op given M, so that what the fold saves is measured:
- kernel_unfolded: the default order with M applied by the op (q M and k M, then the kernel);
- kernel_rope_then_m: the reference code's order, P = M M^T folded into the kernel's queries.

A decoding step's cross-attention (test_decoding_step: one query, at text position 100, against the
encoder's 1,500 frames): kernel, the keys given rotated (keys_rotated, as the model's KV cache keeps them)
against kernel_raw_keys, the op rotating the cached keys again, as at every step before they were cached
rotated, and, on a GPU, kernel_4_warps, the step's 16-row query tile on 4 warps instead of its table's 8
(docs/model.md, "Tile tables").

Each case records, in benchmark.extra_info: the flops of the computed (kept) query-key pairs (4 h per
pair forward, 2.5 times that backward; the results give TFLOP/s), and on a GPU the peak memory beyond
the inputs (extra_fraction_of_qkvo: beyond q, k, v, out and the gradients, over the size of q, k, v
and out). On the CPU the kernel, the reference and its torch.compile run at small shapes and at the
encoder's T = 1500.
"""

from __future__ import annotations

import contextlib
import functools
import math
from unittest import mock

import pytest
import torch

from echo_kernels import reference
from breakdown import breakdown
from harness import TINY, alternating_rounds, record, run_timed

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
N_REL = 15  # Echo's max_rel_dist

# name -> (B, H, T, h, window); window None = global
GPU_SHAPES = {
    "encoder_global": (8, 16, 1500, 64, None),
    "encoder_w256": (8, 16, 1500, 64, 256),
    "long_w256": (1, 16, 16384, 64, 256),
}
CPU_SHAPES = {"small_global": (1, 4, 256, 64, None), "small_w32": (1, 4, 256, 64, 32),
              "encoder_global": (1, 4, 1500, 64, None)}
# ECHO_BENCH_SIZE=tiny (harness.py): the same names, toy sizes.
TINY_SHAPES = {"small_global": (1, 2, 32, 32, None), "small_w32": (1, 2, 32, 32, 8),
               "encoder_global": (1, 2, 48, 32, None)}
SHAPES = TINY_SHAPES if TINY else GPU_SHAPES if ON_GPU else CPU_SHAPES
# (B, H, Tk, h) of test_decoding_step: the benches' GPU model (batch 8, H 16, h 64), the CPU model's heads
DECODE_SHAPE = (1, 2, 48, 32) if TINY else (8, 16, 1500, 64) if ON_GPU else (1, 6, 1500, 64)
# The GPU's ways run in the CPU rehearsal too (TINY), so that their code has run before a GPU sees it:
# there plain falls back to SDPA and the contexts below change nothing. FlexAttention does not: on the CPU it
# has no backward, and its forward is a C++ build.
GPU_WAYS = ON_GPU or TINY
DECODE_WAYS = ("kernel", "kernel_raw_keys", "kernel_4_warps") if GPU_WAYS else ("kernel", "kernel_raw_keys")


def make_inputs(B, H, T, h, requires_grad, with_m):
    """q, k (projected, M already folded in), v, w, s, bias and, with_m, an M for the op to apply."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)
    q, k, v = (rnd(B, H, T, h).to(DEVICE, DTYPE) for _ in range(3))
    M = (torch.eye(h) + rnd(h, h) / math.sqrt(h) * 0.1).to(DEVICE) if with_m else None
    w = (10000.0 ** (-torch.arange(h // 2) / (h // 2))).to(DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    bias = (rnd(2 * N_REL - 1, H) * 0.1).to(DEVICE)
    leaves = [t for t in (q, k, v, M, bias) if t is not None]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return dict(q=q, k=k, v=v, M=M, w=w, s=s, bias=bias), leaves


def kept_pairs(T, window):
    """Number of (i, j) pairs inside the band |i - j| <= window (all T^2 when global)."""
    if window is None:
        return T * T
    i = torch.arange(T)
    return int(((i + window).clamp(max=T - 1) - (i - window).clamp(min=0) + 1).sum())


# --------------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------------


def run_reference(x, window):
    return reference.echo_attention(x["q"], x["k"], x["v"], x["M"], x["w"], x["s"], x["bias"], window=window)


_compiled_reference = None


def run_compiled(x, window):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference.echo_attention)
    return _compiled_reference(x["q"], x["k"], x["v"], x["M"], x["w"], x["s"], x["bias"], window=window)


def run_kernel(x, window, rotation="m_then_rope"):
    import echo_kernels

    return echo_kernels.echo_attention(x["q"], x["k"], x["v"], x["M"], x["w"], x["s"], x["bias"],
                                       window=window, rotation=rotation)


def run_kernel_rope_then_m(x, window):
    return run_kernel(x, window, "rope_then_m")


def _rotate(x):
    """q' and k' by a separate RoPE pass (M is in the projections), in q's dtype: what FlexAttention and
    SDPA get. (The reference rotates in float32, and both peers want q, k and v in one dtype.)"""
    T = x["q"].shape[2]
    phi = reference.rope_angles(x["w"], x["s"], torch.arange(T, device=DEVICE))
    return tuple(reference.apply_rope(x[name], phi).to(x[name].dtype) for name in ("q", "k"))


_flex_cache: dict = {}


def run_flex(x, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, h = x["q"].shape
    key = (T, window)
    if key not in _flex_cache:
        if window is None:
            block_mask = None
        else:
            def band(b, head, i, j):
                return (i - j <= window) & (j - i <= window)

            block_mask = create_block_mask(band, None, None, T, T, device=DEVICE)
        _flex_cache[key] = (torch.compile(flex_attention), block_mask)
    flex, block_mask = _flex_cache[key]
    bias = x["bias"]
    n = (bias.shape[0] + 1) // 2

    def score_mod(score, b, head, i, j):
        return score + bias[torch.clamp(i - j, -(n - 1), n - 1) + n - 1, head]

    q, k = _rotate(x)
    return flex(q, k, x["v"], score_mod=score_mod, block_mask=block_mask)


def run_sdpa(x, window):
    T = x["q"].shape[2]
    pos = torch.arange(T, device=DEVICE)
    dense = reference.relative_bias(x["bias"], pos, pos)[None].to(x["q"].dtype)  # (1, H, T, T)
    if window is not None:
        keep = reference.attention_keep(pos, pos, window, False)
        dense = dense.masked_fill(~keep, float("-inf"))
    q, k = _rotate(x)
    return torch.nn.functional.scaled_dot_product_attention(q, k, x["v"], attn_mask=dense)


def run_plain(x, window):
    import echo_kernels

    return echo_kernels.plain_attention(x["q"], x["k"], x["v"])


def sm80_tiles():
    """The attention kernels on sm_80's tile table, whatever the GPU: forward and backward."""
    from echo_kernels.kernels.attention_common import tiles_of

    return tiles_of(80)


def overriding(**sizes):
    """The attention kernels' launches with `sizes` (num_stages=2, say) in place of their tile tables'."""
    from echo_kernels.kernels.attention_common import BLOCK_OVERRIDE

    return mock.patch.dict(BLOCK_OVERRIDE, sizes)


def other_dq_summing():
    """The backward summing dq the other way from its tile table's (kernels.attention_backward)."""
    from echo_kernels.kernels import attention_backward
    from echo_kernels.kernels.attention_common import tile_arch

    table = tile_arch(torch.device(DEVICE))
    return attention_backward.dq_in_key_pass(not attention_backward.DQ_IN_KEY_PASS[table])


IMPLS = {"kernel": run_kernel, "reference": run_reference, "compiled": run_compiled,
         "kernel_unfolded": run_kernel, "kernel_rope_then_m": run_kernel_rope_then_m}
if ON_GPU:
    IMPLS["flex"] = run_flex
if GPU_WAYS:
    IMPLS.update(sdpa=run_sdpa, plain=run_plain)
WITH_M = ("kernel_unfolded", "kernel_rope_then_m")  # the cases whose op is given M
QKV_ONLY = ("plain",)  # no bias table: the backward differentiates q, k and v alone
# Cases run inside a context (forward and backward): the kernel on the other tile table, at two stages, or
# summing dq the other way; and decoding's step on 4 warps.
CONTEXTS = {"kernel_4_warps": functools.partial(overriding, num_warps=4)}
if TINY or (ON_GPU and torch.cuda.get_device_capability()[0] == 9):
    IMPLS["kernel_sm80_tiles"] = run_kernel
    CONTEXTS["kernel_sm80_tiles"] = sm80_tiles
if GPU_WAYS:
    IMPLS["kernel_2_stages"] = run_kernel
    CONTEXTS["kernel_2_stages"] = functools.partial(overriding, num_stages=2)
    IMPLS["kernel_other_dq"] = run_kernel
    CONTEXTS["kernel_other_dq"] = other_dq_summing


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


# Beyond T = 4096 the dense and chunked peers need tens of GiB: there only the kernel and Flex run.
# The plain kernel has no window: it runs the global shapes only. The other tile table runs the encoder's.
# Two stages run the encoder's too. The other way of summing dq changes the backward only.
def _impls(shape: str, backward: bool) -> list[str]:
    return [impl for impl in IMPLS
            if (SHAPES[shape][2] <= 4096 or impl not in ("reference", "compiled", "sdpa"))
            and (impl != "plain" or SHAPES[shape][4] is None)
            and (impl not in ("kernel_sm80_tiles", "kernel_2_stages") or shape.startswith("encoder"))
            and (impl != "kernel_other_dq" or backward)]


# The ways of one shape take turns, round by round (harness.alternating_rounds), each round CALLS timed
# calls: timed one after the other, a shared CPU's drift made the kernel look 20% slower than itself
# given an M. The first round of each way also compiles, autotunes and warms up, untimed.
ROUNDS, CALLS = (4, 5) if ON_GPU else (3, 1)
PARAMS = [pytest.param(shape, backward, *way.values,
                       id=f"{shape}-{way.id}-{'fwd_bwd' if backward else 'fwd'}")
          for shape in SHAPES for backward in (False, True)
          for way in alternating_rounds(_impls(shape, backward), ROUNDS)]


@functools.lru_cache(maxsize=2)
def _case_inputs(shape: str, backward: bool, with_m: bool):
    """The inputs of a shape's cases, made once for all their rounds (one shape's rounds run together)."""
    B, H, T, h, _ = SHAPES[shape]
    x, leaves = make_inputs(B, H, T, h, requires_grad=backward, with_m=with_m)
    return x, leaves, torch.randn(B, H, T, h, device=DEVICE, dtype=DTYPE)


def _step(shape: str, backward: bool, impl: str):
    """One call of the way `impl` at `shape`: its forward, and with `backward` the gradients."""
    window = SHAPES[shape][4]
    x, leaves, do = _case_inputs(shape, backward, impl in WITH_M)
    fn = IMPLS[impl]
    wrt = leaves[:3] if impl in QKV_ONLY else leaves

    def step():
        with CONTEXTS.get(impl, contextlib.nullcontext)():
            out = fn(x, window)
            if backward:
                torch.autograd.grad(out, wrt, do)

    return step


def _passes(backward: bool) -> str:
    return "fwd+bwd" if backward else "fwd"


def _flops(shape: str, backward: bool) -> float:
    """The flops of the kept query-key pairs: 4 h a pair forward, 2.5 times that backward."""
    B, H, T, h, window = SHAPES[shape]
    return 4 * h * B * H * kept_pairs(T, window) * (3.5 if backward else 1.0)


# Where the time of the fused kernel and of the plain one goes (benches/breakdown.py): the host's share
# and each kernel's, at the encoder's shapes. Ahead of test_attention, so that benches/gpu_run.sh's
# benches step reaches them first.
BREAKDOWN_WAYS = ("kernel", "plain") if GPU_WAYS else ("kernel",)


@pytest.mark.parametrize("shape,backward,impl", [
    pytest.param(shape, backward, impl, id=f"{shape}-{impl}-{'fwd_bwd' if backward else 'fwd'}")
    for shape in SHAPES if shape.startswith("encoder") for backward in (False, True)
    for impl in _impls(shape, backward) if impl in BREAKDOWN_WAYS])
def test_breakdown(benchmark, shape, backward, impl):
    step = _step(shape, backward, impl)
    benchmark.group = f"attention breakdown {shape} {_passes(backward)} {str(DTYPE)[6:]}"
    run_timed(benchmark, step, rounds=CALLS, warmup_rounds=1)
    record(benchmark, role="ours" if impl == "kernel" else "peer", case=impl, flops=_flops(shape, backward),
           breakdown=breakdown(step))


@functools.lru_cache(maxsize=1)
def _decoding_inputs():
    """One query at position 100, the raw keys and values of DECODE_SHAPE's frames, and the keys rotated
    at their positions (in float32, then DTYPE), as the model's cache keeps them."""
    B, H, Tk, h = DECODE_SHAPE
    x, _ = make_inputs(B, H, Tk, h, requires_grad=False, with_m=False)
    phi = reference.rope_angles(x["w"], x["s"], torch.arange(Tk, device=DEVICE))
    k_rotated = reference.apply_rope(x["k"].float(), phi).to(DTYPE)
    return dict(x, q=x["q"][:, :, :1].contiguous(), k_rotated=k_rotated)


@pytest.mark.parametrize("impl,round_", alternating_rounds(list(DECODE_WAYS), ROUNDS))
def test_decoding_step(benchmark, impl, round_):
    import echo_kernels

    x = _decoding_inputs()
    B, H, Tk, h = DECODE_SHAPE
    keys_rotated = impl != "kernel_raw_keys"
    k = x["k_rotated"] if keys_rotated else x["k"]

    def step():
        with CONTEXTS.get(impl, contextlib.nullcontext)():
            return echo_kernels.echo_attention(x["q"], k, x["v"], None, x["w"], x["s"], x["bias"],
                                               q_offset=100, keys_rotated=keys_rotated)

    benchmark.group = f"attention decoding step, cross, {str(DTYPE)[6:]}"
    run_timed(benchmark, step, rounds=CALLS, warmup_rounds=(2 if ON_GPU else 1) if round_ == 0 else 0)
    record(benchmark, role="ours" if impl == "kernel" else "peer", case=impl, flops=4 * h * B * H * Tk,
           shape=dict(B=B, H=H, Tq=1, Tk=Tk, h=h, dtype=str(DTYPE)))


@pytest.mark.parametrize("shape,backward,impl,round_", PARAMS)
def test_attention(benchmark, shape, backward, impl, round_):
    B, H, T, h, window = SHAPES[shape]
    x = _case_inputs(shape, backward, impl in WITH_M)[0]
    step = _step(shape, backward, impl)
    benchmark.group = f"attention {shape} {_passes(backward)} {str(DTYPE)[6:]}"
    peak = None
    if round_ == 0:
        step()  # compile / autotune / warm caches outside the timing
        if ON_GPU:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
    run_timed(benchmark, step, rounds=CALLS, warmup_rounds=(2 if ON_GPU else 1) if round_ == 0 else 0)

    out_bytes = B * H * T * h * x["q"].element_size()
    # What a call needs beyond q, k, v and out (and, backward, the gradients it returns): round 0's.
    extra = None if peak is None else peak - out_bytes * (4 if backward else 1)
    record(
        benchmark,
        role="ours" if impl == "kernel" else "peer",
        case=impl,
        flops=_flops(shape, backward),
        peak_bytes_beyond_inputs=peak,
        extra_fraction_of_qkvo=None if extra is None else extra / (4 * out_bytes),
        shape=dict(B=B, H=H, T=T, h=h, window=window, dtype=str(DTYPE)),
    )
