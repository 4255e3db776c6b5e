"""python -m echo [--size tiny|medium|test] [--seed N]: build, train one step, save, reload, decode; print the
timings.

Random log-mel input only: nothing is downloaded. Exits non-zero when the reloaded model differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from . import Echo, EchoConfig
from .config import TINY, small_config


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echo", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "medium", "test"), default="tiny",
                        help="tiny: Whisper-tiny widths (about 30 M parameters); medium: "
                             "EchoConfig's defaults (700 M); test: the 0.3 M model of the test suite")
    parser.add_argument("--medium", action="store_const", const="medium", dest="size",
                        help="same as --size medium")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=5, help="tokens to decode greedily")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    with timed(timings, "build"):
        config = {"tiny": lambda: EchoConfig(**TINY), "medium": EchoConfig, "test": small_config}[args.size]()
        model = Echo(config)
        model.apply_initialization()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Echo: {n_params / 1e6:.2f} M parameters, encoder {config.n_audio_layer} x "
          f"{config.n_audio_state}, decoder {config.n_text_layer} x {config.n_text_state}")

    g = torch.Generator().manual_seed(args.seed)
    mel = torch.randn(1, config.n_mels, 2 * config.n_audio_ctx, generator=g)
    labels = torch.randint(0, config.vocab_size, (1, min(8, config.n_text_ctx)), generator=g)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    print(f"base before the step: {model.base.item():.2f}")
    with timed(timings, "forward"):
        loss = model(mel, labels=labels).loss
    with timed(timings, "backward"):
        loss.backward()
    with timed(timings, "optimizer"):
        optimizer.step()
    print(f"loss {loss.item():.4f}; base after the step: {model.base.item():.2f}")

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        with timed(timings, "save"):
            model.save_pretrained(folder)
        with timed(timings, "load"):
            loaded = Echo.from_pretrained(folder)
    with torch.no_grad():
        same = torch.equal(model(mel, labels=labels).logits, loaded(mel, labels=labels).logits)
    same = same and all(torch.equal(a, b)
                        for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    print(f"reloaded model identical: {same}")

    with timed(timings, "decode"):
        # start token ids given and whisper's suppression lists off: decoding needs no tokenizer, so the demo
        # runs without the speech extra
        tokens = loaded.generate(mel, max_new_tokens=args.tokens, prompt=[config.decoder_start_token_id],
                                 suppress_tokens=None, suppress_blank=False)
    print(f"greedy tokens: {tokens[0].tolist()}")

    total = sum(timings.values())
    print(f"\n{'stage':<10}{'seconds':>10}{'share':>8}")
    for name, seconds in timings.items():
        print(f"{name:<10}{seconds:>10.3f}{seconds / total:>8.0%}")
    print(f"{'total':<10}{total:>10.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
