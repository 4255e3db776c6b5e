"""Optional packages (echo_kernels.optional): the package, its tests and benches import without them, the
main job runs without them, and code that needs one says which extra installs it."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import echo
import echo_kernels
from echo import Echo
from echo.audio import get_tokenizer
from echo.config import small_config
from echo_kernels.optional import OPTIONAL, MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]

# The start-up hook that hides packages from a child interpreter (tests/hide_modules/sitecustomize.py).
HIDE_SHIM = ROOT / "tests" / "hide_modules"


def hiding_env(names) -> dict:
    """os.environ, with the packages `names` unimportable in the Python processes started with it."""
    path = os.pathsep.join(filter(None, [str(HIDE_SHIM), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "ECHO_HIDE_MODULES": " ".join(names)}


def run_blocked(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a child interpreter in which every optional package is unimportable."""
    return subprocess.run([sys.executable, "-c", "import sys\n" + code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=hiding_env(sorted(OPTIONAL)))


def package_modules() -> list[str]:
    names = []
    for package in (echo_kernels, echo):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


def test_every_module_imports_without_the_optional_packages():
    modules = package_modules()
    files = sorted(str(p) for folder in ("tests", "benches") for p in (ROOT / folder).glob("*.py"))
    assert "echo.generate" in modules and "echo_kernels.report" in modules and len(files) > 20
    code = (
        "import importlib, importlib.util, runpy, traceback\n"
        f"sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT / 'benches')!r}]\n"
        f"modules, files = {modules!r}, {files!r}\n"
        "failed = []\n"
        "for name in modules:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=1))\n"
        "for path in files:\n"
        "    spec = importlib.util.spec_from_file_location('checked_' + path.replace('/', '_')[:-3], path)\n"
        "    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # as import does\n"
        "    try:\n"
        "        spec.loader.exec_module(module)\n"
        "    except Exception:\n"
        "        failed.append(path + ': ' + traceback.format_exc(limit=1))\n"
        "print('imported', len(modules) + len(files))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    run = run_blocked(code)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"imported {len(modules) + len(files)}" in run.stdout


@pytest.mark.slow
def test_main_job_runs_without_the_optional_packages():
    run = run_blocked("import runpy\nsys.argv = ['python -m echo', '--size', 'test']\n"
                      "runpy.run_module('echo', run_name='__main__', alter_sys=True)")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "reloaded model identical: True" in run.stdout and "greedy tokens:" in run.stdout


def test_training_script_names_the_extra_in_one_line(tmp_path):
    run = run_blocked("import runpy\nsys.argv = ['echo.train', '--synthetic', '4', '--out', sys.argv[1]]\n"
                      "runpy.run_module('echo.train', run_name='__main__', alter_sys=True)",
                      str(tmp_path / "run"))
    assert run.returncode == 1
    assert run.stderr.strip() == ("python -m echo.train: python -m echo.train (audio and tokens) needs "
                                  "openai-whisper, "
                                  "which is not installed: pip install 'echo-kernels[speech]'")
    assert not (tmp_path / "run").exists()  # nothing was synthesised or written before the check


@pytest.fixture
def without(monkeypatch):
    """without(name): the optional package `name` (and its loaded submodules) cannot be imported."""

    def block(name: str) -> None:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)
        get_tokenizer.cache_clear()  # tokenizers made while whisper was there would hide its absence

    return block


def whisper_vocab_model():
    torch.manual_seed(0)
    return Echo(small_config(vocab_size=51865, n_text_ctx=12, bos_token_id=50257, eos_token_id=50257,
                             pad_token_id=50257, decoder_start_token_id=50258)).eval()


@pytest.mark.speech
def test_generate_with_token_ids_needs_no_tokenizer(without):
    model = whisper_vocab_model()
    mel = torch.randn(2, 80, 32)
    # whisper's suppression lists come from its tokenizer
    raw = dict(suppress_tokens=None, suppress_blank=False)
    with_whisper = model.generate(mel, max_new_tokens=4, language="en", **raw)  # whisper's start sequence
    without("whisper")
    tokens = model.generate(mel, max_new_tokens=4, prompt=[50258], **raw)
    assert tokens.shape[0] == 2 and torch.all(tokens[:, 0] == 50258)
    assert torch.equal(model.generate(mel, max_new_tokens=4, prompt=with_whisper[0, :4], **raw), with_whisper)
    with pytest.raises(MissingExtra, match=r"whisper's start tokens .* pip install 'echo-kernels\[speech\]'"):
        model.generate(mel, max_new_tokens=4, **raw)
    with pytest.raises(MissingExtra, match=r"echo-kernels\[speech\]"):
        model.generate(mel, max_new_tokens=4, prompt=[50258])  # whisper's suppression lists
    with pytest.raises(MissingExtra, match=r"echo-kernels\[speech\]"):
        model.generate(mel, max_new_tokens=4, prompt=[50258], temperature=(0.0, 0.5), **raw)  # judging text


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_require_names_the_extra(without, name):
    without(name)
    distribution, extra = OPTIONAL[name]
    with pytest.raises(MissingExtra) as error:
        require(name, "doing X")
    assert str(error.value) == (f"doing X needs {distribution}, which is not installed: "
                                f"pip install 'echo-kernels[{extra}]'")


@pytest.mark.speech
def test_require_shows_a_broken_dependency_as_it_is(without):
    import tiktoken  # noqa: F401  (loaded so that whisper's import reaches it)

    for name in [m for m in sys.modules if m.startswith("whisper")]:
        without(name)
        del sys.modules[name]
    without("tiktoken")
    with pytest.raises(ImportError) as error:
        require("whisper", "doing X")
    assert not isinstance(error.value, MissingExtra) and error.value.name.startswith("tiktoken")


SPEECH_MODULES = sorted(name for name, (_, extra) in OPTIONAL.items() if extra == "speech")


def test_tests_that_need_the_speech_extra_are_named_not_run_without_it():
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_audio.py", "tests/test_synthetic.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=hiding_env(SPEECH_MODULES))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    missing = f"not run (missing: {', '.join(SPEECH_MODULES)})"
    prefix = missing + ": "
    named = {line.removeprefix(prefix) for line in run.stdout.splitlines() if line.startswith(prefix)}
    assert named == {"tests/test_audio.py::test_log_mel_of_arctic_clips_equals_whisper[arctic_a0007.wav]",
                     "tests/test_audio.py::test_log_mel_of_arctic_clips_equals_whisper[arctic_a0009.wav]",
                     "tests/test_audio.py::test_pad_or_trim_is_whispers",
                     "tests/test_audio.py::test_tokenizer_is_whispers_multilingual_vocabulary",
                     "tests/test_audio.py::test_missing_and_unreadable_files_are_clear_errors",
                     "tests/test_synthetic.py::test_espeak_speech_is_read_at_16khz",
                     "tests/test_synthetic.py::test_train_synthetic_end_to_end"}
    # the rest are collected
    assert "tests/test_synthetic.py::test_manifest_errors" in run.stdout.splitlines()
    assert "2/9 tests collected (7 deselected)" in run.stdout


