"""Optional dependencies: imported where they are used, with one clear message when one is missing.

The package itself needs torch, transformers, safetensors and tqdm only. Speech (audio, tokenizer, training
scripts) needs the `speech` extra; the report's plots need the `test` extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (pip distribution, extra of echo-kernels that installs it)
OPTIONAL = {
    "whisper": ("openai-whisper", "speech"),
    "jiwer": ("jiwer", "speech"),
    "accelerate": ("accelerate", "speech"),
    "matplotlib": ("matplotlib", "test"),
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """importlib.import_module(module), or MissingExtra saying what needs it and how to install it.

    module: e.g. "whisper.tokenizer"; purpose: what the caller was doing, e.g. "decoding text".
    """
    top = module.split(".")[0]
    distribution, extra = OPTIONAL[top]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is broken: show that error
        raise MissingExtra(f"{purpose} needs {distribution}, which is not installed: "
                           f"pip install 'echo-kernels[{extra}]'") from None
