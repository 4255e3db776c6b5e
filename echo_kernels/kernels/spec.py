"""KernelSpec: one launch configuration of a Triton kernel, which each kernel module lists in its
`aot_specs(arch)` for echo_kernels.aot to compile ahead of time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field


@dataclass
class KernelSpec:
    """One launch configuration of a Triton kernel, as `triton.compile` needs it."""

    name: str
    fn: object  # triton JITFunction
    signature: dict[str, str]  # argument -> "*fp32", "i32", ..., "constexpr"
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def signature_of(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument of `fn`: pointers as given, constexprs as such, the rest i32."""
    py = getattr(fn, "fn", fn)  # JITFunction or interpreter wrapper around the Python function
    names = list(inspect.signature(py).parameters)
    return {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}


def pointer_types() -> dict:
    """{torch dtype: Triton pointer type} of the tensors the launchers pass (a bool mask as its bytes)."""
    import torch

    return {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
            torch.int32: "*i32", torch.bool: "*u8"}


# The input dtypes the report lists launches at, by the names it gives them.
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def dtype_named(dt: str):
    """The torch dtype of a report's dtype name ("bf16", "fp16", "fp32")."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]


def precision_of(dt: str) -> str:
    """The PRECISION constexpr of `dt` inputs' launches: fp32 is multiplied exactly (ieee), the 2-byte
    types on tensor cores ("tf32", which Triton ignores for them); attention_common.precision at run time."""
    return "ieee" if dt == "fp32" else "tf32"
