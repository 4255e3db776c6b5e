"""Shared by tests/ and benches/.

- Tests marked `gpu` run only where CUDA is present (the GPU script, benches/gpu_run.sh, runs them);
  elsewhere they are reported as skipped with that reason.
- Tests marked `speech` need the speech extra: its packages (openai-whisper, jiwer, accelerate) and the
  ffmpeg and espeak-ng programs. Where a piece is missing they are deselected, and the run names each
  one, "not run (missing: ...)". Where all are present (CI), every other test runs with whisper and jiwer
  hidden and the two programs refused, so a test that needs the extra without the marker fails there,
  not first on a machine without it. accelerate stays visible: transformers decides at its own import
  whether accelerate is there, so hiding it later would not be what a machine without it sees.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

SPEECH_PROGRAMS = ("ffmpeg", "espeak-ng")
HIDDEN_FROM_UNMARKED = ("jiwer", "whisper")
# On PYTHONPATH with ECHO_HIDE_MODULES set, hides those modules from every Python process started then.
HIDE_SHIM = Path(__file__).resolve().parent / "tests" / "hide_modules"

_not_run: list[str] = []
_missing: list[str] = []
_refuse_programs = False


def missing_speech() -> list[str]:
    """The pieces of the speech extra this machine lacks (module or program names)."""
    # imported here, not with this file: echo_kernels defines its Triton kernels at import, and
    # tests/conftest.py must set TRITON_INTERPRET before that
    from echo_kernels.optional import OPTIONAL

    speech_modules = sorted(name for name, (_, extra) in OPTIONAL.items() if extra == "speech")
    modules = [name for name in speech_modules if importlib.util.find_spec(name) is None]
    return modules + [name for name in SPEECH_PROGRAMS if shutil.which(name) is None]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device: runs in benches/gpu_run.sh")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    _missing[:] = missing_speech()
    speech = [item for item in items if item.get_closest_marker("speech")]
    if _missing and speech:
        _not_run[:] = [item.nodeid for item in speech]
        items[:] = [item for item in items if not item.get_closest_marker("speech")]
        config.hook.pytest_deselected(items=speech)


def pytest_terminal_summary(terminalreporter):
    if not _not_run:
        return
    terminalreporter.section(f"not run (missing: {', '.join(_missing)})")
    for nodeid in _not_run:
        terminalreporter.write_line(f"not run (missing: {', '.join(_missing)}): {nodeid}")


def _refuse_speech_programs(event, args):
    """Audit hook: while an unmarked test runs, starting ffmpeg or espeak-ng fails that test."""
    if _refuse_programs and event == "subprocess.Popen":
        argv = args[1]
        command = args[0] or (argv if isinstance(argv, (str, bytes, os.PathLike)) else next(iter(argv), ""))
        program = os.path.basename(os.fsdecode(command).split(" ")[0])
        if program in SPEECH_PROGRAMS:
            raise RuntimeError(f"{program} is part of the speech extra: mark the test `speech`")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Runs every test not marked `speech` with the extra hidden, where it is installed (see above)."""
    global _refuse_programs
    if _missing or item.get_closest_marker("speech"):
        yield
        return
    saved = {name: module for name, module in sys.modules.items()
             if name.split(".")[0] in HIDDEN_FROM_UNMARKED}
    sys.modules.update(dict.fromkeys(HIDDEN_FROM_UNMARKED))  # None: "not installed" to import and find_spec
    for name in saved.keys() - set(HIDDEN_FROM_UNMARKED):
        del sys.modules[name]
    environ = {key: os.environ.get(key) for key in ("PYTHONPATH", "ECHO_HIDE_MODULES")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HIDE_SHIM), environ["PYTHONPATH"]]))
    os.environ["ECHO_HIDE_MODULES"] = " ".join(HIDDEN_FROM_UNMARKED)
    _clear_tokenizer_cache()
    _refuse_programs = True
    try:
        yield
    finally:
        _refuse_programs = False
        for name in [name for name in sys.modules if name.split(".")[0] in HIDDEN_FROM_UNMARKED]:
            del sys.modules[name]
        sys.modules.update(saved)
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_tokenizer_cache()


def _clear_tokenizer_cache() -> None:
    """Tokenizers made while whisper was visible (or not) must not outlive that."""
    audio = sys.modules.get("echo.audio")
    if audio is not None:
        audio.get_tokenizer.cache_clear()


sys.addaudithook(_refuse_speech_programs)
