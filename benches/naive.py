"""The naive baseline: Echo's ops computed the way straightforward model code computes them.

- orthogonal_product: one dense h x h Givens matrix per rotation, multiplied in;
- echo_attention: every logit materialised, the relative bias gathered into a (H, Tq, Tk) tensor
  and the masks built densely, even when a window leaves most of them out;
- rotary_orthogonal: a matmul, then cos/sin tables, then an elementwise pass.

`naive_ops()` swaps them into the Echo model, so benchmarks can time the same model three ways:
compiled kernels, the reference path, and this.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from echo_kernels import reference


def orthogonal_product(thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool = True) -> Tensor:
    """M = G_1 ... G_N R (or R G_1 ... G_N) with every G_k formed densely and multiplied in: one
    batched h x h matrix product per rotation."""
    h = R.shape[-1]
    eye = torch.eye(h, dtype=R.dtype, device=R.device)
    M = R
    order = range(pairs.shape[0] - 1, -1, -1) if givens_first else range(pairs.shape[0])
    for k, (i, j) in zip(order, pairs[list(order)].tolist()):
        c, s = torch.cos(thetas[..., k]), torch.sin(thetas[..., k])
        G = eye.expand(*thetas.shape[:-1], h, h).clone()
        G[..., i, i] = c
        G[..., j, j] = c
        G[..., i, j] = -s
        G[..., j, i] = s
        M = G @ M if givens_first else M @ G
    return M


def echo_attention(q, k, v, M, w, s, bias, *, window=None, causal=False, q_offset=0, k_offset=0,
                   key_padding_mask=None, layout="half_split") -> Tensor:
    """All Tq x Tk logits at once, with a dense bias and dense masks."""
    Tq, Tk, h = q.shape[2], k.shape[2], q.shape[3]
    q_pos = torch.arange(q_offset, q_offset + Tq, device=q.device)
    k_pos = torch.arange(k_offset, k_offset + Tk, device=q.device)
    q_rot = reference.apply_rope(q, reference.rope_angles(w.to(q.dtype), s, q_pos), layout) @ M.to(q.dtype)
    k_rot = reference.apply_rope(k, reference.rope_angles(w.to(k.dtype), s, k_pos), layout) @ M.to(k.dtype)
    logits = q_rot @ k_rot.transpose(-1, -2) / math.sqrt(h)
    if bias is not None:
        logits = logits + reference.relative_bias(bias.to(logits.dtype), q_pos, k_pos)
    keep = reference.attention_keep(q_pos, k_pos, window, causal)[None, None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    logits = logits.masked_fill(~keep, -math.inf)
    any_key = keep.any(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~any_key, 0.0), dim=-1) * any_key
    return probs @ v


rotary_orthogonal = reference.rotary_orthogonal


@contextlib.contextmanager
def naive_ops():
    """Within the block, the Echo model computes with the naive ops above."""
    import echo.attention
    import echo.positional

    patches = [
        (echo.positional, "orthogonal_product", orthogonal_product),
        (echo.positional, "rotary_orthogonal", rotary_orthogonal),
        (echo.attention, "echo_attention", echo_attention),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, fn in patches:
            setattr(module, name, fn)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
