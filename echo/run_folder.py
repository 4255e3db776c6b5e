"""What a run of python -m echo.train keeps in its --out folder (checkpoint, log, final model), written
atomically (echo.durable), and the checks that keep one run from destroying or mixing with another."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from . import durable
from .checkpoint import load_weights_only

# What a run writes in OUT. The synthetic data it may cache there (OUT/synthetic) is not part of a run: a
# new run on the same data reuses it.
RUN_FILES = ("checkpoint.pt", "model", "log.jsonl", "summary.json", "eval.json")


def run_files(out: Path) -> list[str]:
    """The RUN_FILES in `out`, counting those that only a killed write left (their temporary or aside)."""
    return [name for name in RUN_FILES
            if any(os.path.lexists(path) for path in (out / name, durable.temporary(out / name),
                                                        durable.aside(out / name)))]


def check_output(args, out: Path, checkpoint: Path) -> None:
    """Refuse, before any data is prepared, a run that would destroy or mix with the one in `out`, or that
    could not write its model."""
    if args.resume == "always" and not checkpoint.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint} (run without --resume to train "
                                "from scratch, or with --resume auto to do so whenever OUT has none yet)")
    found = run_files(out)
    if found and args.resume is None and not args.overwrite:
        raise SystemExit(f"{out} already holds a run ({', '.join(found)}): give --resume to continue it, or "
                         "--overwrite to delete it and start afresh (or choose another --out)")
    model = out / "model"
    if not args.overwrite and os.path.lexists(model) and not model.is_dir():
        raise SystemExit(f"{model} is a file: the trained model is written there as a folder "
                         f"(move or remove it)")


def prepare_output(args, out: Path) -> None:
    """`out` created and shown writable (a file created and removed in it); with --overwrite the run in it
    deleted; what a killed write left behind cleared."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".writable-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise SystemExit(f"--out {out}: cannot write there ({error})") from None
    for name in RUN_FILES:
        path = out / name
        if args.overwrite:  # logs and checkpoints of the old run must not mix with the new one's
            for leftover in (path, durable.temporary(path), durable.aside(path)):
                durable.remove(leftover)
        durable.recover(path)


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, extra: dict, rank: int) -> None:
    """model + optimizer + scheduler + step (+ the adaptive base, a model buffer) in one file, written by
    rank 0 to durable.temporary(path) and renamed over `path`: a kill mid-save leaves the last one whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
    if rank == 0:
        state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "step": step, **extra}
        durable.write_file(path, lambda f: torch.save(state, f))


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "elapsed", "config", "args", "world_size",
                   "loss", "skipped_steps", "bad_steps_in_a_row")


def read_checkpoint(path: Path) -> dict:
    """checkpoint.pt as save_checkpoint wrote it, loaded weights-only (never running code); a file that is
    not one is a ValueError naming what it lacks."""
    state = load_weights_only(path, "checkpoint of python -m echo.train")
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint of python -m echo.train: it holds a "
                         f"{type(state).__name__}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this python -m echo.train: it lacks "
                         f"{', '.join(missing)}")
    return state


def restore_checkpoint(state: dict, model, optimizer, scheduler) -> None:
    """Put read_checkpoint's model, optimizer and scheduler states into the training objects."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    scheduler.load_state_dict(state["scheduler"])


def trim_log(path: Path, step: int) -> None:
    """Keep the records of log.jsonl up to `step`, the checkpoint resumed from (0: a fresh start).

    Later ones were written by a run killed before it saved them; the resumed run writes them again, so
    the log ends up as an uninterrupted run's. A last line cut short by the kill is dropped as well.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    durable.write_text(path, "".join(line for line in lines if json.loads(line)["step"] <= step))
