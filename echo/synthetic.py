"""Synthesised speech for training and tests: a small grammar spoken by Debian's espeak-ng.

Texts are digit strings ("four seven one nine") and short command phrases ("turn off the kitchen
light"). Every text belongs to one split, fixed by a hash of the text: `held_out_texts` only ever
returns texts of the held-out split and `training_texts` never does, so a test set drawn from the
former shares no text with any training set drawn from the latter.

espeak-ng writes 22.05 kHz WAV; the files are read back through whisper's ffmpeg loader, which
resamples to 16 kHz.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import durable

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VERBS = ("turn on", "turn off", "open", "close", "check", "start", "stop")
OBJECTS = ("the light", "the radio", "the door", "the window", "the heater", "the music", "the fan")
PLACES = ("", " in the kitchen", " in the garage", " in the bedroom", " upstairs", " now")
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us+f3", "en-gb+f2", "en-us+m3")

HELD_OUT_PERCENT = 20  # share of the text space reserved for held-out evaluation


def is_held_out(text: str) -> bool:
    """The split of a text, fixed by its CRC-32: about HELD_OUT_PERCENT % of all texts are held out."""
    return zlib.crc32(text.encode()) % 100 < HELD_OUT_PERCENT


def random_text(rng: random.Random, kind: str = "mixed") -> str:
    """One sentence of the grammar: 3-5 spoken digits, or a command phrase (kind
    "digits"/"commands"/"mixed")."""
    if kind == "mixed":
        kind = "digits" if rng.random() < 0.7 else "commands"
    if kind == "digits":
        return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5)))
    if kind == "commands":
        return f"{rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(PLACES)}"
    raise ValueError(f"kind must be 'digits', 'commands' or 'mixed', got {kind!r}")


def _texts(n: int, seed: int, kind: str, held_out: bool, unique: bool) -> list[str]:
    rng = random.Random(seed)
    texts, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(texts) == n:
            break
        text = random_text(rng, kind)
        if is_held_out(text) != held_out or (unique and text in seen):
            continue
        seen.add(text)
        texts.append(text)
    if len(texts) < n:
        raise ValueError(f"the grammar has fewer than {n} distinct {kind} texts in this split")
    return texts


def training_texts(n: int, seed: int = 0, kind: str = "mixed") -> list[str]:
    """n texts of the training split (repeats allowed, as in real data)."""
    return _texts(n, seed, kind, held_out=False, unique=False)


def held_out_texts(n: int, seed: int = 1, kind: str = "digits") -> list[str]:
    """n distinct texts of the held-out split: none can appear in any training_texts()."""
    return _texts(n, seed, kind, held_out=True, unique=True)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, path: str | os.PathLike, voice: str = "en-us", speed: int = 160,
               pitch: int = 50) -> Path:
    """Speak `text` into the WAV file `path` (22.05 kHz mono) with espeak-ng."""
    if not espeak_available():
        raise RuntimeError("synthesising speech needs the espeak-ng binary (apt-get install espeak-ng)")
    path = Path(path)
    # "--" ends the options, so a text starting with "-" is spoken, not parsed as one; with stdin
    # closed espeak-ng never waits for text there.
    subprocess.run(["espeak-ng", "-w", str(path), "-s", str(speed), "-p", str(pitch),
                    "-v", voice, "--", text],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return path


def build_dataset(texts: list[str], folder: str | os.PathLike, seed: int = 0, workers: int = 4) -> Path:
    """Synthesise every text (random voice, speed 150-210 wpm, pitch 30-70) into `folder`; write and
    return `folder`/manifest.tsv with one `path<TAB>text` line per utterance."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    jobs = [(text, folder / f"utt{i:06d}.wav", rng.choice(VOICES), rng.randint(150, 210), rng.randint(30, 70))
            for i, text in enumerate(texts)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda job: synthesize(*job), jobs))
    manifest = folder / "manifest.tsv"
    durable.write_text(manifest, "".join(f"{path.name}\t{text}\n" for text, path, *_ in jobs))
    return manifest


def read_manifest(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(audio path, text) per non-empty line of a `path<TAB>text` manifest; relative paths are taken
    from the manifest's folder. A line without a tab, or a manifest without a line, is a ValueError naming
    it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected 'audio path<TAB>text', got {line!r}")
        audio, text = line.split("\t", 1)
        audio_path = Path(audio)
        if not audio_path.is_absolute():
            audio_path = path.parent / audio_path
        items.append((str(audio_path), text.strip()))
    if not items:
        raise ValueError(f"{path} lists no utterances: a manifest holds one 'audio path<TAB>text' line per "
                         "utterance")
    return items
