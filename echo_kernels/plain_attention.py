"""plain_attention: softmax(q k^T / sqrt(h)) v on the flash kernels of echo_kernels.kernels.plain_attention.

No rotation, no bias, no window: the floor that echo_attention's kernels are measured against, with
their tiles and launch shapes (the benches and `python -m echo_kernels.aot` put the two side by side).
Where no Triton kernel serves the tensors, torch's scaled_dot_product_attention computes it.

Read in the order every op file of the package keeps: the public function, its dispatch, then the
registration of the kernels as a KernelOp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .backend import TRITON_IMPORT_ERROR, register_kernel, triton_serves, use_kernel
from .kernel_op import KernelOp
from .kernels import ATTENTION_HEAD_WIDTHS


def plain_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(h)) v. q: (B, H, Tq, h); k, v: (B, H, Tk, h) with Tk >= 1 and h one of the
    kernels' widths (32, 64, 128). Returns (B, H, Tq, h) in q's dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, h), got {tuple(t.shape)}")
    B, H, Tq, h = q.shape
    if h not in ATTENTION_HEAD_WIDTHS:
        raise ValueError(f"head width h must be one of {ATTENTION_HEAD_WIDTHS}, got {h}")
    checks.shape("k", k, (B, H, None, h), f"(B, H, Tk, h) = ({B}, {H}, Tk, {h})")
    Tk = k.shape[2]
    if Tk == 0:
        raise ValueError("k and v must hold at least one key (Tk >= 1): softmax over no key is undefined")
    checks.shape("v", v, (B, H, Tk, h), f"(B, H, Tk, h) = ({B}, {H}, {Tk}, {h})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    checks.same_device(q=q, k=k, v=v)
    return _dispatch(q, k, v)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def _dispatch(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The Triton kernels, or torch's attention where none serves (echo_kernels.backend decides)."""
    if use_kernel("plain_attention", q.device):
        out, _ = _OP(q, k, v)
        return out
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------------------------------------
# Registration: the launchers of the kernels, as the op echo_kernels::plain_attention
# --------------------------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out (B, H, Tq, h), lse (B, H, Tq) fp32, base 2)."""
    return _kernels.forward(q, k, v)


def _forward_fake(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels.backward(dout, q, k, v, out, lse)


def _backward_fake(dout, q, k, v, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_kernel("plain_attention", triton_serves, auto_on_cpu=False)
if TRITON_IMPORT_ERROR is None:
    from .kernels import plain_attention as _kernels

    _OP = KernelOp("plain_attention", _forward, _backward, forward_fake=_forward_fake,
                   backward_fake=_backward_fake, differentiable=("q", "k", "v"), save_outputs=True)
