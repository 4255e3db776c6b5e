"""Do attention's Givens angles learn? One training step of an Echo, then the mean |gradient| of every
attention site's angles next to its R's.

    python benches/attention_angle_gradients.py                       # the default medium, 30 s of audio
    python benches/attention_angle_gradients.py --seconds 10 --rotation rope_then_m

The model is EchoConfig() with its defaults (the medium of docs/model.md, Configuration: about 700 M
parameters, activation checkpointing on) unless --tiny is given; the input is random log-mel of --seconds
seconds and 8 random tokens. Prints one line per group of sites (encoder self-attention, decoder
self-attention, decoder cross-attention) and the ratio over all sites. Not a test: it takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from echo import Echo, EchoConfig
from echo.attention import EchoAttention
from echo.config import ATTENTION_ROTATIONS, TINY


def site_group(name: str) -> str:
    if name.startswith("encoder."):
        return "encoder self-attention"
    return "decoder cross-attention" if "cross_attn" in name else "decoder self-attention"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="audio length (100 mel frames a second)")
    parser.add_argument("--rotation", choices=ATTENTION_ROTATIONS, default="m_then_rope")
    parser.add_argument("--tiny", action="store_true", help="Whisper tiny's widths and depths instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = EchoConfig(**(TINY if args.tiny else {}), attention_rotation=args.rotation)
    model = Echo(config)
    model.apply_initialization()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    frames = max(2, int(round(args.seconds * 100)))
    g = torch.Generator().manual_seed(args.seed)
    mel = torch.randn(1, config.n_mels, frames, generator=g)
    labels = torch.randint(0, config.vocab_size, (1, 8), generator=g)

    start = time.perf_counter()
    model(mel, labels=labels).loss.backward()
    elapsed = time.perf_counter() - start

    print(f"Echo {n_params / 1e6:.0f} M parameters, attention_rotation={args.rotation!r}, "
          f"{frames} mel frames ({frames / 100:g} s), checkpointing={config.checkpointing}; "
          f"one step in {elapsed:.0f} s\n")
    groups: dict[str, list[tuple[float, float]]] = {}
    for name, attn in model.named_modules():
        if isinstance(attn, EchoAttention):
            angles, R = attn.site.thetas.grad.abs().mean().item(), attn.site.R.grad.abs().mean().item()
            groups.setdefault(site_group(name), []).append((angles, R))
    header = ("sites", "n", "mean |d angles|", "mean |d R|", "ratio", "min site ratio")
    print(f"{header[0]:<26}{header[1]:>4}{header[2]:>18}{header[3]:>14}{header[4]:>10}{header[5]:>16}")
    everything = []
    for group, rows in groups.items():
        everything += rows
        angles = sum(a for a, _ in rows) / len(rows)
        R = sum(r for _, r in rows) / len(rows)
        worst = min(a / r for a, r in rows)
        print(f"{group:<26}{len(rows):>4}{angles:>18.3e}{R:>14.3e}{angles / R:>10.2e}{worst:>16.2e}")
    angles = sum(a for a, _ in everything) / len(everything)
    R = sum(r for _, r in everything) / len(everything)
    print(f"{'all attention sites':<26}{len(everything):>4}{angles:>18.3e}{R:>14.3e}{angles / R:>10.2e}"
          f"{min(a / r for a, r in everything):>16.2e}")


if __name__ == "__main__":
    main()
