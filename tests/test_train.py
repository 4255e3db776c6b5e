"""The training recipe: exact resume, gradient accumulation, 2-process DDP / FSDP2 (gloo, CPU) against
one process (a NaN on one process skipping the step on both), and Hugging Face's Seq2SeqTrainer on Echo."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_cases import (ROOT, TEXTS, common, final_state, losses, poisoned, records, subprocess_env,
                         write_manifest)

from echo import AdaptiveBaseCallback, Echo  # noqa: E402
from echo import train, train_data  # noqa: E402
from echo.audio import encode_text  # noqa: E402

pytestmark = pytest.mark.speech  # python -m echo.train needs whisper's tokenizer


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = write_manifest(tmp_path_factory.mktemp("data"))
    assert len({len(encode_text(t)) for t in TEXTS}) == 1  # equal lengths: per-process means average exactly
    return path


def test_resume_continues_exactly(manifest, tmp_path):
    assert train.main(common(manifest, tmp_path / "a", "--steps", "4", "--batch-size", "3")) == 0
    assert train.main(common(manifest, tmp_path / "b", "--steps", "4", "--batch-size", "3",
                             "--stop-after", "2")) == 0
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
def test_torchrun_two_processes_match_one(manifest, tmp_path, monkeypatch, fsdp):
    """Step 2 has NaN logits on the second process only (all of them in the single one): both skip it."""
    single = tmp_path / "single"
    with monkeypatch.context() as patch:
        patch.setattr(Echo, "forward", poisoned(Echo.forward, {1}))
        train.main(common(manifest, single, "--steps", "3", "--batch-size", "4"))
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "tests" / "train_poisoned.py"), "1", "1",
           *common(manifest, multi, "--steps", "3", "--batch-size", "2", *(["--fsdp"] if fsdp else []))]
    run = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["skipped_steps"] == 1
    assert [r.get("skipped") for r in records(multi)] == [None, "non-finite", None]
    assert [r.get("skipped") for r in records(single)] == [None, "non-finite", None]
    np.testing.assert_allclose(losses(multi)[::2], losses(single)[::2], rtol=1e-5)
    a, b = final_state(single)["model"], final_state(multi)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-3)


def test_seq2seq_trainer_trains_echo(manifest, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    items = train_data.load_data(train.parse_args(common(manifest, tmp_path)), 0, 1)
    mels, labels = train_data.featurize(items, 0.5, progress=False)
    dataset = [{"input_features": mels[i], "labels": labels[i]} for i in range(len(items))]

    def collator(batch):
        mel, lab = train_data.collate(torch.stack([b["input_features"] for b in batch]),
                                      [b["labels"] for b in batch], list(range(len(batch))), 24)
        return {"input_features": mel, "labels": lab}

    torch.manual_seed(0)
    model = Echo(train.build_config("test", 0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4,
                                    per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                                    report_to=[], save_strategy="no", use_cpu=True,
                                    remove_unused_columns=False, disable_tqdm=True)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                             callbacks=[AdaptiveBaseCallback()])
    result = trainer.train()
    assert result.global_step == 4 and np.isfinite(result.training_loss)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and logged[-1] < logged[0]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.base.item() != 10000.0  # the adaptive base follows the Trainer's steps
