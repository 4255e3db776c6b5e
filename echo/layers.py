"""Normalisation and feed-forward layers: the standard ones and the reference code's "s1" variants."""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear

_state = threading.local()


def recomputing() -> bool:
    """True while activation checkpointing re-runs a block's forward during backward."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recompute_scope():
    previous = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


def checkpoint_contexts():
    """context_fn for torch.utils.checkpoint: marks the recomputation so that it has no side effects."""
    return contextlib.nullcontext(), _recompute_scope()


class S1LayerNorm(nn.Module):
    """(x - mean) / (unbiased std + 1e-6) * weight + bias over the last dim (the reference's LayerNorm)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True, unbiased=True)
        return (x - mean) / (std + self.eps) * self.weight + self.bias


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 whatever the input dtype (as whisper does)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


def layer_norm(kind: str, d: int) -> nn.Module:
    return S1LayerNorm(d) if kind == "s1" else LayerNorm(d)


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (..., C) whose running statistics are not updated twice under checkpointing.

    A checkpointed block runs its forward again in backward; a plain BatchNorm would then fold the
    same batch into its running mean and variance a second time.
    """

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.training and recomputing():
            # same call as the first forward (so it saves the same tensors), on copies of the stats
            momentum = self.momentum if self.momentum is not None else 0.0
            y = F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                             True, momentum, self.eps)
        else:
            y = super().forward(x)
        return y.reshape(shape)


class MLP(nn.Module):
    """x: (B, T, D) -> (B, T, D).

    "gelu": Linear(D, 4D), GELU, Linear(4D, D).
    "s1": Linear, BatchNorm, ReLU, Dropout(0.001), GELU, Linear, BatchNorm, ReLU, Dropout(0.001) (the
    reference's MLP; its output is never negative).
    """

    def __init__(self, d: int, kind: str = "gelu"):
        super().__init__()
        if kind == "s1":
            self.net = nn.Sequential(
                Linear(d, 4 * d), BatchNorm(4 * d), nn.ReLU(), nn.Dropout(0.001), nn.GELU(),
                Linear(4 * d, d), BatchNorm(d), nn.ReLU(), nn.Dropout(0.001),
            )
        else:
            self.net = nn.Sequential(Linear(d, 4 * d), nn.GELU(), Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
