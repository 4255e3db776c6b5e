"""orthogonal_product: the compiled op (csrc/) against the reference and the per-rotation loop.

The per-rotation loop is how model code without this op builds M: one dense h x h Givens matrix per
rotation and one batched h x h matrix product each. Every case is timed forward and forward+backward,
on the CPU always and on the GPU when one is present (cases marked gpu).

    python -m pytest benches/bench_orthogonal.py                 # pytest-benchmark table
    python -m pytest benches/bench_orthogonal.py -k speedup -s   # the measured CPU ratio
"""

import statistics

import pytest
import torch

from echo_kernels import reference
from harness import TINY, median_seconds, record, run_timed
from naive import orthogonal_product as per_rotation_loop



def compiled_op(thetas, pairs, R, givens_first=True):
    return torch.ops.echo_kernels.orthogonal_product(thetas, pairs, R, givens_first)


IMPLS = {"op": compiled_op, "reference": reference.orthogonal_product, "per_rotation_loop": per_rotation_loop}


def make_case(h, n, batch, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, h, (n,), generator=g)
    j = (i + torch.randint(1, h, (n,), generator=g)) % h
    pairs = torch.stack([i, j], dim=1).to(device)
    thetas = torch.randn(batch, n, generator=g).to(device, dtype)
    R = torch.randn(batch, h, h, generator=g).to(device, dtype)
    return thetas, pairs, R


_upstream: dict = {}


def step(impl, thetas, pairs, R, backward):
    """One forward (and backward, from a fixed upstream gradient made once) of `impl`; returns M."""
    if not backward:
        with torch.no_grad():
            return impl(thetas, pairs, R)
    thetas = thetas.detach().requires_grad_(True)
    R = R.detach().requires_grad_(True)
    M = impl(thetas, pairs, R)
    key = (M.shape, M.dtype, M.device)
    if key not in _upstream:
        _upstream[key] = torch.ones_like(M)
    M.backward(_upstream[key])
    return M


# -- CPU ---------------------------------------------------------------------------------------------

CPU_CASES = {"h64-N32-B88": (64, 32, 88), "h16-N120-B88": (16, 120, 88), "h128-N64-B8": (128, 64, 8)}
if TINY:  # ECHO_BENCH_SIZE=tiny (harness.py): the same names, toy sizes
    CPU_CASES = {name: (16, 8, 4) for name in CPU_CASES}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu(benchmark, case, impl, backward):
    h, n, batch = CPU_CASES[case]
    thetas, pairs, R = make_case(h, n, batch)
    benchmark.group = f"orthogonal_product cpu {case} {'fwd+bwd' if backward else 'fwd'}"
    rounds = 30 if impl == "op" else 3  # the peers take up to seconds per call on a 2-core CPU
    run_timed(benchmark, step, args=(IMPLS[impl], thetas, pairs, R, backward), rounds=rounds, warmup_rounds=1)
    record(benchmark, role="ours" if impl == "op" else "peer", case=impl, h=h, N=n, batch=batch)


def test_cpu_speedup_over_per_rotation_loop():
    """Forward+backward at h=64, N=32, batch 88: the op is at least 10x faster than the per-rotation
    loop, both timed in this run (medians, so a noisy machine does not decide it)."""
    thetas, pairs, R = make_case(64, 32, 88)
    op = median_seconds(lambda: step(compiled_op, thetas, pairs, R, True), repeats=21)
    loop = median_seconds(lambda: step(per_rotation_loop, thetas, pairs, R, True), repeats=5)
    ref = median_seconds(lambda: step(reference.orthogonal_product, thetas, pairs, R, True), repeats=5)
    print(f"\nh=64 N=32 batch=88 fwd+bwd on the CPU: op {op * 1e6:.0f} us, reference {ref * 1e6:.0f} us, "
          f"per-rotation loop {loop * 1e6:.0f} us: {loop / op:.1f}x faster than the loop, "
          f"{ref / op:.1f}x than the reference")
    assert loop / op >= 10.0


# -- GPU ---------------------------------------------------------------------------------------------

GPU_CASES = {"h64-N32-B88": (64, 32, 88), "h128-Nfull-B1": (128, 128 * 127 // 2, 1),
             "h128-Nfull-B16": (128, 128 * 127 // 2, 16), "h256-N128-B88": (256, 128, 88)}


def cuda_microseconds(fn, repeats=200, warmup=20):
    """Median time of fn() on the GPU, by CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(times)


# The peers launch kernels per rotation: with thousands of rotations they are timed at small N only.
GPU_PARAMS = [(case, impl) for case in GPU_CASES for impl in IMPLS
              if impl == "op" or GPU_CASES[case][1] <= 1000]


@pytest.mark.gpu
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case,impl", GPU_PARAMS, ids=[f"{c}-{i}" for c, i in GPU_PARAMS])
def test_gpu(benchmark, case, impl, backward):
    h, n, batch = GPU_CASES[case]
    thetas, pairs, R = make_case(h, n, batch, device="cuda")
    benchmark.group = f"orthogonal_product cuda {case} {'fwd+bwd' if backward else 'fwd'}"

    run_timed(benchmark, step, args=(IMPLS[impl], thetas, pairs, R, backward), rounds=50)
    record(benchmark, role="ours" if impl == "op" else "peer", case=impl, h=h, N=n, batch=batch,
           cuda_us=cuda_microseconds(lambda: step(IMPLS[impl], thetas, pairs, R, backward)))


def graph_microseconds(fn, repeats=200):
    """Median GPU time of fn() replayed from a CUDA graph: the kernels alone, without the host's
    launch overhead (the op never synchronises, so it can be captured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_microseconds(graph.replay, repeats=repeats)


@pytest.mark.gpu
def test_gpu_targets():
    """The op's kernels, forward then backward (CUDA graph replay, median): h=64, N=32, batch 88 in
    under 20 us; h=128 with every pair (N = 8128), one matrix, in under 100 us."""
    results = {}
    op_bwd = torch.ops.echo_kernels.orthogonal_product_backward
    for case, limit in (("h64-N32-B88", 20.0), ("h128-Nfull-B1", 100.0)):
        h, n, batch = GPU_CASES[case]
        thetas, pairs, R = make_case(h, n, batch, device="cuda")
        upstream = torch.ones(batch, h, h, device="cuda")

        def fwd_bwd():
            out = compiled_op(thetas, pairs, R)
            op_bwd(upstream, thetas, pairs, out, True)

        results[case] = (graph_microseconds(fwd_bwd), cuda_microseconds(fwd_bwd), limit)
    print("\n" + "\n".join(f"{c}: kernels {g:.1f} us, eager {e:.1f} us (target {lim:.0f} us)"
                            for c, (g, e, lim) in results.items()))
    for case, (us, _, limit) in results.items():
        assert us < limit, f"{case}: {us:.1f} us"
