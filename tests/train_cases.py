"""Shared by the training tests: a tiny manifest of tone-and-noise clips and the arguments that train the
"test" preset on it in seconds."""

from __future__ import annotations

import json
import os
import wave
from pathlib import Path

import numpy as np
import torch

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
    """Arguments of python -m echo.train for the "test" preset on `manifest`'s half-second clips."""
    return ["--manifest", str(manifest), "--out", str(out), "--preset", "test", "--seconds", "0.5",
            "--lr", "1e-2", "--warmup", "2", "--log-every", "1", "--no-progress", "--workers", "2", *extra]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def losses(out):
    return [record["loss"] for record in records(out)]


def final_state(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


def subprocess_env() -> dict:
    """The environment of a training subprocess: this checkout's packages first, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def poisoned(forward, steps: set[int], kind: str = "loss"):
    """Echo.forward made non-finite at its calls `steps` (0-based: the optimizer steps, one micro-batch
    each): NaN logits ("loss"), or finite logits whose gradient is infinite ("gradient")."""
    calls = []

    def poisoned_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(None)
        if len(calls) - 1 in steps and kind == "loss":
            out.logits = out.logits * float("nan")
        elif len(calls) - 1 in steps:
            out.logits.register_hook(lambda grad: grad * float("inf"))
        return out

    return poisoned_forward
