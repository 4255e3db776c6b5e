"""Linear layers and the tied logits through oneDNN's inner product on the CPU.

On float32 CPU tensors torch.nn.functional.linear hands x @ W^T to the BLAS with W transposed; oneDNN's
inner product (the primitive torch.compile's CPU linear uses) reads W (out, in) as stored. Measured on
a 2-core x86-64 CPU (docs/model.md, Encoder and decoder), it takes about half the time for the logits
(a 51865 x 384 embedding, from one decoding row to a training batch), 10-25% less for the encoder's
1500-row products, and 25% less for one row against a 1280 x 1280 weight; for a few rows against a
small weight it is the slower, and those keep F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echo_kernels.backend import requested_backend

_INNER_PRODUCT = (getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available()
                  else None)
# Below both, F.linear measured as fast or faster (few rows against a small weight).
MIN_ROWS = 256
MIN_WEIGHT_ELEMENTS = 1 << 20


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x: (..., in), weight: (out, in), bias: (out,) or None -> (..., out): F.linear's maths."""
    if uses_inner_product(x, weight):
        return _InnerProduct.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def tied_logits(x: Tensor, embedding: Tensor) -> Tensor:
    """x: (..., D), embedding: (V, D) -> logits (..., V) float32, x @ embedding^T."""
    return linear(x, embedding.to(x.dtype)).float()


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def uses_inner_product(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` runs oneDNN's inner product: float32 CPU tensors in eager mode (a compiled graph
    picks its own kernel), enough rows or a large enough weight, unless ECHO_BACKEND=reference asks for
    plain PyTorch throughout."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (_INNER_PRODUCT is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (rows >= MIN_ROWS or weight.numel() >= MIN_WEIGHT_ELEMENTS)
            and _plain(x) and _plain(weight) and not torch.compiler.is_compiling()
            and requested_backend() != "reference")


def _plain(t: Tensor) -> bool:
    """Not a tensor subclass (a sharded DTensor, a fake tensor): those keep F.linear."""
    return type(t) in (Tensor, nn.Parameter)


class _InnerProduct(torch.autograd.Function):
    """x @ weight^T + bias by oneDNN; the backward is autograd's for F.linear."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _INNER_PRODUCT(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        dx = grad @ weight if ctx.needs_input_grad[0] else None
        dw = rows.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        db = rows.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db
