"""Hooks of the bench harness (benches/harness.py): write the run's JSON and print its table."""

import json
import os
from pathlib import Path

from harness import results


def pytest_sessionfinish(session, exitstatus):
    bench_session = getattr(session.config, "_benchmarksession", None)
    run = results(bench_session.benchmarks) if bench_session is not None else None
    if run is None:
        return
    path = Path(os.environ.get("ECHO_BENCH_JSON", ".benchmarks/echo-bench.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=1))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        from echo_kernels.report import markdown_table

        reporter.write_line(f"\nEcho benchmark results, written to {path}:\n")
        reporter.write_line(markdown_table(run))
