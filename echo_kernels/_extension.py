"""The compiled extension echo_kernels._C (csrc/) and the Python side of its ops.

Importing `_C` registers `torch.ops.echo_kernels.orthogonal_product` and its backward with the
dispatcher: a CPU kernel always, a CUDA kernel when the package was built with the CUDA part.
echo_kernels.orthogonal adds their fakes and autograd (a KernelOp), which torch.compile, opcheck,
checkpointing and FSDP need to see one op.

If the extension is missing (not built, or built against another torch), `LOAD_ERROR` says why and
the ops fall back to the reference; echo_kernels.backend warns once per device type when that
happens, and `python -m echo_kernels.info` prints it.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.echo_kernels.*)

    LOADED = True
    LOAD_ERROR: str | None = None
except (ImportError, OSError) as error:  # not built, or built for another torch/Python
    LOADED = False
    LOAD_ERROR = f"{type(error).__name__}: {error}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.echo_kernels.<op> has a kernel for dispatch_key ("CPU", "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"echo_kernels::{op}", dispatch_key)


# Read once: the registrations are made when _C is imported, and torch.compile traces `serves`.
_CPU = has_kernel("orthogonal_product", "CPU")
_CUDA = has_kernel("orthogonal_product", "CUDA")


def cuda_compiled() -> bool:
    """True when the extension was built with its CUDA part."""
    return _CUDA


def serves(device: torch.device) -> bool:
    """Whether the compiled orthogonal_product runs tensors on `device`."""
    return (device.type == "cpu" and _CPU) or (device.type == "cuda" and _CUDA)
