"""The bench harness: device ceilings measured once per run, roofline figures per case, and one JSON.

Every bench file times its cases with pytest-benchmark (`benchmark.pedantic`, warm-up rounds excluded,
medians reported) and tags each with `record(benchmark, role=..., bytes=..., flops=...)`: `role` is
"ours" for this package's implementation and "peer" for what it is compared against; bytes and flops
are what the case must move and compute at the least. At the end of the run the harness divides them
by the device's measured copy bandwidth and matrix rate and writes everything to one JSON file
(ECHO_BENCH_JSON, default .benchmarks/echo-bench.json; see conftest.py), rewritten as each case
ends, which `python -m echo_kernels.report` renders.

ECHO_BENCH_SIZE=tiny shrinks every case to a toy size, so that `bash benches/gpu_run.sh --rehearse`
runs all the benches on a 2-core CPU in about a minute; its numbers only show that the plumbing works.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import pytest
import torch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def bench_size() -> str:
    """ECHO_BENCH_SIZE: "full" (the default) or "tiny"."""
    size = os.environ.get("ECHO_BENCH_SIZE", "full")
    if size not in ("full", "tiny"):
        raise ValueError(f"ECHO_BENCH_SIZE must be 'full' or 'tiny', got {size!r}")
    return size


TINY = bench_size() == "tiny"


def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def synchronize() -> None:
    if GPU:
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up, device synchronised."""
    return statistics.median(_wall_times(fn, repeats))


def best_seconds(fn, repeats: int) -> float:
    """Shortest wall time of fn() over `repeats` calls after one warm-up: what the device can do, for a
    ceiling (on a shared CPU the median of a few calls can land below what a later case reaches)."""
    return min(_wall_times(fn, repeats))


def _wall_times(fn, repeats: int) -> list[float]:
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


_ceilings: dict = {}


def adopt_ceilings(values: dict) -> None:
    """Use `values` (a results JSON's "ceilings") instead of measuring: a run continued across sessions
    keeps one set of denominators."""
    _ceilings.update(values)


def ceilings() -> dict:
    """The device's copy bandwidth (bytes read + written per second) and matrix-product rate, measured
    once on random data: the denominators of every roofline fraction in this run."""
    if not _ceilings:
        _ceilings.update(_measure_ceilings())
    return dict(_ceilings)


def _measure_ceilings() -> dict:
    n_bytes, n, dtype = (1 << 30, 8192, torch.bfloat16) if GPU else (1 << 26, 1024, torch.float32)
    if TINY:
        n_bytes, n = 1 << 22, 256
    src = torch.randn(n_bytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    copy = best_seconds(lambda: dst.copy_(src), 20 if GPU else 10)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    matmul = best_seconds(lambda: a @ b, 20 if GPU else 10)
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


def alternating_rounds(ways, rounds: int) -> list:
    """pytest parameters (way, round) with every way's round r before any way's round r + 1, and each
    round starting one way later than the one before: a drift in a shared machine's speed then reaches
    every way alike, where ways timed one after the other can land in different weather, and no way
    always follows the same one (which leaves it the other's memory and caches). ways: names or
    pytest.param(name, marks=...). Each way is recorded under its name (`record(..., case=name)`) and
    the results give it the median of all its rounds."""
    params = []
    for r in range(rounds):
        turn = r % len(ways)
        for way in ways[turn:] + ways[:turn]:
            name, marks = (way.values[0], way.marks) if hasattr(way, "values") else (way, ())
            params.append(pytest.param(name, r, marks=marks, id=f"{name}-round{r}"))
    return params


def run_timed(benchmark, fn, *, rounds: int, warmup_rounds: int = 2, args=()):
    """benchmark.pedantic with the device synchronised inside the timed region."""

    def timed(*a):
        out = fn(*a)
        synchronize()
        return out

    return benchmark.pedantic(timed, args=args, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def _case(bench) -> dict:
    """bench: pytest-benchmark's record of one finished case (its Metadata)."""
    info = dict(bench.extra_info)
    case = info.pop("case", None) or bench.param or bench.name
    return {"group": bench.group, "case": case, "median_s": bench.stats.median, "times_s": bench.stats.data,
            **info}


def _rounds_merged(rows: list[dict]) -> list[dict]:
    """One row per (group, case), in order of first appearance: a case timed in alternating rounds, one
    pytest case per round (see alternating_rounds), gets the median of all its rounds' times."""
    merged: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["group"], row["case"])
        times = row.get("times_s", [row["median_s"]])  # a row of an earlier results file may have none
        if key in merged:
            merged[key]["times_s"] = merged[key]["times_s"] + times
        else:
            merged[key] = {**row, "times_s": times}
    for row in merged.values():
        row["median_s"] = statistics.median(row["times_s"])
    return list(merged.values())


def _with_fractions(row: dict) -> dict:
    """row with what its median makes of the device's copy bandwidth and matrix rate (and the TFLOP/s
    it reaches)."""
    limits = ceilings()
    if row.get("bytes"):
        row["bandwidth_fraction"] = row["bytes"] / row["median_s"] / limits["copy_bandwidth"]
    if row.get("flops"):
        row["tflops"] = row["flops"] / row["median_s"] / 1e12
        row["flops_fraction"] = row["flops"] / row["median_s"] / limits["matmul_flops"]
    return row


def results(benchmarks, previous: list[dict] = ()) -> dict | None:
    """The run's results as the JSON `python -m echo_kernels.report` reads, or None if nothing ran.
    previous: cases of an earlier session of the same run, kept ahead of this session's."""
    cases = [_with_fractions(row)
             for row in _rounds_merged([*previous, *(_case(b) for b in benchmarks if b)])]
    if not cases:
        return None
    return {
        "device": device_name(),
        "gpu": GPU,
        "date": datetime.date.today().isoformat(),
        "size": bench_size(),
        "torch": torch.__version__,
        "ceilings": ceilings(),
        "cases": cases,
    }
