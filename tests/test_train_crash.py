"""A real `python -m echo.train` SIGKILLed at seeded random moments (during a step, during a checkpoint save,
during the final model save) and restarted with --resume auto until done ends bit for bit where an
uninterrupted run does: model, adaptive base, optimizer, scheduler, log, final model folder. Each restart
clears the half-written temporaries the kill before it left."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_cases import common, final_state, records, subprocess_env, write_manifest

from echo import durable, train

pytestmark = pytest.mark.speech  # python -m echo.train needs whisper's tokenizer

STEPS = 8


def arguments(manifest: Path, out: Path) -> list[str]:
    return common(manifest, out, "--steps", str(STEPS), "--batch-size", "3", "--save-every", "1")


def written_since(path: Path, since_ns: int) -> bool:
    """path exists and was written after since_ns: a file left by a killed run does not count."""
    try:
        return path.stat().st_mtime_ns > since_ns
    except FileNotFoundError:
        return False


def left_before(path: Path, since_ns: int) -> bool:
    """path exists and was last written before since_ns (one stat: a rename racing the check cannot fool
    it)."""
    try:
        return path.stat().st_mtime_ns <= since_ns
    except FileNotFoundError:
        return False


class Run:
    """One `python -m echo.train ... --resume auto` subprocess, watched until the moment it is killed."""

    def __init__(self, manifest: Path, out: Path, attempt: int):
        self.out, self.started_ns = out, time.time_ns()
        self.stderr = out.parent / f"stderr-{attempt}.txt"
        with open(self.stderr, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "echo.train", *arguments(manifest, out),
                                             "--resume", "auto"], env=subprocess_env(), cwd=out.parent,
                                            stdout=subprocess.DEVNULL, stderr=err)

    def wait_until(self, condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"ended before {what}:\n{self.stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.001)

    def logged(self, step: int) -> bool:
        """This run has logged `step` or a later one."""
        log = self.out / "log.jsonl"
        complete = log.read_text().split("\n")[:-1] if written_since(log, self.started_ns) else []
        return bool(complete) and json.loads(complete[-1])["step"] >= step

    def saving(self) -> bool:
        return written_since(durable.temporary(self.out / "checkpoint.pt"), self.started_ns)

    def assert_temporaries_cleared(self) -> None:
        """Once this run has started (rewritten the log it resumes), no temporary left by a killed run
        remains."""
        log = self.out / "log.jsonl"
        self.wait_until(lambda: written_since(log, self.started_ns) or self.process.poll() is not None,
                        "the start")
        for path in (durable.temporary(self.out / "checkpoint.pt"), durable.temporary(self.out / "model")):
            assert not left_before(path, self.started_ns), f"{path.name} left by a killed run is still there"

    def kill(self) -> dict:
        """SIGKILL; what the kill left behind."""
        self.process.kill()
        assert self.process.wait() == -signal.SIGKILL
        checkpoint = self.out / "checkpoint.pt"
        return {"checkpoint_step": final_state(self.out)["step"] if checkpoint.exists() else None,
                "checkpoint_tmp": durable.temporary(checkpoint).exists(),
                "model_tmp": durable.temporary(self.out / "model").exists()}


def kill_during_save(run: Run, step: int) -> dict:
    run.wait_until(lambda: run.logged(step) and run.saving(), f"checkpoint save after step {step}")
    return run.kill()


def kill_during_step(run: Run, step: int, delay: float) -> dict:
    """Killed `delay` s after checkpoint `step` is in place, in the forward or backward of the next step."""
    run.wait_until(lambda: run.logged(step) and run.saving(), f"checkpoint save after step {step}")
    run.wait_until(lambda: not run.saving(), f"checkpoint {step} in place")
    time.sleep(delay)
    return run.kill()


def kill_during_final_save(run: Run) -> dict:
    model = durable.temporary(run.out / "model")
    run.wait_until(lambda: written_since(model, run.started_ns), "final model save")
    return run.kill()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"))


@pytest.fixture
def runs():
    """The runs a test starts; any still going when it ends (a failed wait) is killed."""
    started: list[Run] = []
    yield started
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def test_resume_without_a_checkpoint_is_an_error(manifest, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*--resume auto"):
        train.main(arguments(manifest, tmp_path / "empty") + ["--resume"])


def test_killed_runs_resume_to_an_uninterrupted_runs_result(manifest, tmp_path, runs):
    out = tmp_path / "killed"

    def start(attempt: int) -> Run:
        runs.append(Run(manifest, out, attempt))
        return runs[-1]

    rng = random.Random(0)
    step_1, step_2, step_3 = rng.randint(2, 3), rng.randint(4, 5), rng.randint(6, 7)
    delay_1, delay_3 = rng.uniform(0.0, 0.04), rng.uniform(0.0, 0.04)
    plan = [lambda run: kill_during_save(run, 1),  # before any checkpoint exists: --resume auto starts afresh
            lambda run: kill_during_step(run, step_1, delay_1),
            lambda run: kill_during_save(run, step_2),
            lambda run: kill_during_step(run, step_3, delay_3),
            kill_during_final_save]
    left = []
    for attempt, kill in enumerate(plan):
        run = start(attempt)
        if attempt:  # the first run finds nothing: a killed run's log exists from the second on
            run.assert_temporaries_cleared()
        left.append(kill(run))
    last = start(len(plan))
    last.assert_temporaries_cleared()  # the final model's temporary, left by the last kill
    reference = tmp_path / "reference"  # trained here while the last run starts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1): the same summation order
    try:
        assert train.main(arguments(manifest, reference)) == 0
    finally:
        torch.set_num_threads(threads)
    assert last.process.wait(timeout=300) == 0, last.stderr.read_text()[-3000:]

    # the kills landed where they were meant to: a save half written, or a step begun after a checkpoint
    assert left == [{"checkpoint_step": None, "checkpoint_tmp": True, "model_tmp": False},
                    {"checkpoint_step": step_1, "checkpoint_tmp": False, "model_tmp": False},
                    {"checkpoint_step": step_2 - 1, "checkpoint_tmp": True, "model_tmp": False},
                    {"checkpoint_step": step_3, "checkpoint_tmp": False, "model_tmp": False},
                    {"checkpoint_step": STEPS, "checkpoint_tmp": False, "model_tmp": True}]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", "model", "summary.json"]

    a, b = final_state(reference), final_state(out)
    for key in ("step", "loss", "skipped_steps", "bad_steps_in_a_row", "scheduler"):
        assert a[key] == b[key], key
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():  # base and prev_loss included
        assert torch.equal(value, b["model"][name]), name
    # the resumed run's optimizer was loaded from a checkpoint, where its betas tuple became a list
    groups = [{**group, "betas": tuple(group["betas"])} for group in b["optimizer"]["param_groups"]]
    assert groups == a["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), (name, key)

    def without_time(entries):
        return [{k: v for k, v in e.items() if k not in ("seconds", "train_seconds")} for e in entries]

    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert without_time(records(out)) == without_time(records(reference))
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, out)]
    assert without_time(summaries[:1]) == without_time(summaries[1:])
    for name in ("config.json", "model.safetensors"):
        assert (out / "model" / name).read_bytes() == (reference / "model" / name).read_bytes(), name
