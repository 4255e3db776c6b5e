"""A pytest plugin that writes each failure's report the moment the test fails (`-p stream_failures`).

pytest prints tracebacks in its summary, when the session ends. benches/gpu_run.sh kills a step that
outruns its time limit, and a killed session never reaches its summary: its log then holds progress
letters and nothing that says why a test failed. With this plugin every failure is in the log as it
happens, in the traceback style of `--tb`.
"""

from __future__ import annotations

import pytest

_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed or _config is None:
        return
    terminal = _config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None:
        return
    terminal.write_line("")
    terminal.write_sep("_", f"FAILED ({report.when}) {report.nodeid}")
    terminal.write_line(report.longreprtext)
    terminal.flush()
