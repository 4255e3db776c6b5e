"""Checks of the model's inputs (log-mel features, token ids), shared by Echo.forward and decoding:
a wrong shape, dtype or value is a ValueError naming the argument."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import EchoConfig


def check_mel(config: EchoConfig, mel, attention_mask) -> None:
    if not isinstance(mel, Tensor) or not mel.is_floating_point():
        raise ValueError(f"input_features must be a floating-point tensor, got "
                         f"{getattr(mel, 'dtype', type(mel))}")
    if mel.dim() != 3:
        raise ValueError(f"input_features must have shape (B, n_mels, T), got {tuple(mel.shape)}")
    if mel.shape[1] != config.n_mels:
        raise ValueError(f"input_features has {mel.shape[1]} mel bins, the model expects n_mels = "
                         f"{config.n_mels}")
    T = mel.shape[2]
    if not 1 <= T <= 2 * config.n_audio_ctx:
        raise ValueError(f"input_features has {T} frames; expected 1..2 * n_audio_ctx = "
                         f"{2 * config.n_audio_ctx}")
    if not bool(torch.isfinite(mel).all()):
        raise ValueError("input_features contains NaN or inf")
    if attention_mask is not None and tuple(attention_mask.shape) != (mel.shape[0], T):
        raise ValueError(f"attention_mask must have shape (B, T) = ({mel.shape[0]}, {T}), got "
                         f"{tuple(attention_mask.shape)}")


def as_model_dtype(mel: Tensor, dtype: torch.dtype) -> Tensor:
    """mel in `dtype`; a ValueError where the cast overflows (float16 ends at 65504)."""
    if mel.dtype == dtype:
        return mel
    cast = mel.to(dtype)
    if not bool(torch.isfinite(cast).all()):
        raise ValueError(f"input_features hold values beyond the range of the model's dtype {dtype} "
                         f"(largest magnitude {mel.abs().max().item():g})")
    return cast


def check_tokens(config: EchoConfig, name: str, ids, allow_ignore: bool = False, offset: int = 0) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8,
                                                        torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(ids.shape)}")
    if ids.shape[1] < 1 or offset + ids.shape[1] > config.n_text_ctx:
        raise ValueError(f"{name} has length {ids.shape[1]} (after {offset} cached), more than "
                         f"n_text_ctx = {config.n_text_ctx} or empty")
    valid = (ids >= 0) & (ids < config.vocab_size)
    if allow_ignore:
        valid |= ids == -100
    if not bool(valid.all()):
        bad = ids[~valid][0].item()
        allowed = "-100 or " if allow_ignore else ""
        raise ValueError(f"{name} holds token id {bad}; expected {allowed}ids in [0, vocab_size = "
                         f"{config.vocab_size})")
