"""The training data of python -m echo.train: log-mel features and label tokens by openai-whisper's code,
cached beside synthetic data, cut and padded into batches, in an order that depends on (seed, step) alone."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import durable
from .config import EchoConfig


def featurize(items: list[tuple[str, str]], seconds: float, n_mels: int = 80, workers: int = 4,
              progress: bool = True, vocab_size: int = 51865) -> tuple[torch.Tensor, list[list[int]]]:
    """(path, text) pairs -> (log-mel (N, n_mels, seconds * 100), label token lists), by whisper's code
    (the tokenizer of a `vocab_size`-token whisper vocabulary)."""
    from .audio import SAMPLE_RATE, encode_text, log_mel_window

    n_samples = int(round(seconds * SAMPLE_RATE))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        mels = pool.map(lambda item: log_mel_window(item[0], n_samples, n_mels), items)
        mels = list(tqdm(mels, total=len(items), desc="log-mel", disable=not progress))
    return torch.stack(mels), [encode_text(text, vocab_size=vocab_size) for _, text in items]


def cached_features(items, args, config: EchoConfig, progress: bool):
    """featurize(), kept beside synthetic data (features-<seconds>s-<hash>.pt) so that later runs skip it."""
    import hashlib

    kwargs = dict(n_mels=config.n_mels, workers=args.workers, progress=progress, vocab_size=config.vocab_size)
    if args.manifest:
        return featurize(items, args.seconds, **kwargs)
    key = hashlib.sha1(
        repr((items, args.seconds, config.n_mels, config.vocab_size)).encode()).hexdigest()[:12]
    path = Path(args.data_dir or Path(args.out) / "synthetic") / f"features-{args.seconds:g}s-{key}.pt"
    if path.exists():
        state = torch.load(path, weights_only=True)
        return state["mels"], state["labels"]
    mels, labels = featurize(items, args.seconds, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        durable.write_file(path, lambda f: torch.save({"mels": mels, "labels": labels}, f))
    return mels, labels


def fit_label(row: list[int], max_len: int) -> list[int]:
    """A label row of at most max_len tokens: a longer one loses text tokens, never its last token
    (<|endoftext|>), so the model still learns where the transcript ends."""
    return row if len(row) <= max_len else row[:max_len - 1] + row[-1:]


def warn_long_labels(labels: list[list[int]], max_len: int) -> int:
    """How many label rows exceed max_len tokens (n_text_ctx); one warning saying so when any do."""
    long = sum(len(row) > max_len for row in labels)
    if long:
        warnings.warn(f"{long} of {len(labels)} transcripts have more than n_text_ctx = {max_len} label "
                      f"tokens: their text is cut to fit, keeping <|endoftext|>", stacklevel=2)
    return long


def collate(mels: torch.Tensor, labels: list[list[int]], index: list[int],
            max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `index` -> (mel (B, n_mels, T), labels (B, L) padded with -100, each cut to max_len by
    fit_label)."""
    rows = [fit_label(labels[i], max_len) for i in index]
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r)
    return mels[index], out


def stream_indices(n_items: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start + count of the endless stream of per-epoch permutations of range(n_items)."""
    out, cache = [], {}
    for k in range(start, start + count):
        epoch, i = divmod(k, n_items)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n_items,
                                          generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(cache[epoch][i]))
    return out


def load_data(args, rank: int, world: int) -> list[tuple[str, str]]:
    """The run's (audio path, text) items: --manifest's, or the --synthetic ones, synthesised into the data
    folder by rank 0 unless it holds them already (the other processes wait for it)."""
    from . import synthetic

    if args.manifest:
        return synthetic.read_manifest(args.manifest)
    folder = Path(args.data_dir or Path(args.out) / "synthetic")
    manifest = folder / "manifest.tsv"
    texts = synthetic.training_texts(args.synthetic, seed=args.seed)
    if rank == 0:
        current = manifest.exists() and [t for _, t in synthetic.read_manifest(manifest)] == texts
        if not current:
            synthetic.build_dataset(texts, folder, seed=args.seed, workers=args.workers)
    if world > 1:
        dist.barrier()
    return synthetic.read_manifest(manifest)