UNMARKED = '''
import subprocess
import pytest

def test_unmarked_whisper():
    from echo.audio import get_tokenizer
    get_tokenizer()

def test_unmarked_espeak():
    subprocess.run(["espeak-ng", "--version"], capture_output=True)

def test_unmarked_child_process():
    import sys
    subprocess.run([sys.executable, "-c", "import jiwer"], check=True)

def test_unmarked_without_the_extra():
    assert subprocess.run(["true"]).returncode == 0

@pytest.mark.speech
def test_marked():
    import jiwer, whisper
    from echo.audio import get_tokenizer
    get_tokenizer()
    assert subprocess.run(["espeak-ng", "--version"], capture_output=True).returncode == 0
'''


@pytest.mark.speech
def test_a_test_that_needs_the_speech_extra_without_the_marker_fails(tmp_path):
    """Where the extra is installed (CI), the shared conftest.py runs every test not marked `speech` with
    whisper and jiwer hidden, in its process and in those it starts, and ffmpeg and espeak-ng refused."""
    (tmp_path / "test_marks.py").write_text(UNMARKED)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "-rf", "test_marks.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": path})
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-4000:]
    failed = {line.split()[1].split(" ")[0] for line in run.stdout.splitlines() if line.startswith("FAILED ")}
    assert failed == {"test_marks.py::test_unmarked_whisper", "test_marks.py::test_unmarked_espeak",
                      "test_marks.py::test_unmarked_child_process"}, run.stdout[-4000:]
    assert "2 passed" in run.stdout
    assert "espeak-ng is part of the speech extra: mark the test `speech`" in run.stdout
    assert "needs openai-whisper, which is not installed" in run.stdout
