"""The training recipe: exact resume, gradient accumulation, 2-process DDP / FSDP2 (gloo, CPU) against
one process, and Hugging Face's Seq2SeqTrainer on Echo."""

import json
import os
import socket
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch


from echo import Echo  # noqa: E402
from echo import train  # noqa: E402
from echo.audio import encode_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["one two three", "four five six", "seven eight nine", "three two one",
         "six five four", "nine eight seven", "two four six", "one three five"]


def write_manifest(folder: Path, n: int = 8) -> Path:
    """n half-second noise-and-tone WAVs at 16 kHz with texts of equal token length."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        t = np.arange(8000) / 16000
        x = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(8000)
        with wave.open(str(folder / f"{i}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((x * 32767).astype(np.int16).tobytes())
        lines.append(f"{i}.wav\t{TEXTS[i % len(TEXTS)]}\n")
    (folder / "train.tsv").write_text("".join(lines))
    return folder / "train.tsv"


def common(manifest, out, *extra):
    return ["--manifest", str(manifest), "--out", str(out), "--preset", "test", "--seconds", "0.5", "--lr", "1e-2",
            "--warmup", "2", "--log-every", "1", "--no-progress", "--workers", "2", *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def final_state(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = write_manifest(tmp_path_factory.mktemp("data"))
    assert len({len(encode_text(t)) for t in TEXTS}) == 1  # equal lengths: per-process means average exactly
    return path


def test_resume_continues_exactly(manifest, tmp_path):
    assert train.main(common(manifest, tmp_path / "a", "--steps", "4", "--batch-size", "3")) == 0
    assert train.main(common(manifest, tmp_path / "b", "--steps", "4", "--batch-size", "3", "--stop-after", "2")) == 0
    assert final_state(tmp_path / "b")["step"] == 2
    assert train.main(common(manifest, tmp_path / "b", "--steps", "4", "--batch-size", "3", "--resume")) == 0
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert a["model"]["base"] != 10000.0  # the adaptive base moved and was carried across the resume
    assert torch.equal(a["model"]["prev_loss"], b["model"]["prev_loss"])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    reloaded = Echo.from_pretrained(tmp_path / "b" / "model")
    assert torch.equal(reloaded.base, a["model"]["base"])


def test_gradient_accumulation_matches_a_bigger_batch(manifest, tmp_path):
    train.main(common(manifest, tmp_path / "big", "--steps", "3", "--batch-size", "4"))
    train.main(common(manifest, tmp_path / "acc", "--steps", "3", "--batch-size", "2", "--grad-accum", "2"))
    np.testing.assert_allclose(losses(tmp_path / "acc"), losses(tmp_path / "big"), rtol=1e-5)
    a, b = final_state(tmp_path / "big")["model"], final_state(tmp_path / "acc")["model"]
    for name in a:  # Adam divides by sqrt(v): summation-order rounding of near-zero gradients shows at ~lr/10
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_processes_match_one(manifest, tmp_path, fsdp):
    single = tmp_path / "single"
    train.main(common(manifest, single, "--steps", "3", "--batch-size", "4"))
    multi = tmp_path / "multi"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "echo.train",
           *common(manifest, multi, "--steps", "3", "--batch-size", "2", *(["--fsdp"] if fsdp else []))]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)
    a, b = final_state(single)["model"], final_state(multi)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-3)


def test_seq2seq_trainer_trains_echo(manifest, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    items = train.load_data(train.parse_args(common(manifest, tmp_path)), 0, 1)
    mels, labels = train.featurize(items, 0.5, progress=False)
    dataset = [{"input_features": mels[i], "labels": labels[i]} for i in range(len(items))]

    def collator(batch):
        mel, lab = train.collate(torch.stack([b["input_features"] for b in batch]), [b["labels"] for b in batch],
                                 list(range(len(batch))), 24)
        return {"input_features": mel, "labels": lab}

    torch.manual_seed(0)
    model = Echo(train.build_config("test", 0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4,
                                    learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                                    use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    result = trainer.train()
    assert result.global_step == 4 and np.isfinite(result.training_loss)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and logged[-1] < logged[0]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.base.item() != 10000.0  # the adaptive base follows the Trainer's steps
