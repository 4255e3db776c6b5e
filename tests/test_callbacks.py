"""AdaptiveBaseCallback and Echo under transformers' Seq2SeqTrainer: gradient accumulation gives the
gradients of one big batch, the base moves once per optimizer step from that step's loss, and two
processes (torchrun, gloo) end with the same base.

Run as a script under torchrun, this file is the worker of the two-process test.
"""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

from echo import AdaptiveBaseCallback, Echo
from echo.config import small_config
from echo.model import _warn_base_moves_in_forward

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 32


def tiny_echo() -> Echo:
    torch.manual_seed(0)
    return Echo(small_config(checkpointing=False))


def examples(config, n: int) -> list[dict]:
    """n {mel (n_mels, FRAMES), labels (n_text_ctx,)}: 3 .. n_text_ctx labelled tokens each, -100 after."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        labels = torch.full((config.n_text_ctx,), -100)
        length = int(torch.randint(3, config.n_text_ctx + 1, (), generator=g))
        labels[:length] = torch.randint(4, config.vocab_size, (length,), generator=g)
        out.append({"input_features": torch.randn(config.n_mels, FRAMES, generator=g), "labels": labels})
    return out


def collate(batch: list[dict]) -> dict:
    return {key: torch.stack([b[key] for b in batch]) for key in batch[0]}


class Recorder(TrainerCallback):
    """Per optimizer step: gradients before the update, base and prev_loss after the callback's move;
    the base after every micro-batch but the last."""

    def __init__(self, model: Echo):
        self.model = model
        self.grads, self.bases, self.prev_losses, self.step_losses, self.substep_bases = [], [], [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def on_substep_end(self, args, state, control, **kwargs):
        self.substep_bases.append(self.model.base.clone())

    def on_step_end(self, args, state, control, **kwargs):
        self.bases.append(self.model.base.clone())
        self.prev_losses.append(self.model.prev_loss.clone())
        self.step_losses.append(self.model.step_loss.clone())


def train(model: Echo, out: Path, data: list[dict], batch_size: int, accumulation: int, steps: int,
          **extra) -> tuple[Seq2SeqTrainer, Recorder]:
    """Seq2SeqTrainer with AdaptiveBaseCallback: plain SGD, no clipping, data in order."""
    recorder = Recorder(model)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=0.05, optim="sgd", max_grad_norm=0.0,
        train_sampling_strategy="sequential", logging_steps=1, report_to=[], save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, use_cpu=True, **extra)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=collate,
                             callbacks=[AdaptiveBaseCallback(), recorder])
    trainer.train()
    return trainer, recorder


def logged_losses(trainer: Seq2SeqTrainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def replay(config, losses: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """docs/model.md, Adaptive base, applied to one loss per step: the bases and prev_losses after each
    step."""
    base, prev = torch.tensor(float(config.base)), torch.tensor(math.inf)
    bases, prevs = [], []
    for loss in losses:
        loss = torch.tensor(loss)
        base = base * config.base_factor if loss < prev else base / config.base_factor
        prev = loss
        bases.append(base)
        prevs.append(prev)
    return bases, prevs


@pytest.mark.speech
def test_gradient_accumulation_matches_one_bigger_batch(tmp_path):
    big_model, acc_model = tiny_echo(), tiny_echo()
    data = examples(big_model.config, 16)
    big, big_rec = train(big_model, tmp_path / "big", data, batch_size=8, accumulation=1, steps=2)
    acc, acc_rec = train(acc_model, tmp_path / "acc", data, batch_size=2, accumulation=4, steps=2)
    # micro-batches hold different numbers of labelled tokens: only sum / num_items_in_batch matches
    tokens = [int(collate(data[i:i + 2])["labels"].ne(-100).sum()) for i in range(0, 8, 2)]
    assert len(set(tokens)) > 1
    assert len(big_rec.grads) == len(acc_rec.grads) == 2
    for step, (g_big, g_acc) in enumerate(zip(big_rec.grads, acc_rec.grads)):
        assert g_big.keys() == g_acc.keys()
        for name in g_big:
            torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-4, atol=1e-6, msg=f"{step}: {name}")
    torch.testing.assert_close(logged_losses(acc), logged_losses(big), rtol=1e-5, atol=0)
    for (name, a), b in zip(acc_model.named_parameters(), big_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(acc_model.base, big_model.base)
    torch.testing.assert_close(acc_model.prev_loss, big_model.prev_loss, rtol=1e-5, atol=0)


@pytest.mark.speech
def test_base_moves_once_per_optimizer_step_from_its_loss(tmp_path):
    model = tiny_echo()
    config = model.config
    trainer, rec = train(model, tmp_path, examples(config, 24), batch_size=2, accumulation=4, steps=3)
    losses = logged_losses(trainer)
    assert len(losses) == len(rec.bases) == 3 and len(rec.substep_bases) == 3 * 3
    bases, prevs = replay(config, losses)
    before = torch.tensor(float(config.base))
    for step in range(3):
        # micro-batches 1..3 of the step leave the base where the previous step put it
        assert all(torch.equal(b, before) for b in rec.substep_bases[3 * step: 3 * step + 3])
        assert torch.equal(rec.bases[step], bases[step]), (step, rec.bases, bases)
        torch.testing.assert_close(rec.prev_losses[step], prevs[step], rtol=1e-5, atol=0)
        assert torch.equal(rec.step_losses[step], torch.zeros(3))  # the next step starts from nothing
        before = rec.bases[step]
    assert model.step_loss is None  # after training, forward moves the base itself again
    assert "step_loss" not in model.state_dict()


def test_deferred_forward_only_accumulates_training_losses():
    model = tiny_echo()
    config = model.config
    batch = collate(examples(config, 2))
    model.defer_base_updates()
    model.eval()
    model(**batch)
    model.train()
    with torch.no_grad():
        model(batch["input_features"], decoder_input_ids=batch["labels"].clamp(min=0))
        assert torch.equal(model.step_loss, torch.zeros(3))
        out = model(**batch)
        model(**batch, num_items_in_batch=torch.tensor(40))
    assert model.base.item() == config.base and math.isinf(model.prev_loss.item())
    tokens = batch["labels"].ne(-100).sum()
    expected = torch.stack([2 * out.loss * tokens, 2 * tokens, torch.tensor(2)]).float()  # 2 forwards
    torch.testing.assert_close(model.step_loss, expected)
    model.step_base()
    torch.testing.assert_close(model.prev_loss, out.loss)
    assert model.base.item() == pytest.approx(config.base * config.base_factor)
    assert torch.equal(model.step_loss, torch.zeros(3))


def test_deferred_updates_never_sync_with_the_host(monkeypatch):
    model = tiny_echo()
    model.defer_base_updates()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the deferred base update")

    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    # forward's share after its input checks (which do read values): sums of 3 and 1 token losses
    model._adapt_base(torch.tensor(6.0), torch.tensor(3), num_items_given=True)
    model._adapt_base(torch.tensor(2.0), torch.tensor(1), num_items_given=True)
    model.step_base()
    monkeypatch.undo()
    assert model.prev_loss.item() == 2.0
    assert model.base.item() == pytest.approx(model.config.base * model.config.base_factor)


def test_plain_forward_moves_the_base_and_warns_under_a_trainer():
    model = tiny_echo()
    batch = collate(examples(model.config, 2))
    tokens = batch["labels"].ne(-100).sum()
    with torch.no_grad():
        mean = model.eval()(**batch).loss
        model.train()
        _warn_base_moves_in_forward.cache_clear()
        with pytest.warns(UserWarning, match="AdaptiveBaseCallback"):
            out = model(**batch, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(out.loss, mean * tokens / 40)
    torch.testing.assert_close(model.prev_loss, mean)  # the micro-batch's mean loss, not loss / 40
    assert model.base.item() == pytest.approx(model.config.base * model.config.base_factor)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.speech
def test_two_processes_end_with_the_same_base(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(tmp_path)]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # the processes see different data: only the all-reduced step loss keeps their bases equal
    assert ranks[0]["first_loss"] != ranks[1]["first_loss"]
    for key in ("bases", "prev_losses"):
        assert torch.equal(torch.stack(ranks[0][key]), torch.stack(ranks[1][key])), key
    config = small_config()
    bases, prevs = replay(config, ranks[0]["losses"])
    assert torch.equal(torch.stack(ranks[0]["bases"]), torch.stack(bases))
    torch.testing.assert_close(torch.stack(ranks[0]["prev_losses"]), torch.stack(prevs), rtol=1e-5, atol=0)
    moves = torch.stack([torch.tensor(float(config.base)), *ranks[0]["bases"]]).diff()
    assert moves.ne(0).all()  # every step moved the base


def _worker(out: Path) -> None:
    """One process of the two-process test: 3 steps of 2 micro-batches of 2 examples."""
    model = tiny_echo()
    losses = []
    model.register_forward_hook(lambda module, args, output: losses.append(output.loss.item()))
    trainer, rec = train(model, out / "trainer", examples(model.config, 24), batch_size=2, accumulation=2,
                         steps=3, ddp_backend="gloo")
    torch.save({"bases": rec.bases, "prev_losses": rec.prev_losses, "losses": logged_losses(trainer),
                "first_loss": losses[0]}, out / f"rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
