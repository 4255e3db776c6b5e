"""python -m echo.convert SOURCE OUT_DIR [--set KEY=VALUE ...]: a pretrained Whisper written as an Echo
folder."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..model import Echo
from . import __doc__ as CONVERT_DOC


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echo.convert", description=CONVERT_DOC.splitlines()[0])
    parser.add_argument("source", help="openai-whisper .pt file, or a Hugging Face Whisper folder")
    parser.add_argument("out_dir", help="the Echo folder to write (safetensors + config.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an EchoConfig override, e.g. local_window=64 (JSON values); may be repeated")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _value(value.strip())
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = Echo.from_whisper(args.source, **overrides)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"python -m echo.convert: {error}")
    processor = model.save_pretrained(args.out_dir)  # beside the model when it can be built (else a warning)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir}: Echo with {n / 1e6:.1f} M parameters from {args.source}"
          f"{', and its processor' if processor is not None else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
