"""The bench harness: device ceilings measured once per run, roofline figures per case, and one JSON.

Every bench file times its cases with pytest-benchmark (`benchmark.pedantic`, warm-up rounds excluded,
medians reported) and tags each with `record(benchmark, role=..., bytes=..., flops=...)`: `role` is
"ours" for this package's implementation and "peer" for what it is compared against; bytes and flops
are what the case must move and compute at the least. At the end of the run the harness divides them
by the device's measured copy bandwidth and matrix rate and writes everything to one JSON file
(ECHO_BENCH_JSON, default .benchmarks/echo-bench.json; see conftest.py), which
`python -m echo_kernels.report` renders.
"""

from __future__ import annotations

import datetime
import functools
import platform
import statistics
import time

import torch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def synchronize() -> None:
    if GPU:
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up, device synchronised."""
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def ceilings() -> dict:
    """The device's copy bandwidth (bytes read + written per second) and matrix-product rate, measured
    now on random data: the denominators of every roofline fraction in this run."""
    n_bytes, n, dtype = (1 << 30, 8192, torch.bfloat16) if GPU else (1 << 26, 1024, torch.float32)
    src = torch.randn(n_bytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    copy = median_seconds(lambda: dst.copy_(src), 20 if GPU else 5)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    matmul = median_seconds(lambda: a @ b, 20 if GPU else 3)
    return {
        "copy_bandwidth": 2 * n_bytes / copy,
        "matmul_flops": 2 * n**3 / matmul,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def record(benchmark, *, role: str, bytes: float | None = None, flops: float | None = None, **extra) -> None:
    """Tag a finished case: role "ours" or "peer"; the least bytes it must move and flops it must do.
    `case=` names it in the results (default: its parameter id)."""
    if role not in ("ours", "peer"):
        raise ValueError(f"role must be 'ours' or 'peer', got {role!r}")
    benchmark.extra_info.update(role=role, bytes=bytes, flops=flops, **extra)


def run_timed(benchmark, fn, *, rounds: int, warmup_rounds: int = 2, args=()):
    """benchmark.pedantic with the device synchronised inside the timed region."""

    def timed(*a):
        out = fn(*a)
        synchronize()
        return out

    return benchmark.pedantic(timed, args=args, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def _case(bench) -> dict:
    """bench: pytest-benchmark's record of one finished case (its Metadata)."""
    median = bench.stats.median
    info = dict(bench.extra_info)
    limits = ceilings()
    case = info.pop("case", None) or bench.param or bench.name
    row = {"group": bench.group, "case": case, "median_s": median, **info}
    if info.get("bytes"):
        row["bandwidth_fraction"] = info["bytes"] / median / limits["copy_bandwidth"]
    if info.get("flops"):
        row["flops_fraction"] = info["flops"] / median / limits["matmul_flops"]
    return row


def results(benchmarks) -> dict | None:
    """The run's results as the JSON `python -m echo_kernels.report` reads, or None if nothing ran."""
    cases = [_case(b) for b in benchmarks if b]
    if not cases:
        return None
    return {
        "device": device_name(),
        "gpu": GPU,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "ceilings": ceilings(),
        "cases": cases,
    }
