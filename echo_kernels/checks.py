"""Argument checks shared by the ops: a wrong shape, dtype, device, window or layout is a ValueError
that names the argument, raised before any kernel or reference code runs."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import LAYOUTS, ROTATIONS

# The Triton kernels form element offsets in int32 (docs/model.md, "Registration"): a tensor they index
# must span fewer elements than this, or an offset would wrap to another address.
INT32_OFFSETS = 2**31


def floating(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def shape(name: str, t: Tensor, expected: tuple, meaning: str) -> None:
    """expected holds ints or None (any size) per dim."""
    ok = t.dim() == len(expected) and all(e is None or e == n for e, n in zip(expected, t.shape))
    if not ok:
        raise ValueError(f"{name} must have shape {meaning}, got {tuple(t.shape)}")


def scale(name: str, s: Tensor | float) -> None:
    """A float, or a floating-point tensor of shape () or (1,): the ops broadcast s against the
    (T, h/2) rotation angles, so a (1, 1) tensor would add a dimension to them."""
    if isinstance(s, Tensor):
        floating(name, s)
        if s.dim() > 1 or s.numel() != 1:
            raise ValueError(f"{name} must be a scalar: a float or a tensor of shape () or (1,), "
                             f"got shape {tuple(s.shape)}")
    elif not isinstance(s, (int, float)) or isinstance(s, bool):
        raise ValueError(f"{name} must be a float or a scalar tensor, got {type(s).__name__}")


def non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def layout(value: str) -> None:
    if value not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {value!r}")


def rotation(value: str) -> None:
    if value not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS} (where M sits relative to RoPE), "
                         f"got {value!r}")


def window(value) -> None:
    """None, an int w >= 0, or a pair (left, right) of ints >= 0."""
    if value is None:
        return
    if isinstance(value, (tuple, list)) and len(value) == 2:
        for side, v in zip(("left", "right"), value):
            non_negative_int(f"window {side}", v)
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"window must be None, an int >= 0 or a pair (left, right) of them, got {value!r}")


def index_pairs(pairs: Tensor, n: int, h: int) -> None:
    """pairs: (n, 2) integer indices in [0, h) with i != j in each row."""
    if not isinstance(pairs, Tensor) or pairs.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pairs must be an int64 tensor, got {getattr(pairs, 'dtype', type(pairs))}")
    shape("pairs", pairs, (n, 2), f"(N, 2) with N = thetas.shape[-1] = {n}")
    if n == 0:
        return
    host = pairs.detach().cpu()
    if bool((host < 0).any()) or bool((host >= h).any()):
        raise ValueError(f"pairs must index rows 0..{h - 1} of R, got values in "
                         f"[{int(host.min())}, {int(host.max())}]")
    same = (host[:, 0] == host[:, 1]).nonzero()
    if same.numel():
        k = int(same[0, 0])
        raise ValueError(f"pairs[{k}] = ({int(host[k, 0])}, {int(host[k, 1])}): "
                         f"a Givens rotation needs i != j")


def span(t: Tensor) -> int:
    """Elements from t's first in memory to its last, inclusive: one more than the largest offset from
    t's pointer that its strides reach (t.numel() for a dense tensor, less for a broadcast one)."""
    elements = t.numel()
    if elements == 0 or t.is_contiguous():  # the common case, without the sum: launchers check every call
        return elements
    return 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))


def int32_offsets(operands: dict[str, Tensor | int | None]) -> None:
    """Every tensor a Triton launch indexes, by name, given as itself or, not yet allocated, as its
    element count, spans fewer than 2**31 elements; a ValueError names the first that does not."""
    for name, operand in operands.items():
        elements = span(operand) if isinstance(operand, Tensor) else operand or 0
        if elements >= INT32_OFFSETS:
            raise ValueError(f"{name} spans {elements:,} elements, more than the Triton kernels' int32 "
                             "offsets reach (2**31 - 1): split the batch into calls below it")
