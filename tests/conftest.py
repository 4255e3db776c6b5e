"""Test setup: Triton kernels run through the interpreter where there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at import time
of the test session, ahead of echo_kernels' own imports in the test modules.
"""

import os
import threading

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))


# The ahead-of-time compile of every Triton kernel (echo_kernels.aot) takes minutes on two cores.
# It runs once per session, in a thread started as soon as a collected test asks for it, so that it
# overlaps the interpreter tests, which are mostly single-threaded Python.
_aot: dict = {}
_aot_thread: threading.Thread | None = None


def _compile_all() -> None:
    from echo_kernels import aot

    try:
        _aot["reports"] = aot.reports()
    except Exception as error:  # re-raised in the tests that use the reports
        _aot["error"] = error


def pytest_collection_finish(session):
    global _aot_thread
    if any("aot_reports" in getattr(item, "fixturenames", ()) for item in session.items):
        _aot_thread = threading.Thread(target=_compile_all, daemon=True)
        _aot_thread.start()


@pytest.fixture(scope="session")
def aot_reports():
    """echo_kernels.aot.CompileReport for every kernel launch and target."""
    if _aot_thread is None:
        _compile_all()
    else:
        _aot_thread.join()
    if "error" in _aot:
        raise _aot["error"]
    return _aot["reports"]
