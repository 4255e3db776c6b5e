"""The three ops written the slow, literal way, to check the reference against: dense matrices
multiplied out and one logit at a time, float64 and differentiable, for tiny shapes only.

Nothing here shares code with echo_kernels.reference: RoPE is a dense (h, h) rotation per position
instead of pairwise updates, the product of Givens rotations is formed matrix by matrix, and the
attention masks are the spec's conditions tested for each (query, key).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def givens(h: int, i: int, j: int, theta: Tensor) -> Tensor:
    """Dense G(i, j, theta): the identity but G[i,i] = G[j,j] = cos, G[i,j] = -sin, G[j,i] = sin."""
    G = torch.eye(h, dtype=torch.float64)
    G = G.index_put((torch.tensor([i, j, i, j]), torch.tensor([i, j, j, i])),
                    torch.stack([theta.cos(), theta.cos(), -theta.sin(), theta.sin()]))
    return G


def orthogonal_product(thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool) -> Tensor:
    """G_1 G_2 ... G_N R (givens_first) or R G_1 ... G_N, every batch entry on its own."""
    h = R.shape[-1]
    batch = torch.broadcast_shapes(thetas.shape[:-1], R.shape[:-2])
    thetas, R = thetas.expand(*batch, thetas.shape[-1]), R.expand(*batch, h, h)
    out = []
    for index in itertools.product(*map(range, batch)):
        G = torch.eye(h, dtype=torch.float64)
        for k, (i, j) in enumerate(pairs.tolist()):
            G = G @ givens(h, i, j, thetas[index][k])
        out.append(G @ R[index] if givens_first else R[index] @ G)
    return torch.stack(out).reshape(*batch, h, h)


def rope_matrix(phi: Tensor, layout: str) -> Tensor:
    """(h, h) Q with RoPE(u) = u @ Q for a row u: pair m = (u[2m], u[2m+1]) turned by phi[m], written
    at (m, m + h/2) in half_split and at (2m, 2m+1) in interleaved."""
    half = phi.shape[0]
    rows, cols, values = [], [], []
    for m in range(half):
        a, b = (m, m + half) if layout == "half_split" else (2 * m, 2 * m + 1)
        # a' = u1 cos - u2 sin, b' = u1 sin + u2 cos with u1 = u[2m], u2 = u[2m+1]
        rows += [2 * m, 2 * m + 1, 2 * m, 2 * m + 1]
        cols += [a, a, b, b]
        values += [phi[m].cos(), -phi[m].sin(), phi[m].sin(), phi[m].cos()]
    Q = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    return Q.index_put((torch.tensor(rows), torch.tensor(cols)), torch.stack(values))


def rotary_orthogonal(x: Tensor, M: Tensor, w: Tensor, s: Tensor | float, offset: int, layout: str) -> Tensor:
    """y[:, t] = x[:, t] @ M @ Q(s (offset + t) w), one position at a time.   x: (B, T, H, h)."""
    rows = [x[:, t] @ M @ rope_matrix(s * (offset + t) * w, layout) for t in range(x.shape[1])]
    return torch.stack(rows, dim=1)


def attention(q, k, v, M, w, s, bias, *, window, causal, q_offset, k_offset, key_padding_mask, layout,
              rotation="m_then_rope"):
    """Every logit on its own, each mask a condition on the positions (docs/model.md, Attention).

    q: (B, H, Tq, h); k, v: (B, H, Tk, h); M: (h, h) or None (the identity); bias: (2n - 1, H) or
    None. rotation "m_then_rope": q M then RoPE; "rope_then_m": RoPE then M. A query with no key gives 0.
    """
    B, H, Tq, h = q.shape
    Tk = k.shape[2]
    M = torch.eye(h, dtype=torch.float64) if M is None else M
    left, right = (window, window) if isinstance(window, int) else window or (None, None)
    rope_matrices = lambda t: rope_matrix(s * t * w, layout)
    if rotation == "m_then_rope":
        rope = lambda t, first=M: first @ rope_matrices(t)  # row vectors: u M, then RoPE
        M = torch.eye(h, dtype=torch.float64)  # nothing after RoPE
    else:
        rope = rope_matrices
    rows = []
    for b, i in itertools.product(range(B), range(Tq)):
        pi = q_offset + i
        qi = q[b, :, i] @ rope(pi) @ M  # (H, h)
        logits, values = [], []
        for j in range(Tk):
            pj = k_offset + j
            if causal and pj > pi:
                continue
            if left is not None and not (pi - left <= pj <= pi + right):
                continue
            if key_padding_mask is not None and key_padding_mask[b, j]:
                continue
            kj = k[b, :, j] @ rope(pj) @ M
            logit = (qi * kj).sum(-1) / math.sqrt(h)  # (H,)
            if bias is not None:
                n = (bias.shape[0] + 1) // 2
                logit = logit + bias[min(max(pi - pj, -(n - 1)), n - 1) + n - 1]
            logits.append(logit)
            values.append(v[b, :, j])
        if not logits:
            rows.append(torch.zeros(H, h, dtype=torch.float64))
            continue
        logits = torch.stack(logits)  # (keys, H)
        e = (logits - logits.max(0).values).exp()
        rows.append(((e / e.sum(0))[:, :, None] * torch.stack(values)).sum(0))
    return torch.stack(rows).reshape(B, Tq, H, h).transpose(1, 2)
