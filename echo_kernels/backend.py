"""Which implementation of an op runs: `ECHO_BACKEND=reference|triton|auto` (default auto).

- reference: the plain-PyTorch maths of `echo_kernels.reference`, on any device.
- triton: the compiled kernel of the op; for CPU tensors only under `TRITON_INTERPRET=1` (tests).
- auto: the compiled kernel where the tensors' device has one, else the reference; for CPU tensors,
  echo_attention runs its blocked CPU path (echo_kernels.kernels.attention_cpu).

An op that has no compiled kernel for the device never pretends: with `triton` it raises, and with
`auto` it warns once that the reference is running in its place.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

try:  # the one import of optional Triton: without it the reference and the CPU path serve every call
    import triton  # noqa: F401

    TRITON_IMPORT_ERROR: str | None = None
except ImportError as error:
    TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"

BACKENDS = ("reference", "triton", "auto")

# op name -> (predicate(device): a compiled kernel serves tensors there, used by auto on the CPU?)
_KERNELS: dict[str, tuple[Callable[[torch.device], bool], bool]] = {}
_warned: set[object] = set()


def requested_backend() -> str:
    """The value of ECHO_BACKEND, checked."""
    value = os.environ.get("ECHO_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"ECHO_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_serves(device: torch.device) -> bool:
    """Whether the Triton kernels run tensors on `device`: CUDA ones whenever Triton imports, CPU ones
    only through the interpreter."""
    if TRITON_IMPORT_ERROR is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def register_kernel(op: str, serves: Callable[[torch.device], bool], *, auto_on_cpu: bool) -> None:
    """Declare that `op` has a compiled kernel for the devices where `serves(device)` is true.

    auto_on_cpu: whether ECHO_BACKEND=auto runs it for CPU tensors (the C++ extension) or leaves
    them to the reference (Triton kernels, which reach the CPU only through the interpreter).
    """
    _KERNELS[op] = (serves, auto_on_cpu)


def use_kernel(op: str, device: torch.device) -> bool:
    """Decide whether `op` on tensors of `device` runs its compiled kernel (True) or the reference."""
    backend = requested_backend()
    if backend == "reference":
        return False
    serves, auto_on_cpu = _KERNELS.get(op, (None, False))
    available = serves is not None and serves(device)
    if backend == "triton":
        if not available:
            hint = " (CPU tensors need TRITON_INTERPRET=1)" if device.type == "cpu" else ""
            raise RuntimeError(
                f"ECHO_BACKEND=triton, but echo_kernels has no compiled {op} for {device.type} tensors{hint}"
            )
        return True
    wanted = device.type != "cpu" or auto_on_cpu
    if wanted and not available:
        warn_once((op, device.type), f"echo_kernels: no compiled {op} for {device.type} tensors; "
                  f"running the reference", stacklevel=3)
    return wanted and available


def warn_once(key: object, message: str, stacklevel: int = 2) -> None:
    """Warn `message` the first time `key` comes, so a missing kernel is said once, not on every call.

    stacklevel counts from the caller of warn_once, as warnings.warn's does from its own caller.
    """
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)
