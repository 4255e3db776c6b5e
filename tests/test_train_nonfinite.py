"""A step whose loss (or only its gradient) is not finite never reaches the weights, the optimizer, the
scheduler, the adaptive base or a checkpoint: it is skipped with a warning, and --max-bad-steps of them in a
row stop training with an error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_cases import common, final_state, poisoned, records, write_manifest

from echo import Echo, train

pytestmark = pytest.mark.speech  # python -m echo.train needs whisper's tokenizer


def keep_every_checkpoint(monkeypatch) -> dict[int, dict]:
    """{step: the checkpoint written at it}, filled as training saves."""
    saved, save = {}, train.save_checkpoint

    def save_and_keep(path, model, optimizer, scheduler, step, extra, rank):
        save(path, model, optimizer, scheduler, step, extra, rank)
        saved[step] = torch.load(path, weights_only=True)

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    return saved


def assert_same_state(a: dict, b: dict) -> None:
    for name, value in a["model"].items():  # base and prev_loss included
        assert torch.equal(value, b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert a["scheduler"] == b["scheduler"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"))


def arguments(manifest: Path, out: Path, *extra: str) -> list[str]:
    return common(manifest, out, "--steps", "6", "--batch-size", "3", "--save-every", "1", *extra)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_steps_are_skipped(manifest, tmp_path, monkeypatch, capsys, kind):
    saved = keep_every_checkpoint(monkeypatch)
    monkeypatch.setattr(Echo, "forward", poisoned(Echo.forward, {2, 3}, kind))
    assert train.main(arguments(manifest, tmp_path)) == 0
    assert sorted(saved) == [1, 2, 3, 4, 5, 6]
    assert_same_state(saved[2], saved[3])  # steps 3 and 4 changed nothing but the step count
    assert_same_state(saved[2], saved[4])
    assert [saved[s]["bad_steps_in_a_row"] for s in range(1, 7)] == [0, 0, 1, 2, 0, 0]
    assert saved[6]["skipped_steps"] == 2
    for name in ("decoder.token_embedding.weight", "base", "prev_loss"):  # went on from step 2's state
        assert not torch.equal(saved[5]["model"][name], saved[4]["model"][name]), name
    assert saved[5]["scheduler"]["last_epoch"] == saved[4]["scheduler"]["last_epoch"] + 1
    assert all(torch.isfinite(value).all() for value in saved[6]["model"].values())

    log = records(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped") for r in log] == [None, None, "non-finite", "non-finite", None, None]
    assert [r["loss"] == "nan" for r in log[2:4]] == [kind == "loss"] * 2
    assert all(math.isfinite(r["loss"]) for r in log[:2] + log[4:])
    assert all(r["grad_norm"] in ("nan", "inf") for r in log[2:4])
    err = capsys.readouterr().err
    assert "step 3: loss" in err and "step 4: loss" in err and "2 in a row" in err


def test_bad_steps_in_a_row_stop_training(manifest, tmp_path, monkeypatch):
    saved = keep_every_checkpoint(monkeypatch)
    monkeypatch.setattr(Echo, "forward", poisoned(Echo.forward, {1, 3, 4}))  # step 3 resets the count
    with pytest.raises(RuntimeError, match="step 5: 2 steps in a row had a non-finite loss or gradient norm"):
        train.main(arguments(manifest, tmp_path, "--max-bad-steps", "2"))
    assert sorted(saved) == [1, 2, 3, 4]
    assert final_state(tmp_path)["step"] == 4
    assert_same_state(saved[3], final_state(tmp_path))
    assert not (tmp_path / "model").exists()
    skipped = [r.get("skipped") for r in records(tmp_path)]
    assert skipped == [None, "non-finite", None, "non-finite", "non-finite"]
