"""Hooks of the bench harness (benches/harness.py): mark the headline cases, write the run's JSON as each
case ends, and print its table.

ECHO_BENCH_JSON (default .benchmarks/echo-bench.json) is rewritten, whole and atomically, after every
case, so a run killed part-way keeps every case that finished. With ECHO_BENCH_APPEND=1 the cases and
ceilings already in that file are kept, and this session's cases follow them (benches/gpu_run.sh runs
the headline cases and the rest as two sessions of one run).
"""

import fnmatch
import json
import os
from pathlib import Path

import pytest

from harness import adopt_ceilings, results

# The comparisons README.md's table leads with, marked `headline`: benches/gpu_run.sh runs them first,
# and alone under --quick. Patterns of node ids (fnmatch), CPU and GPU variants alike. Of the attention
# ways at the encoder's shape (global, and on a GPU windowed), forward and backward: the fused kernel, the
# plain flash kernel (the floor the fused one is measured against) and FlexAttention (the same maths
# compiled); globally also the fused kernel with every pass at two stages, which says what the tile
# tables' third stage gains (docs/model.md, "Tile tables"). The groups' other ways, among them the
# reference's and torch.compile's slow first rounds, run in the step after.
HEADLINE = (
    "benches/bench_model.py::test_training_step[[]*]",
    *(f"benches/bench_attention.py::test_attention[[]{shape}-{way}-round*-{passes}]"
      for shape, ways in (("encoder_global", ("kernel", "kernel_2_stages", "plain", "flex")),
                          ("encoder_w256", ("kernel", "flex")))
      for way in ways for passes in ("fwd", "fwd_bwd")),
    "benches/bench_orthogonal.py::test_cpu[[]h64-N32-B88-*-fwd+bwd]",
    "benches/bench_orthogonal.py::test_gpu[[]h64-N32-B88-*-fwd+bwd]",
)

_previous: list[dict] = []
_written = {"count": 0}


def json_path() -> Path:
    return Path(os.environ.get("ECHO_BENCH_JSON", ".benchmarks/echo-bench.json"))


def appending() -> bool:
    value = os.environ.get("ECHO_BENCH_APPEND", "0")
    if value not in ("0", "1"):
        raise ValueError(f"ECHO_BENCH_APPEND must be '0' or '1', got {value!r}")
    return value == "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(fnmatch.fnmatchcase(item.nodeid, pattern) for pattern in HEADLINE):
            item.add_marker(pytest.mark.headline)


def pytest_sessionstart(session):
    path = json_path()
    if appending() and path.exists():
        earlier = json.loads(path.read_text())
        _previous[:] = earlier["cases"]
        adopt_ceilings(earlier["ceilings"])


def _run(session) -> dict | None:
    bench_session = getattr(session.config, "_benchmarksession", None)
    return results(bench_session.benchmarks, _previous) if bench_session is not None else None


def _write(run: dict) -> Path:
    """Replaces the JSON in one rename, so that a reader (or a kill) never meets half a file."""
    path = json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(run, indent=1))
    os.replace(partial, path)
    return path


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    bench_session = getattr(item.config, "_benchmarksession", None)
    finished = len(bench_session.benchmarks) if bench_session is not None else 0
    if finished > _written["count"]:
        run = _run(item.session)
        if run is not None:
            _write(run)
        _written["count"] = finished


def pytest_sessionfinish(session, exitstatus):
    run = _run(session)
    if run is None or len(run["cases"]) == len(_previous):
        return
    path = _write(run)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        from echo_kernels.report import markdown_table

        reporter.write_line(f"\nEcho benchmark results, written to {path}:\n")
        reporter.write_line(markdown_table(run))
