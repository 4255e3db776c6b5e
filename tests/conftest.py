"""Test setup: Triton kernels run through the interpreter where there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at import time
of the test session, ahead of echo_kernels' own imports in the test modules.

The property tests (hypothesis) count the cases they generate (tests/property_counts.py); the counts
are printed at the end of the run, and a module that ran whole but generated fewer cases than its
CASE_FLOOR fails the run.
"""

import os
import threading
from collections import defaultdict

import pytest
import torch

from property_counts import COUNTS

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def masks_held_to_bool():
    """Triton 3.9's interpreter refuses a load or store whose mask it holds as anything but bool, and it
    holds a vector mask `&` a scalar condition as int32; the interpreters before it accept that mask. Here
    every interpreted load and store is held to 3.9's rule, so that such a mask fails under any of them."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import inspect

    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    def held(method):
        signature = inspect.signature(method)

        def checked(*args, **kwargs):
            mask = signature.bind(*args, **kwargs).arguments["mask"]
            if mask is not None and mask.data.dtype != np.bool_:
                raise TypeError(f"{method.__name__}: a mask held as {mask.data.dtype}, which Triton 3.9's "
                                "interpreter refuses (build it without `&` of a vector and a scalar)")
            return method(*args, **kwargs)

        return checked

    names = ("create_masked_load", "create_masked_store")
    originals = {name: getattr(InterpreterBuilder, name) for name in names}
    for name, method in originals.items():
        setattr(InterpreterBuilder, name, held(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(InterpreterBuilder, name, method)


# The ahead-of-time compile of every Triton kernel (echo_kernels.aot) takes minutes on two cores.
# It runs once per session, in a child process (echo_kernels.aot.reports) that a thread starts as
# soon as a collected test asks for it, so that it overlaps the interpreter tests, which are mostly
# single-threaded Python.
_aot: dict = {}
_aot_thread: threading.Thread | None = None


def _compile_all() -> None:
    from echo_kernels import aot

    try:
        _aot["reports"] = aot.reports()
    except Exception as error:  # re-raised in the tests that use the reports
        _aot["error"] = error


def _shard() -> tuple[int, int] | None:
    """ECHO_TEST_SHARD="i/n": this session runs the i-th of n shares of the selected tests."""
    value = os.environ.get("ECHO_TEST_SHARD")
    if not value:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise pytest.UsageError(f"ECHO_TEST_SHARD must be 'i/n' with 0 <= i < n, got {value!r}")
    return int(index), int(count)


@pytest.hookimpl(hookwrapper=True)  # around -k and -m's deselection
def pytest_collection_modifyitems(config, items):
    """Before -k and -m deselect: every test that reads the ahead-of-time compile carries the mark
    `aot`, so that `-k "not aot"` leaves the compile out (benches/gpu_run.sh: on a GPU machine the tests
    run the kernels, and the compile of both targets is CI's).

    After them, the tests that read the compile run after the other tests, so that the compile overlaps
    those instead of holding the session up, and before the benches, which time on a quiet machine.

    Then, under ECHO_TEST_SHARD="i/n": every n-th test left, from the i-th, so that n sessions side
    by side run each selected test once (benches/gpu_run.sh, where Triton's compiles, one core each, are
    most of a test's time). Dealt in turn, so that a module's many cases of one kernel are spread."""
    for item in items:
        if "aot_reports" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.aot)
    yield
    items.sort(key=lambda item: (item.nodeid.startswith("benches/"),
                                 item.get_closest_marker("aot") is not None))
    shard = _shard()
    if shard is None:
        return
    index, count = shard
    dropped = [item for position, item in enumerate(items) if position % count != index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = items[index::count]


def pytest_collection_finish(session):
    global _aot_thread
    _note_floors(session.items)
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


# --------------------------------------------------------------------------------------------------
# Property tests: cases generated per test, and the floor of each module that declares CASE_FLOOR
# --------------------------------------------------------------------------------------------------

_floors: dict[str, tuple[int, set[str]]] = {}  # module path -> (CASE_FLOOR, names of all its tests)
_passed: dict[str, set[str]] = defaultdict(set)  # module path -> tests with a passing run
_partial: set[str] = set()  # modules with a test deselected, skipped or failed
_short_modules: list[str] = []


def _module_and_test(nodeid: str) -> tuple[str, str]:
    """tests/test_x.py::test_y[param] -> (tests/test_x.py, test_y)."""
    return nodeid.split("::")[0], nodeid.split("::")[-1].split("[")[0]


def _note_floors(items) -> None:
    """The floor of every module of items that declares CASE_FLOOR, and the tests it defines (all of
    them, whatever -k or node ids select)."""
    for item in items:
        module = getattr(item, "module", None)
        if hasattr(module, "CASE_FLOOR"):
            tests = {name for name, obj in vars(module).items() if name.startswith("test") and callable(obj)}
            _floors[_module_and_test(item.nodeid)[0]] = (module.CASE_FLOOR, tests)


def pytest_deselected(items):
    _partial.update(_module_and_test(item.nodeid)[0] for item in items)


def pytest_runtest_logreport(report):
    module, test = _module_and_test(report.nodeid)
    if report.when == "call" and report.passed:
        _passed[module].add(test)
    elif report.failed or report.skipped:
        _partial.add(module)


def _module_counts() -> dict[str, tuple[int, int, bool]]:
    """module -> (cases generated, floor, whether every test of the module ran and passed)."""
    return {module: (sum(n for node, n in COUNTS.items() if node.startswith(module + "::")), floor,
                     module not in _partial and tests <= _passed[module])
            for module, (floor, tests) in _floors.items()}


def pytest_sessionfinish(session, exitstatus):
    for module, (cases, floor, whole) in _module_counts().items():
        if whole and cases < floor:
            _short_modules.append(module)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.section("generated cases")
    for node, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{n:6d}  {node}")
    for module, (cases, floor, whole) in sorted(_module_counts().items()):
        verdict = "BELOW THE FLOOR" if module in _short_modules else "ok" if whole else "unchecked: part ran"
        terminalreporter.write_line(f"{cases:6d}  {module} in all, floor {floor}: {verdict}")
    for module in _short_modules:
        terminalreporter.write_line(f"FAILED: {module} generated fewer cases than its CASE_FLOOR", red=True)
