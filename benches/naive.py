"""The naive baseline: Echo's maths computed the way straightforward model code computes it.

- the Givens rotations: a dense h x h matrix G_k per rotation, and each one multiplied into the
  activations in turn (x @ G_1 @ ... @ G_N @ R, as the formula x (prod G) R reads), site by site;
- echo_attention: q and k rotated as the formula reads (q M then RoPE, with M applied factor by
  factor, not folded into the projections), every logit materialised, the relative bias gathered
  into a (H, Tq, Tk) tensor and the masks built densely, even when a window leaves most of them out;
- rotary_orthogonal: the rotations above, then cos/sin tables, then an elementwise pass.

Angles, their cos and sin and the rotation by them are float32 whatever the activations' dtype, as
in the model: the baseline differs in how it computes, not in what.

`naive_ops()` swaps them into the Echo model, so benchmarks can time the same model three ways:
compiled kernels, the reference path, and this. `orthogonal_product` is the per-rotation loop that
builds M itself, the peer of the compiled op in bench_orthogonal.py.
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


class GivensChain:
    """M = G_1 ... G_N R (or R G_1 ... G_N) kept as its factors, applied to activations one by one."""

    def __init__(self, thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool):
        self.thetas, self.pairs, self.R, self.givens_first = thetas, pairs.tolist(), R, givens_first

    def givens(self, k: int) -> Tensor:
        i, j = self.pairs[k]
        c, s = torch.cos(self.thetas[k]), torch.sin(self.thetas[k])
        G = torch.eye(self.R.shape[-1], dtype=self.R.dtype, device=self.R.device)
        G[i, i], G[j, j], G[i, j], G[j, i] = c, c, -s, s
        return G

    def apply(self, x: Tensor) -> Tensor:
        """x (..., h) -> x @ M, one dense product per factor."""
        R = self.R.to(x.dtype)
        if not self.givens_first:
            x = x @ R
        for k in range(len(self.pairs)):
            x = x @ self.givens(k).to(x.dtype)
        return x @ R if self.givens_first else x


def site_chains(sites) -> dict:
    """{site: its GivensChain} for every Givens site, site by site (replaces
    echo.positional.site_matrices)."""
    return {site: GivensChain(site.thetas, site.pairs, site.R, site.givens_first) for site in sites}


def _times_m(x: Tensor, M) -> Tensor:
    return M.apply(x) if isinstance(M, GivensChain) else x @ M.to(x.dtype)


def _rope(u: Tensor, w: Tensor, s, positions: Tensor, layout: str) -> Tensor:
    """RoPE(u) at `positions` with the angles, their cos and sin and the rotation in float32, as the
    model computes them, whatever u's dtype (in bf16 the angle of position 1500 would be off by whole
    radians); the result in u's dtype."""
    s = s.float() if isinstance(s, Tensor) else s
    phi = reference.rope_angles(w.float(), s, positions)
    return reference.apply_rope(u.float(), phi, layout).to(u.dtype)


def _rotate(u: Tensor, M, w: Tensor, s, positions: Tensor, layout: str, rotation: str) -> Tensor:
    """RoPE(u M) ("m_then_rope") or RoPE(u) M ("rope_then_m"); M None is the identity."""
    if M is None:
        return _rope(u, w, s, positions, layout)
    if rotation == "m_then_rope":
        return _rope(_times_m(u, M), w, s, positions, layout)
    return _times_m(_rope(u, w, s, positions, layout), M)


def echo_attention(q, k, v, M, w, s, bias, *, window=None, causal=False, q_offset=0, k_offset=0,
                   key_padding_mask=None, layout="half_split", rotation="m_then_rope",
                   keys_rotated=False) -> Tensor:
    """All Tq x Tk logits at once, with a dense bias and dense masks (keys_rotated: k is k' already)."""
    Tq, Tk, h = q.shape[2], k.shape[2], q.shape[3]
    q_pos = torch.arange(q_offset, q_offset + Tq, device=q.device)
    k_pos = torch.arange(k_offset, k_offset + Tk, device=q.device)
    q_rot = _rotate(q, M, w, s, q_pos, layout, rotation)
    k_rot = k if keys_rotated else _rotate(k, M, w, s, k_pos, layout, rotation)
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


def rotary_orthogonal(x, M, w, s=1.0, offset=0, layout="half_split") -> Tensor:
    """RoPE(x @ M) with M applied factor by factor, then cos/sin tables and an elementwise pass."""
    positions = torch.arange(offset, offset + x.shape[1], device=x.device)
    u = _times_m(x, M).transpose(1, 2)  # (B, H, T, h)
    return _rope(u, w, s, positions, layout).transpose(1, 2)


@contextlib.contextmanager
def naive_ops():
    """Within the block, the Echo model computes with the naive ops above (M applied by the attention op,
    not folded into the projections; cached keys rotated by the op at every step)."""
    import echo.attention
    import echo.model
    import echo.positional

    patches = [
        (echo.model, "site_matrices", site_chains),
        (echo.positional, "rotary_orthogonal", rotary_orthogonal),
        (echo.attention, "echo_attention", echo_attention),
        (echo.attention, "FOLD_M", False),
        (echo.attention, "ROTATE_CACHED_KEYS", False),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, fn in patches:
            setattr(module, name, fn)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
