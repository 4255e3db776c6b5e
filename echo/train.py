"""python -m echo.train: train Echo on a manifest of (audio, text) or on speech synthesised with espeak-ng.

    python -m echo.train --synthetic 3000 --out runs/digits --max-minutes 10 --eval-synthetic 40
    python -m echo.train --manifest data/train.tsv --out runs/mine --preset tiny --steps 20000
    python -m echo.train ... --resume                      # continue exactly from runs/.../checkpoint.pt
    python -m echo.train ... --resume auto                 # the same, or from scratch if there is none yet
    python -m echo.train ... --overwrite                   # delete the run already in --out, start afresh
    torchrun --nproc_per_node=4 -m echo.train ... [--fsdp] # DistributedDataParallel, or FSDP2 fully_shard

A manifest holds one `audio path<TAB>text` line per utterance (relative paths from its folder). Audio is
loaded and turned into log-mel by openai-whisper's own code (echo.audio), cut or padded to --seconds;
labels are whisper's multilingual tokens after <|startoftranscript|><|en|><|transcribe|><|notimestamps|>.

Data order is a function of (seed, step) alone, so --resume reproduces an uninterrupted run exactly, and
N processes of a torchrun see between them the examples one process would see with N times the batch.
The rotary base adapts once per optimizer step from the loss averaged over micro-batches and processes.

An --out folder that already holds a run is refused unless --resume continues it or --overwrite deletes
it. A resume must be given the arguments that define the run (DEFINES_THE_RUN: model, data, batch,
optimiser, seed) as they were saved; the others (--steps to extend a run, --save-every, logging, time
limits) may change. The checkpoint holds tensors, containers, numbers and strings only, and is loaded
with torch.load(weights_only=True): reading it never runs code.

Every file is replaced atomically (echo.durable), so a run killed at any moment resumes from its last
checkpoint and then matches an uninterrupted run bit for bit; what a killed save left behind is cleared
at the next start. A step whose loss or gradient norm is not
finite is skipped (its gradients dropped, no optimizer, scheduler or base update); --max-bad-steps of
them in a row stop the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from echo_kernels.optional import MissingExtra, require

from . import durable
from .config import ECHO_DEFAULTS, TINY, EchoConfig, read_json_object
from .distributed import clip_gradients, dist_setup, gradient_norm, sync_replicated, wrap
from .model import Echo, shift_tokens_right
from .run_folder import (
    check_output,
    prepare_output,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    trim_log,
)
from .train_data import cached_features, collate, featurize, load_data, stream_indices, warn_long_labels

PRESETS = {
    # trains on 2 CPU cores in minutes: the recorded WER run uses it
    "speech-tiny": dict(n_audio_state=128, n_audio_head=4, n_audio_layer=2, n_text_state=128, n_text_head=4,
                        n_text_layer=2, n_text_ctx=32, max_rel_dist=8, checkpointing=False),
    # for tests: smallest widths with whisper's vocabulary
    "test": dict(n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_text_state=32, n_text_head=2,
                 n_text_layer=1, n_text_ctx=24, max_rel_dist=4, checkpointing=False),
    "tiny": TINY,
    "medium": {},
}


def build_config(preset: str, seconds: float) -> EchoConfig:
    """An EchoConfig of `preset` with whisper's vocabulary; n_audio_ctx fits clips of `seconds` (at most
    30)."""
    frames = int(round(seconds * 100))
    return EchoConfig(**{**PRESETS[preset], "n_audio_ctx": (frames + 1) // 2})


def _json_number(x: float) -> float | str:
    # JSON has no NaN or infinity: those are written as the strings "nan", "inf", "-inf"
    return x if math.isfinite(x) else str(x)


def _bounded(kind, low, *, strict: bool = False):
    """An argparse type: `kind` (int or float) of at least `low` (above it when strict); floats finite."""
    def parse(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        too_low = value <= low if strict else value < low
        if too_low or (kind is float and not math.isfinite(value)):
            bound = "greater than" if strict else "at least"
            raise argparse.ArgumentTypeError(f"must be {bound} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE, NATURAL = _bounded(int, 1), _bounded(int, 0)
POSITIVE_FLOAT, NON_NEGATIVE_FLOAT = _bounded(float, 0, strict=True), _bounded(float, 0)

# Every argument, by whether it defines the run (True) or may differ between a run and its --resume (False).
# What defines the run decides the model, the data, the order it is seen in or the optimiser's updates: a
# resume given another value would quietly continue a different run, so it is refused, naming each one.
# What may change only says how long to train and how to save, log, parallelise or evaluate.
DEFINES_THE_RUN = {
    "manifest": True, "synthetic": True, "preset": True, "init": True, "seconds": True,
    "batch_size": True, "grad_accum": True, "lr": True, "warmup": True, "weight_decay": True, "clip": True,
    "seed": True,
    # a new --steps extends (or shortens) a run: the cosine schedule is stretched to it from the resumed step
    "steps": False, "max_minutes": False, "stop_after": False, "save_every": False, "log_every": False,
    "max_bad_steps": False, "out": False, "data_dir": False, "workers": False, "progress": False,
    # DDP and FSDP2 compute the same updates from the same full-state checkpoint; bf16 only follows the device
    "fsdp": False, "bf16": False,
    "resume": False, "overwrite": False, "eval_synthetic": False, "eval_only": False, "eval_kind": False,
}


def option_name(name: str) -> str:
    """The option that sets argument `name`: --batch-size for batch_size, --no-bf16 for bf16."""
    return {"progress": "--no-progress", "bf16": "--no-bf16"}.get(name, "--" + name.replace("_", "-"))


MAY_CHANGE = ", ".join(option_name(name) for name, fixed in DEFINES_THE_RUN.items()
                       if not fixed and name not in ("resume", "overwrite"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m echo.train", description=__doc__.splitlines()[0])
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="`audio path<TAB>text` per line")
    data.add_argument("--synthetic", type=POSITIVE, metavar="N",
                      help="synthesise N training utterances with espeak-ng")
    p.add_argument("--out", required=True,
                   help="folder for checkpoint.pt, log.jsonl, the final model, results")
    p.add_argument("--data-dir", help="where --synthetic writes its audio (default OUT/synthetic)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="speech-tiny")
    p.add_argument("--init", metavar="SOURCE",
                   help="start from this model instead of --preset: an Echo folder, or a Whisper "
                        "(openai-whisper .pt or Hugging Face folder) imported by Echo.from_whisper")
    p.add_argument("--seconds", type=POSITIVE_FLOAT,
                   help="clip length: audio is cut or zero-padded to it "
                        "(default 3, or the --init model's window)")
    p.add_argument("--steps", type=NATURAL, default=2000, help="optimizer steps in all")
    p.add_argument("--max-minutes", type=POSITIVE_FLOAT, help="stop (and save) after this much training time")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="per process and micro-batch")
    p.add_argument("--grad-accum", type=POSITIVE, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=2e-3)
    p.add_argument("--warmup", type=NATURAL, default=100)
    p.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.01)
    p.add_argument("--clip", type=NON_NEGATIVE_FLOAT, default=1.0, help="gradient norm clipping (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=POSITIVE, default=200)
    p.add_argument("--log-every", type=POSITIVE, default=10)
    p.add_argument("--resume", nargs="?", const="always", choices=("always", "auto"),
                   help="continue from OUT/checkpoint.pt (an error if there is none); `--resume auto` "
                        "starts from scratch when OUT has none yet, e.g. in a loop restarting a killed run. "
                        "The arguments that define the run must be the saved ones (a difference is an error "
                        f"naming each); these may change: {MAY_CHANGE}")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT already holds a run (checkpoint, log, model): delete it and start afresh")
    p.add_argument("--max-bad-steps", type=POSITIVE, default=3, metavar="K",
                   help="stop with an error after K steps in a row whose loss or gradient norm is not finite "
                        "(each is skipped: no update)")
    p.add_argument("--stop-after", type=POSITIVE, metavar="K",
                   help="stop (and save) after K optimizer steps of this run, e.g. to fit a time slot")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on the GPU")
    p.add_argument("--workers", type=POSITIVE, default=4, help="threads for synthesis and audio loading")
    p.add_argument("--eval-synthetic", type=NATURAL, default=0, metavar="N",
                   help="after training, WER on N synthesised held-out texts (never in training)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate OUT/model (with --eval-synthetic)")
    p.add_argument("--eval-kind", choices=("digits", "commands", "mixed"), default="digits")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.overwrite and args.resume:
        parser.error("--overwrite deletes the run in OUT and starts afresh; --resume continues it: give one")
    return args


def initial_model(args) -> Echo:
    """The model to train: --init's (sets --seconds to its window when not given), or a fresh one of
    --preset."""
    if args.init is None:
        args.seconds = 3.0 if args.seconds is None else args.seconds
        model = Echo(build_config(args.preset, args.seconds))
        model.apply_initialization()
        return model
    source = Path(args.init)
    config_file = source / "config.json"
    if config_file.is_file() and read_json_object(config_file).get("model_type") == "echo":
        model = Echo.from_pretrained(source)
    else:
        model = Echo.from_whisper(source)
    window = 2 * model.config.n_audio_ctx / 100  # seconds of audio the encoder takes
    if args.seconds is None:
        args.seconds = window
    elif not 0 < args.seconds <= window:
        raise SystemExit(f"--seconds {args.seconds:g}: the --init model takes at most {window:g} s of audio")
    return model


def resume_differences(saved: dict, args, config: EchoConfig, world: int) -> list[str]:
    """`name: saved X, given Y` for each argument of DEFINES_THE_RUN, config key and process count in
    which the checkpoint `saved` differs from this run."""
    was = {name: saved["args"].get(name, "(not saved)") for name, fixed in DEFINES_THE_RUN.items() if fixed}
    differences = [f"{option_name(name)}: saved {value!r}, given {getattr(args, name)!r}"
                   for name, value in was.items() if value != getattr(args, name)]
    differences += [f"model config {key}: saved {saved['config'].get(key, '(not saved)')!r}, "
                    f"given {getattr(config, key)!r}"
                    for key in ECHO_DEFAULTS
                    if saved["config"].get(key, "(not saved)") != getattr(config, key)]
    if saved["world_size"] != world:  # each optimizer step sees batch size x grad-accum x processes examples
        differences.append(f"processes (torchrun's world size): saved {saved['world_size']}, given {world}")
    return differences


def check_resume(saved: dict, args, config: EchoConfig, world: int, path: Path) -> None:
    """Refuse to resume from `path` with arguments that define another run (resume_differences)."""
    differences = resume_differences(saved, args, config, world)
    if differences:
        raise SystemExit(f"--resume: {path} was saved by a run with other settings:\n  "
                         + "\n  ".join(differences)
                         + "\nGive the saved values to continue it, or start afresh with --overwrite (or "
                         f"another --out). Only these may change on resume: {MAY_CHANGE}")


def build_optimizer(model: Echo, args) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, weight decay on matrices only, and its schedule: a linear warm-up over --warmup steps, then a
    cosine down to 5% of --lr at --steps."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def schedule(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        return max(0.05,
                   0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def backward_step(module, mels: torch.Tensor, labels: list[list[int]], step: int, args, config: EchoConfig,
                  rank: int, world: int, device: torch.device, autocast) -> torch.Tensor:
    """The gradients of optimizer step `step`, from its --grad-accum micro-batches on every process (the
    data stream's items for this step, rank and micro-batch), and () its loss: their mean token loss,
    averaged over the processes."""
    total_loss = torch.zeros((), device=device)
    for micro in range(args.grad_accum):
        first = (step * args.grad_accum * world + micro * world + rank) * args.batch_size
        mel, lab = collate(mels, labels, stream_indices(len(labels), args.seed, first, args.batch_size),
                           config.n_text_ctx)
        mel, lab = mel.to(device), lab.to(device)
        dec_in = shift_tokens_right(lab, config.pad_token_id, config.decoder_start_token_id)
        # DDP all-reduces the gradients at the last micro-batch's backward only
        sync = micro == args.grad_accum - 1 or not hasattr(module, "no_sync")
        with (nullcontext() if sync else module.no_sync()), autocast():
            logits = module(input_features=mel, decoder_input_ids=dec_in).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                   ignore_index=-100)
        (loss / args.grad_accum).backward()
        total_loss += loss.detach() / args.grad_accum
    if world > 1:
        dist.all_reduce(total_loss)
        total_loss /= world
    return total_loss


def main(argv=None) -> int:
    args = parse_args(argv)
    # fail before minutes of synthesis or training, not after
    require("whisper", "python -m echo.train (audio and tokens)")
    if args.eval_synthetic:
        require("jiwer", "python -m echo.train --eval-synthetic (word error rate)")
    out = Path(args.out)
    if args.eval_only:
        if not args.eval_synthetic:
            raise SystemExit("--eval-only needs --eval-synthetic N")
        model = Echo.from_pretrained(out / "model").eval()
        if args.seconds is None:
            args.seconds = 2 * model.config.n_audio_ctx / 100
        result = evaluate_synthetic(model, args, out)
        durable.write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
        print(f"WER {result['wer']:.4f} on {result['n']} held-out utterances", file=sys.stderr)
        return 0
    checkpoint = out / "checkpoint.pt"
    check_output(args, out, checkpoint)
    # paths as absolute ones: a resume from another working folder compares (and finds) the same files
    args.manifest, args.init = (path and os.path.abspath(path) for path in (args.manifest, args.init))
    resume = args.resume is not None and checkpoint.exists()
    rank, world, device = dist_setup()
    if rank == 0:
        prepare_output(args, out)
    torch.manual_seed(args.seed)
    progress = args.progress and rank == 0

    model = initial_model(args)
    config = model.config
    saved = read_checkpoint(checkpoint) if resume else None
    if saved is not None:
        check_resume(saved, args, config, world, checkpoint)
    items = load_data(args, rank, world)
    mels, labels = cached_features(items, args, config, progress)
    if rank == 0:
        warn_long_labels(labels, config.n_text_ctx)
    model.to(device).train()
    module, replicated = wrap(model, world, device, args.fsdp)
    optimizer, scheduler = build_optimizer(model, args)
    step, elapsed, last_loss, skipped, bad_in_a_row = 0, 0.0, float("nan"), 0, 0
    if saved is not None:
        restore_checkpoint(saved, module, optimizer, scheduler)
        step, elapsed = saved["step"], saved["elapsed"]
        last_loss, skipped, bad_in_a_row = saved["loss"], saved["skipped_steps"], saved["bad_steps_in_a_row"]
        saved = None  # the model and optimizer hold their own copies now
        if rank == 0:
            print(f"resumed from {checkpoint} at step {step}", file=sys.stderr)
    if rank == 0:
        trim_log(out / "log.jsonl", step)

    use_bf16 = args.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    per_step = args.batch_size * args.grad_accum * world
    log = durable.open_append(out / "log.jsonl") if rank == 0 else None
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", disable=not progress)
    stopped_early = False
    start = time.perf_counter() - elapsed
    first_step, done = step, step
    params = list(model.parameters())
    for step in bar:
        total_loss = backward_step(module, mels, labels, step, args, config, rank, world, device, autocast)
        sync_replicated(replicated, world)
        norm = gradient_norm(params, world)
        # the loss is averaged over processes, the norm taken over gradients they share: all take one branch
        finite = bool(torch.isfinite(total_loss) & torch.isfinite(norm))
        done = step + 1
        if finite:
            if args.clip > 0:
                clip_gradients(params, args.clip, norm)
            optimizer.step()
            scheduler.step()
            if config.adaptive_base:
                model.update_base(total_loss)
            last_loss, bad_in_a_row = total_loss.item(), 0
        else:
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and not finite:
            record = {"step": done, "skipped": "non-finite", "loss": _json_number(total_loss.item()),
                      "grad_norm": _json_number(norm.item())}
            print(f"step {done}: loss {record['loss']}, gradient norm {record['grad_norm']}: skipped, "
                  f"gradients dropped ({bad_in_a_row} in a row, --max-bad-steps {args.max_bad_steps})",
                  file=sys.stderr)
            log.write(json.dumps(record) + "\n")
            log.flush()
        elif rank == 0 and (done % args.log_every == 0 or done == args.steps):
            record = {"step": done, "loss": last_loss, "base": model.base.item(),
                      "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 2)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", base=f"{record['base']:.0f}")
        if bad_in_a_row >= args.max_bad_steps:
            if log is not None:
                log.close()
            raise RuntimeError(f"step {done}: {bad_in_a_row} steps in a row had a non-finite loss or "
                               f"gradient norm (--max-bad-steps {args.max_bad_steps}); none of them changed "
                               f"the weights, and {checkpoint} holds the last one saved. Lower --lr or check "
                               "the data.")
        out_of_time = args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes
        out_of_time = out_of_time or (args.stop_after is not None and done - first_step >= args.stop_after)
        if world > 1:
            flag = torch.tensor(float(out_of_time), device=device)
            dist.broadcast(flag, 0)
            out_of_time = bool(flag.item())
        if done % args.save_every == 0 or done == args.steps or out_of_time:
            if log is not None:  # the log is never behind the checkpoint, even after a power cut
                os.fsync(log.fileno())
            save_checkpoint(checkpoint, module, optimizer, scheduler, done,
                            {"elapsed": time.perf_counter() - start, "config": config.to_dict(),
                             "args": vars(args), "world_size": world, "loss": last_loss,
                             "skipped_steps": skipped, "bad_steps_in_a_row": bad_in_a_row},
                            rank)
        if out_of_time:
            stopped_early = done < args.steps
            break
    train_seconds = time.perf_counter() - start
    bar.close()

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    final_state = get_model_state_dict(module,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final = Echo(config)
        final.load_state_dict(final_state)
        try:
            durable.write_folder(out / "model", final.save_pretrained)
        except OSError as error:
            log.close()
            raise SystemExit(f"the trained model could not be written to {out / 'model'}: {error} "
                             f"({checkpoint} holds the last state saved)") from None
        summary = {"steps": done, "train_seconds": round(train_seconds, 1), "stopped_by_time": stopped_early,
                   "final_loss": last_loss, "skipped_steps": skipped, "base": model.base.item(),
                   "world_size": world,
                   "examples_seen": done * per_step, "train_utterances": len(items),
                   "parameters": sum(p.numel() for p in final.parameters())}
        if args.eval_synthetic:
            summary["eval"] = evaluate_synthetic(final.eval(), args, out)
        durable.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}), file=sys.stderr)
        if "eval" in summary:
            print(f"WER {summary['eval']['wer']:.4f} on {summary['eval']['n']} held-out utterances",
                  file=sys.stderr)
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def evaluate_synthetic(model: Echo, args, out: Path) -> dict:
    """WER (jiwer) of greedy transcripts of N synthesised held-out texts, none of which was trained on."""
    jiwer = require("jiwer", "the word error rate of --eval-synthetic")

    from . import synthetic
    from .audio import decode_text

    texts = synthetic.held_out_texts(args.eval_synthetic, seed=args.seed + 1000, kind=args.eval_kind)
    folder = out / "heldout"
    manifest = synthetic.build_dataset(texts, folder, seed=args.seed + 1000, workers=args.workers)
    items = synthetic.read_manifest(manifest)
    mels, _ = featurize(items, args.seconds, n_mels=model.config.n_mels, workers=args.workers, progress=False,
                        vocab_size=model.config.vocab_size)
    hyps = []
    with torch.no_grad():
        for i in range(0, len(items), 16):
            tokens = model.generate(mels[i:i + 16], max_new_tokens=model.config.n_text_ctx - 4, language="en")
            hyps += [decode_text(row, model.config.vocab_size) for row in tokens]
    refs = [t for _, t in items]
    trained = set(synthetic.training_texts(args.synthetic, seed=args.seed)) if args.synthetic else set()
    return {"wer": jiwer.wer(refs, hyps), "n": len(refs), "kind": args.eval_kind,
            "texts_seen_in_training": len(set(refs) & trained),
            "examples": [{"ref": r, "hyp": h} for r, h in zip(refs[:10], hyps[:10])]}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MissingExtra as error:
        sys.exit(f"python -m echo.train: {error}")
