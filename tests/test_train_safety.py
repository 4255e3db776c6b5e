"""python -m echo.train refuses what would run code, destroy or mix runs, write outside OUT or lose data:
code-carrying checkpoints, an --out holding another run, a resume with other settings, planted links,
arguments out of range, empty manifests, an OUT it cannot write; long transcripts keep <|endoftext|>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_cases import common, final_state, records, write_manifest

from echo import durable, run_folder, train, train_data
from echo.audio import encode_text, get_tokenizer


class Payload:
    """Unpickling this creates `marker`: what a checkpoint that runs code would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def save_payload(path: Path, marker: Path, **state) -> None:
    """A torch.save file whose pickle calls Path.touch(marker) when loaded without weights_only."""
    torch.save({**state, "model": Payload(marker)}, path)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"))


@pytest.fixture
def no_data_preparation(monkeypatch):
    """Fails the test if training reaches data preparation: the refusal must come before it."""
    def prepared(*_, **__):
        raise AssertionError("data preparation started before the refusal")

    monkeypatch.setattr(train, "load_data", prepared)


@pytest.mark.speech
def test_a_checkpoint_that_runs_code_is_refused_on_resume(manifest, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    save_payload(out / "checkpoint.pt", marker, step=1)
    with pytest.raises(ValueError, match="checkpoint of python -m echo.train .*never code"):
        train.main(common(manifest, out, "--steps", "2", "--resume"))
    assert not marker.exists()
    torch.load(out / "checkpoint.pt", weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


@pytest.mark.speech
def test_a_checkpoint_loads_weights_only(manifest, tmp_path):
    assert train.main(common(manifest, tmp_path, "--steps", "1", "--batch-size", "2")) == 0
    state = run_folder.read_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 1 and state["world_size"] == 1 and state["args"]["batch_size"] == 2
    assert set(run_folder.CHECKPOINT_KEYS) <= set(state)


@pytest.mark.speech
@pytest.mark.parametrize("name", ["checkpoint.pt", "log.jsonl", "model", "checkpoint.pt.tmp"])
def test_an_out_folder_holding_a_run_is_refused(manifest, tmp_path, no_data_preparation, name):
    (tmp_path / name).write_text("the old run's")
    with pytest.raises(SystemExit,
                       match=f"holds a run \\({name.removesuffix('.tmp')}\\).*--resume.*--overwrite"):
        train.main(common(manifest, tmp_path, "--steps", "1"))
    assert (tmp_path / name).read_text() == "the old run's"


@pytest.mark.speech
def test_overwrite_starts_afresh(manifest, tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n"
                                                for s in range(1, 6)))
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale").write_text("x")
    assert train.main(common(manifest, tmp_path, "--steps", "2", "--batch-size", "2", "--overwrite")) == 0
    assert [r["step"] for r in records(tmp_path)] == [1, 2]
    assert all(r["loss"] != 9.0 for r in records(tmp_path))
    assert final_state(tmp_path)["step"] == 2
    assert not (tmp_path / "model" / "stale").exists()


def test_overwrite_and_resume_together_are_an_error(manifest, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        train.main(common(manifest, tmp_path, "--overwrite", "--resume"))
    assert error.value.code == 2
    assert "--overwrite deletes the run" in capsys.readouterr().err


@pytest.mark.speech
def test_resume_refuses_other_settings_and_allows_a_longer_run(manifest, tmp_path, monkeypatch):
    assert train.main(common(manifest, tmp_path, "--steps", "2", "--batch-size", "3",
                             "--stop-after", "1")) == 0
    with monkeypatch.context() as patch:
        patch.setattr(train, "load_data", lambda *_: pytest.fail("data preparation before the comparison"))
        with pytest.raises(SystemExit) as error:
            train.main(common(manifest, tmp_path, "--steps", "2", "--batch-size", "2", "--lr", "0.02",
                              "--seed", "1", "--seconds", "1", "--resume"))
    message = str(error.value)
    for difference in ("--batch-size: saved 3, given 2", "--lr: saved 0.01, given 0.02",
                       "--seed: saved 0, given 1", "--seconds: saved 0.5, given 1.0",
                       "model config n_audio_ctx: saved 25, given 50"):
        assert difference in message
    assert "--steps:" not in message and "--overwrite" in message
    # the length of the run, how often it saves and logs, may change
    assert train.main(common(manifest, tmp_path, "--steps", "3", "--batch-size", "3", "--save-every", "5",
                             "--log-every", "2", "--resume")) == 0
    assert final_state(tmp_path)["step"] == 3
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]  # step 3 is the last: always logged


def test_every_argument_is_classified_for_resume():
    destinations = {action.dest for action in train.build_parser()._actions if action.dest != "help"}
    assert destinations == set(train.DEFINES_THE_RUN)


def test_a_temporary_link_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    target = out / "checkpoint.pt"
    durable.temporary(target).symlink_to(outside)
    durable.write_file(target, lambda f: torch.save({"step": 1}, f))
    assert outside.read_text() == "precious"
    assert not target.is_symlink() and torch.load(target, weights_only=True) == {"step": 1}
    assert not durable.temporary(target).is_symlink() and not durable.temporary(target).exists()


@pytest.mark.speech
def test_a_training_run_never_writes_through_planted_links(manifest, tmp_path):
    outside_file, outside_folder = tmp_path / "outside.bin", tmp_path / "outside"
    outside_file.write_text("precious")
    outside_folder.mkdir()
    (outside_folder / "weights").write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    durable.temporary(out / "checkpoint.pt").symlink_to(outside_file)  # as if left by a killed save
    durable.temporary(out / "model").symlink_to(outside_folder, target_is_directory=True)
    assert train.main(common(manifest, out, "--steps", "1", "--batch-size", "2", "--resume", "auto")) == 0
    assert outside_file.read_text() == "precious"
    assert [p.name for p in outside_folder.iterdir()] == ["weights"]
    assert (outside_folder / "weights").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", "model", "summary.json"]
    assert final_state(out)["step"] == 1


def test_a_linked_log_is_refused(tmp_path):
    outside = tmp_path / "outside.jsonl"
    (tmp_path / "log.jsonl").symlink_to(outside)
    with pytest.raises(OSError, match="symbolic link"):
        durable.open_append(tmp_path / "log.jsonl")
    assert not outside.exists()


@pytest.mark.parametrize("argument, value, expected", [
    ("--batch-size", "0", "must be at least 1, got 0"), ("--grad-accum", "0", "must be at least 1, got 0"),
    ("--save-every", "0", "must be at least 1, got 0"), ("--steps", "-1", "must be at least 0, got -1"),
    ("--lr", "0", "must be greater than 0, got 0"), ("--max-bad-steps", "0", "must be at least 1, got 0"),
])
def test_arguments_out_of_range_are_refused(manifest, tmp_path, capsys, argument, value, expected):
    with pytest.raises(SystemExit) as error:
        train.main(common(manifest, tmp_path, argument, value))
    assert error.value.code == 2
    assert f"argument {argument}: {expected}" in capsys.readouterr().err
    assert not tmp_path.joinpath("log.jsonl").exists()


@pytest.mark.speech
def test_an_empty_manifest_is_refused(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.tsv lists no utterances"):
        train.main(common(empty, tmp_path / "run", "--steps", "1"))


@pytest.mark.speech
def test_an_out_that_cannot_be_written_is_refused_at_once(manifest, tmp_path, no_data_preparation):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(SystemExit, match="--out .*file/run: cannot write there"):
        train.main(common(manifest, tmp_path / "file" / "run", "--steps", "1"))


@pytest.mark.speech
def test_a_model_path_that_is_a_file_is_refused_at_once(manifest, tmp_path, no_data_preparation):
    (tmp_path / "model").write_text("a file where the model folder goes")
    with pytest.raises(SystemExit, match="model is a file: the trained model is written there as a folder"):
        train.main(common(manifest, tmp_path, "--steps", "1", "--resume", "auto"))
    with pytest.raises(NotADirectoryError, match="model is a file"):
        durable.write_folder(tmp_path / "model", lambda folder: (folder / "weights").write_text("new"))
    assert (tmp_path / "model").read_text() == "a file where the model folder goes"


@pytest.mark.speech
def test_a_final_model_that_cannot_be_written_is_an_error(manifest, tmp_path, monkeypatch):
    def fail(folder, write):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(durable, "write_folder", fail)
    with pytest.raises(SystemExit,
                       match="the trained model could not be written to .*model: .*Permission denied"):
        train.main(common(manifest, tmp_path, "--steps", "1", "--batch-size", "2"))
    assert final_state(tmp_path)["step"] == 1  # the checkpoint holds what was trained


@pytest.mark.speech
def test_a_long_transcript_keeps_its_end_of_text(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "data")
    lines = manifest.read_text().splitlines(keepends=True)
    long_text = " ".join(["seven eight nine"] * 12)
    lines[0] = lines[0].split("\t")[0] + f"\t{long_text}\n"
    manifest.write_text("".join(lines))
    eot, n_text_ctx = get_tokenizer().eot, train.PRESETS["test"]["n_text_ctx"]
    assert len(encode_text(long_text)) > n_text_ctx

    batches, collate = [], train.collate

    def recording_collate(*args):
        mel, labels = collate(*args)
        batches.append(labels)
        return mel, labels

    monkeypatch.setattr(train, "collate", recording_collate)
    expected = f"^1 of 8 transcripts have more than n_text_ctx = {n_text_ctx} label tokens"
    with pytest.warns(UserWarning, match=expected) as caught:
        assert train.main(common(manifest, tmp_path / "run", "--steps", "1", "--batch-size", "8")) == 0
    assert len([w for w in caught if "n_text_ctx" in str(w.message)]) == 1
    labels = batches[0]
    assert labels.shape[1] == n_text_ctx
    for row in labels:  # every row, the cut one included, ends in <|endoftext|> before its padding
        assert row[row != -100][-1] == eot

    row = encode_text(long_text)
    fitted = train_data.fit_label(row, n_text_ctx)
    assert fitted == row[:n_text_ctx - 1] + [eot]
