"""The decoder's output projection: logits tied to the token embedding.

x @ E^T with E (V, D) stored row by row is a (rows, D) x (D, V) product that, when decoding, is one
row against the whole vocabulary: a matrix-vector product bound by reading E. On the CPU torch.matmul
hands it to the BLAS with E transposed, which reads it at about a third of the machine's bandwidth;
oneDNN's inner product (the primitive torch.compile's CPU linear uses) reads E as stored and takes
half the time, at every row count from one decoding step to a training batch (docs/model.md, Encoder and decoder).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from echo_kernels.backend import requested_backend

_INNER_PRODUCT = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def tied_logits(x: Tensor, embedding: Tensor) -> Tensor:
    """x: (..., D), embedding: (V, D) -> logits (..., V) float32, x @ embedding^T."""
    weight = embedding.to(x.dtype)
    if uses_inner_product(x, weight):
        return _InnerProduct.apply(x, weight).float()
    return (x @ weight.T).float()


def uses_inner_product(x: Tensor, weight: Tensor) -> bool:
    """Whether tied_logits runs oneDNN's inner product: float32 CPU tensors in eager mode (a compiled
    graph picks its own kernel), unless ECHO_BACKEND=reference asks for plain PyTorch throughout."""
    return (_INNER_PRODUCT is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and _plain(x) and _plain(weight) and not torch.compiler.is_compiling()
            and requested_backend() != "reference")


def _plain(t: Tensor) -> bool:
    """Not a tensor subclass (a sharded DTensor, a fake tensor): those keep the plain product."""
    return type(t) in (Tensor, nn.Parameter)


class _InnerProduct(torch.autograd.Function):
    """x @ weight^T by oneDNN; the backward is autograd's for a matmul."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _INNER_PRODUCT(x, weight, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        dx = grad @ weight if ctx.needs_input_grad[0] else None
        dw = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return dx, dw
