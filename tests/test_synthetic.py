"""The synthetic-speech grammar: disjoint held-out split, espeak-ng synthesis read back at 16 kHz, manifests,
and `python -m echo.train --synthetic` end to end on a few utterances."""

import json

import pytest

from echo import synthetic


def test_held_out_texts_never_appear_in_training():
    train = set(synthetic.training_texts(5000, seed=0))
    held = synthetic.held_out_texts(100, seed=1)
    assert len(held) == len(set(held)) == 100
    assert not train & set(held)
    assert all(synthetic.is_held_out(t) for t in held) and not any(synthetic.is_held_out(t) for t in train)
    assert any(t.split()[0] in ("turn", "open", "close", "check", "start", "stop") for t in train)
    assert all(set(t.split()) <= set(synthetic.DIGITS) for t in held)


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tsv"):
        synthetic.read_manifest(tmp_path / "nothere.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("a.wav no tab here\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        synthetic.read_manifest(bad)


@pytest.mark.speech
def test_espeak_speech_is_read_at_16khz(tmp_path):
    from echo.audio import load_audio

    manifest = synthetic.build_dataset(["four two", "turn on the light"], tmp_path, seed=0, workers=2)
    items = synthetic.read_manifest(manifest)
    assert [t for _, t in items] == ["four two", "turn on the light"]
    wave = load_audio(items[0][0])
    assert 0.3 < wave.shape[0] / 16000 < 3.0 and abs(wave).max() > 0.05


@pytest.mark.speech
def test_train_synthetic_end_to_end(tmp_path):
    import jiwer

    from echo import train

    out = tmp_path / "run"
    assert train.main(["--synthetic", "6", "--out", str(out), "--preset", "test", "--seconds", "1",
                       "--steps", "2", "--batch-size", "3", "--no-progress", "--eval-synthetic", "2",
                       "--workers", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_utterances"] == 6
    assert summary["eval"]["n"] == 2 and summary["eval"]["texts_seen_in_training"] == 0
    # an untrained model transcribes nothing useful: check that the score is jiwer's WER of what it did say
    examples = summary["eval"]["examples"]
    assert [e["ref"] for e in examples] == synthetic.held_out_texts(2, seed=1000, kind="digits")
    assert summary["eval"]["wer"] == jiwer.wer([e["ref"] for e in examples], [e["hyp"] for e in examples])
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # --log-every 10: the last step
