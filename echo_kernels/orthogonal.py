"""orthogonal_product: the Givens-orthogonal matrix M = G_1 ... G_N R or R G_1 ... G_N (ECHO_SPEC 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, reference
from .backend import use_kernel


def orthogonal_product(thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool = True) -> Tensor:
    """M = G_1 ... G_N R if givens_first else R G_1 ... G_N.

    thetas: (..., N) angles; pairs: (N, 2) int64, i != j, both in [0, h); R: (..., h, h).
    Leading dims of thetas and R broadcast. Returns M: (broadcast(...), h, h).
    """
    checks.floating("thetas", thetas)
    checks.floating("R", R)
    checks.same_device(thetas=thetas, pairs=pairs, R=R)
    if R.dim() < 2 or R.shape[-1] != R.shape[-2]:
        raise ValueError(f"R must have shape (..., h, h), got {tuple(R.shape)}")
    if thetas.dim() < 1:
        raise ValueError("thetas must have shape (..., N), got a 0-d tensor")
    checks.index_pairs(pairs, thetas.shape[-1], R.shape[-1])
    try:
        torch.broadcast_shapes(thetas.shape[:-1], R.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"leading dims of thetas {tuple(thetas.shape[:-1])} and R {tuple(R.shape[:-2])} do not broadcast"
        ) from None
    if use_kernel("orthogonal_product", R.device):
        raise NotImplementedError  # the compiled op registers itself here
    return reference.orthogonal_product(thetas, pairs, R, givens_first)
