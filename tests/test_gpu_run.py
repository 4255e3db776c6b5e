"""benches/gpu_run.sh: its plan fits the time budgets, its arguments are checked, and its rehearsal on
this CPU runs every step and leaves the results the GPU run would bring back."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu_run.sh"
STEPS = ["build", "correctness", "headline", "benches", "report"]


def gpu_run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    # the script runs `python3`: this test's interpreter, whether or not its environment is activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PATH=path))


def plan(*args: str) -> tuple[dict[str, int], int]:
    """The steps and limits `--plan` prints, and its total line."""
    run = gpu_run("--plan", *args)
    assert run.returncode == 0, run.stderr
    *lines, total = run.stdout.splitlines()
    steps = {name: int(seconds) for name, seconds in (line.split() for line in lines)}
    assert total.split()[0] == "total"
    return steps, int(total.split()[1])


def test_the_step_limits_fit_eight_minutes_and_four_quick():
    full, full_total = plan()
    quick, quick_total = plan("--quick")
    assert list(full) == STEPS and list(quick) == ["build", "correctness", "headline", "report"]
    assert full_total == sum(full.values()) <= 480
    assert quick_total == sum(quick.values()) <= 240
    assert all(seconds > 5 for seconds in (*full.values(), *quick.values()))  # more than the SIGTERM grace


@pytest.mark.parametrize("args, message", [
    ((), "RESULTS_DIR is required"),
    (("--quick",), "RESULTS_DIR is required"),
    (("--fast", "out"), "unknown option --fast"),
    (("a", "b"), "usage: bash benches/gpu_run.sh"),
    (("--quick", "--rehearse", "out"), "usage: bash benches/gpu_run.sh"),
])
def test_arguments_are_checked(args, message):
    run = gpu_run(*args)
    assert run.returncode == 2 and message in run.stderr and run.stdout == ""


def test_a_results_dir_holding_files_is_refused(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    run = gpu_run("--rehearse", str(tmp_path))
    assert run.returncode == 2 and "RESULTS_DIR must be absent or empty" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_brings_back_the_results(tmp_path):
    out = tmp_path / "results"
    run = gpu_run("--rehearse", str(out), timeout=400)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    limits, _ = plan()
    files = sorted(p.name for p in out.iterdir())
    assert all((out / name).is_file() for name in files) and len(files) <= 8
    assert files == sorted([f"{name}.log" for name in STEPS] + ["results.json", "results.md", "speedups.png"])
    for name in STEPS:
        last = (out / f"{name}.log").read_text().splitlines()[-1]
        assert re.fullmatch(rf"== {name}: exit 0 after \d+ s \(limit {limits[name]} s\)", last), last
    results = json.loads((out / "results.json").read_text())
    cases = results["cases"]
    groups = {case["group"] for case in cases}
    assert any(g.startswith("training step") for g in groups) and any(g.startswith("rotary") for g in groups)
    assert any(g.startswith("attention encoder_global fwd+bwd") for g in groups)
    # the headline step ran first, and its cases lead the file the next step appended to: of the attention
    # groups at the encoder's shape, the fused kernel's, at two stages too, and the plain kernel's
    # (FlexAttention's only on a GPU)
    def headline_case(case):
        if case["group"].startswith("attention encoder_global"):
            return case["case"] in ("kernel", "kernel_2_stages", "plain")
        return case["group"].startswith(("training step", "orthogonal_product cpu h64-N32-B88 fwd+bwd"))
    headline = [c for c in cases if headline_case(c)]
    assert {c["group"].split()[0] for c in headline} == {"training", "attention", "orthogonal_product"}
    assert cases[:len(headline)] == headline and len(headline) < len(cases)
    assert any(c["group"].startswith("attention encoder_global") and c["case"] == "reference"
               for c in cases[len(headline):])
    markdown = (out / "results.md").read_text()
    table, _, breakdown = markdown.partition("## Where the time goes")
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| ")]
    assert sorted((group.removeprefix("| "), name.strip("*")) for group, name in rows[1:]) == \
        sorted((case["group"], case["case"]) for case in cases)  # a row per case, under the header row
    # where the time of the fused and the plain kernel goes, at the encoder's shape, forward and backward
    broken_down = sorted((c["group"], c["case"]) for c in cases if c.get("breakdown"))
    assert broken_down == sorted((f"attention breakdown encoder_global {passes} float32", way)
                                 for passes in ("fwd", "fwd+bwd") for way in ("kernel", "plain"))
    assert sorted(tuple(line.split(" | ")[:2]) for line in breakdown.splitlines()
                  if line.startswith("| attention")) \
        == sorted((f"| {group}", way) for group, way in broken_down)
    steps, _, not_run = markdown.split("## Steps (rehearse)")[1].partition("## Tests not run")
    assert [line.split(":")[0] for line in steps.splitlines() if line.startswith("- ")] \
        == [f"- {n}" for n in STEPS]
    # the speech extra is hidden: the bench cases that need it (openai-whisper) are named, not run
    missing = [line for line in not_run.splitlines() if line.startswith("- ")]
    assert missing and all(line.startswith("- not run (missing") and "whisper" in line
                           for line in missing), missing
    build = (out / "build.log").read_text()
    assert "ECHO_BACKEND=auto, TRITON_INTERPRET=1" in build
    assert "hidden from Python: accelerate jiwer whisper" in build


def _correctness_files(script: str) -> list[str]:
    return re.search(r"^CORRECTNESS_FILES=\(([^)]*)\)", script, re.MULTILINE).group(1).split()


def _collected(*args: str, shard: str = "") -> set[str]:
    env = dict(os.environ, ECHO_TEST_SHARD=shard)
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode in (0, 5), run.stdout[-4000:] + run.stderr[-4000:]  # 5: none collected
    return {line for line in run.stdout.splitlines() if line.startswith("tests/") and "::" in line}


def test_every_test_marked_gpu_is_in_the_correctness_step():
    script = SCRIPT.read_text()
    files = _correctness_files(script)
    assert "tests/test_aot.py" not in files and all((ROOT / f).is_file() for f in files)
    marked = {test.split("::")[0] for test in _collected("-m", "gpu", "tests")}
    assert marked and marked <= set(files), marked - set(files)


def test_a_failure_is_in_the_log_before_the_session_ends(tmp_path):
    """benches/stream_failures.py writes a failure's traceback as the test fails: a step killed at its
    limit (here: a test that ends the process, so pytest never prints its summary) still says why."""
    (tmp_path / "test_killed.py").write_text(
        "import os\n\n"
        "def test_fails():\n    error = 0.25\n    assert error < 1e-5, 'forward'\n\n"
        "def test_killed():\n    os._exit(3)\n")
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT / "benches"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "stream_failures", "--tb=short", "test_killed.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "FAILED (call) test_killed.py::test_fails" in run.stdout
    assert "AssertionError: forward" in run.stdout and "assert 0.25 < 1e-05" in run.stdout
    assert "short test summary" not in run.stdout  # the summary never came: the lines above are the plugin's


def test_the_steps_stream_their_failures():
    script = SCRIPT.read_text()
    assert re.search(r"^pytest_args=\(.*-p stream_failures --tb=short\)", script, re.MULTILINE)
    assert (ROOT / "benches" / "stream_failures.py").is_file()


def test_the_correctness_step_leaves_out_every_test_of_the_ahead_of_time_compile():
    """Its tests run kernels on the GPU; the tests that read echo_kernels.aot's compile (marked `aot` by
    tests/conftest.py) stay in CI, whatever their names."""
    script = SCRIPT.read_text()
    files = _correctness_files(script)
    filters = [re.search(rf'^{name}="([^"]*)"', script, re.MULTILINE).group(1)
               for name in ("CORRECTNESS_FULL", "CORRECTNESS_QUICK")]
    reading_the_compile = _collected(*files, "-m", "aot")
    assert "tests/test_attention.py::test_fused_loops_against_the_plain_flash_kernel" in reading_the_compile
    for selection in filters:
        run = _collected(*files, "-k", selection)
        assert run and not run & reading_the_compile, (selection, run & reading_the_compile)


def test_the_correctness_step_shares_its_tests_among_sessions_side_by_side():
    """Each of n sessions under ECHO_TEST_SHARD="i/n" runs every n-th test -k leaves: together, each
    selected test once."""
    script = SCRIPT.read_text()
    assert re.search(r"^step correctness bash -c 'sharded \"\$@\"' sharded python3 -m pytest", script,
                     re.MULTILINE)
    files = _correctness_files(script)[:2]
    whole = _collected(*files, "-k", "not aot")
    shares = [_collected(*files, "-k", "not aot", shard=f"{i}/3") for i in range(3)]
    assert len(whole) > 30 and all(len(share) >= len(whole) // 3 for share in shares)
    assert set().union(*shares) == whole and sum(map(len, shares)) == len(whole)


@pytest.mark.parametrize("shard", ["3/3", "1", "a/2", "-1/2"])
def test_a_shard_out_of_range_is_refused(shard):
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_checks.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, ECHO_TEST_SHARD=shard))
    assert run.returncode == 4 and "ECHO_TEST_SHARD must be 'i/n'" in run.stderr, run.stdout + run.stderr


def test_a_failing_shard_fails_the_step():
    """benches/gpu_run.sh's `sharded` returns the tests' status, not that of the filter tagging their
    lines."""
    function = re.search(r"^sharded\(\) \{.*?^\}$", SCRIPT.read_text(), re.MULTILINE | re.DOTALL).group(0)
    script = function + """
shards=3
sharded bash -c 'echo "ran $ECHO_TEST_SHARD"; [ "$ECHO_TEST_SHARD" != 1/3 ]'; echo "one failed: $?"
sharded bash -c 'echo "ran $ECHO_TEST_SHARD"'; echo "none failed: $?"
"""
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    lines = run.stdout.splitlines()
    assert lines[3] == "one failed: 1" and lines[7] == "none failed: 0", run.stdout + run.stderr
    assert sorted(lines[:3]) == sorted(lines[4:7]) == [f"[shard {i}/3] ran {i}/3" for i in range(3)]
