"""Plain-PyTorch maths of the three Echo ops: the oracle of every test and the baseline of every bench.

Written for clarity, not speed. Every function works in float64 and keeps the autograd graph, so
`torch.autograd.gradcheck` runs on it directly. Half-precision inputs are computed in float32 and
cast back. Shapes and conventions follow docs/model.md (row vectors, `x @ A`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LAYOUTS = ("half_split", "interleaved")
ROTATIONS = ("m_then_rope", "rope_then_m")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32 and float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------------------
# Givens-orthogonal matrix (docs/model.md, Givens-orthogonal matrix)
# --------------------------------------------------------------------------------------------------


def orthogonal_product(thetas: Tensor, pairs: Tensor, R: Tensor, givens_first: bool = True) -> Tensor:
    """M = G_1 ... G_N R (givens_first) or R G_1 ... G_N.

    thetas: (..., N) angles; pairs: (N, 2) int64 index pairs (i != j); R: (..., h, h).
    Leading dims of thetas and R broadcast. Returns M: (broadcast(...), h, h).

    G(i, j, theta) is the identity except G[i,i] = G[j,j] = cos, G[i,j] = -sin, G[j,i] = sin, so no G
    is ever formed: left-multiplying by G mixes rows i and j, right-multiplying mixes columns i and j.
    The product is built from the side that touches R first: G_N is applied to R before G_{N-1}, and
    R G_1 before G_2.
    """
    dtype = torch.promote_types(thetas.dtype, R.dtype)
    compute = _compute_dtype(dtype)
    batch = torch.broadcast_shapes(thetas.shape[:-1], R.shape[:-2])
    h = R.shape[-1]
    M = R.to(compute).expand(*batch, h, h)
    thetas = thetas.to(compute).expand(*batch, thetas.shape[-1])
    if not givens_first:
        M = M.transpose(-1, -2)  # R G = (G^T R^T)^T, and G(theta)^T = G(-theta)
        thetas = -thetas
    order = range(pairs.shape[0] - 1, -1, -1) if givens_first else range(pairs.shape[0])
    for k in order:
        i, j = int(pairs[k, 0]), int(pairs[k, 1])
        cos = torch.cos(thetas[..., k, None])
        sin = torch.sin(thetas[..., k, None])
        rows = M[..., [i, j], :]  # a copy: autograd keeps two rows alive, not the whole matrix
        row_i, row_j = rows[..., 0, :], rows[..., 1, :]
        M = M.clone()
        M[..., i, :] = cos * row_i - sin * row_j
        M[..., j, :] = sin * row_i + cos * row_j
    if not givens_first:
        M = M.transpose(-1, -2)
    return M.to(dtype)


# --------------------------------------------------------------------------------------------------
# Rotary embedding (docs/model.md, Rotary embedding)
# --------------------------------------------------------------------------------------------------


def rope_angles(w: Tensor, s: Tensor | float, positions: Tensor) -> Tensor:
    """phi[t, m] = (s * positions[t]) * w[m].   w: (h/2,), positions: (T,) -> phi: (T, h/2)."""
    return (s * positions.to(w.dtype))[:, None] * w[None, :]


def apply_rope(u: Tensor, phi: Tensor, layout: str = "half_split") -> Tensor:
    """Rotate the pairs (u[2m], u[2m+1]) of u by phi and write them in `layout`.

    u: (..., T, h); phi: (T, h/2) broadcast over the leading dims. Returns (..., T, h).
    """
    x1, x2 = u[..., 0::2], u[..., 1::2]
    cos, sin = torch.cos(phi), torch.sin(phi)
    a = x1 * cos - x2 * sin
    b = x1 * sin + x2 * cos
    if layout == "half_split":
        return torch.cat([a, b], dim=-1)
    return torch.stack([a, b], dim=-1).flatten(-2)


def rotary_orthogonal(
    x: Tensor, M: Tensor, w: Tensor, s: Tensor | float = 1.0, offset: int = 0, layout: str = "half_split"
) -> Tensor:
    """y = RoPE(x @ M) at positions offset + t.

    x: (B, T, H, h); M: (h, h); w: (h/2,); s: scalar. Returns y: (B, T, H, h) in x's dtype.
    """
    compute = _compute_dtype(x.dtype)
    T = x.shape[1]
    positions = torch.arange(offset, offset + T, device=x.device)
    phi = rope_angles(w.to(compute), _as_compute(s, compute), positions)  # (T, h/2)
    # one (B T H, h) x (h, h) product: matmul would take a strided x as B T products against copies of M
    u = (x.to(compute).reshape(-1, x.shape[-1]) @ M.to(compute)).view(x.shape)
    u = u.transpose(1, 2)  # (B, H, T, h): T next to h for apply_rope
    return apply_rope(u, phi, layout).transpose(1, 2).to(x.dtype)


def _as_compute(s: Tensor | float, dtype: torch.dtype) -> Tensor | float:
    return s.to(dtype) if isinstance(s, Tensor) else s


# --------------------------------------------------------------------------------------------------
# Attention (docs/model.md, Attention)
# --------------------------------------------------------------------------------------------------


# A window side that reaches every key: echo_attention refuses positions from 2**30 on, so |i - j| stays
# below it, and as an int it is the one representation of "unbounded" on every path down to the kernels.
UNBOUNDED = 1 << 30


def window_bounds(window: int | tuple[int, int] | None, causal: bool = False) -> tuple[int, int]:
    """(left, right) of the band i - left <= j <= i + right: None is UNBOUNDED on both sides, causal
    caps right at 0, and no side exceeds UNBOUNDED."""
    if window is None:
        left, right = UNBOUNDED, UNBOUNDED
    elif isinstance(window, int):
        left, right = window, window
    else:
        left, right = window
    return min(left, UNBOUNDED), min(right, 0 if causal else UNBOUNDED)


def attention_keep(
    q_pos: Tensor, k_pos: Tensor, window: int | tuple[int, int] | None, causal: bool
) -> Tensor:
    """Boolean (Tq, Tk): key j is visible to query i (causal and band masks, absolute positions)."""
    left, right = window_bounds(window, causal)
    rel = q_pos[:, None] - k_pos[None, :]  # i - j
    return (rel <= left) & (-rel <= right)


def relative_bias(bias: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """bias[clamp(i - j, -(n-1), n-1) + n - 1, head] as (H, Tq, Tk).   bias: (2n-1, H)."""
    n = (bias.shape[0] + 1) // 2
    rel = (q_pos[:, None] - k_pos[None, :]).clamp(-(n - 1), n - 1) + (n - 1)
    return bias[rel].permute(2, 0, 1)


def weighted_values(probs: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
    """probs @ v with only the kept keys contributing.   probs: (..., C, K); v: (..., K, h); keep:
    bool, broadcastable to probs, or None (every key kept). Returns (..., C, h).

    A masked key's probability is 0, but 0 * NaN is NaN: a non-finite value at a padded or
    causal-future key would reach every query through the plain product. So when v has non-finite
    entries (checked here: this path is for verification and the CPU), those entries are left out of
    the product and added back as p * v only where their key is kept, which is what the formula says.
    """
    finite = torch.isfinite(v)
    if keep is None or bool(finite.all()):
        return probs @ v
    out = probs @ v.masked_fill(~finite, 0.0)
    # keys holding a non-finite value in any batch row: usually few, so their (C, K', h) terms are cheap
    cols = (~finite).any(-1).reshape(-1, v.shape[-2]).any(0).nonzero()[:, 0]
    v_bad = v.masked_fill(finite, 0.0)[..., cols, :].unsqueeze(-3)  # (..., 1, K', h)
    kept = keep.expand(probs.shape)[..., cols].unsqueeze(-1)  # (..., C, K', 1)
    # masked before the product, so that its gradient is not 0 * NaN either
    return out + (probs[..., cols].unsqueeze(-1) * v_bad.masked_fill(~kept, 0.0)).sum(-2)


def rotate_for_attention(u: Tensor, M: Tensor | None, phi: Tensor | None, layout: str,
                         rotation: str) -> Tensor:
    """q' or k' (docs/model.md, Attention).   u: (..., T, h); M: (h, h) or None (the identity); phi: (T, h/2),
    or None for no RoPE (u rotated already: then u @ M in either order).

    "m_then_rope": RoPE(u @ M), the rotation choosing the basis in which RoPE's frequencies act.
    "rope_then_m": RoPE(u) @ M, whose logits see M only through M M^T.
    """
    if phi is None:
        return u @ M if M is not None else u
    if M is None:
        return apply_rope(u, phi, layout)
    if rotation == "m_then_rope":
        return apply_rope(u @ M, phi, layout)
    return apply_rope(u, phi, layout) @ M


def echo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    M: Tensor | None,
    w: Tensor,
    s: Tensor | float,
    bias: Tensor | None,
    *,
    window: int | tuple[int, int] | None = None,
    causal: bool = False,
    q_offset: int = 0,
    k_offset: int = 0,
    key_padding_mask: Tensor | None = None,
    layout: str = "half_split",
    rotation: str = "m_then_rope",
    keys_rotated: bool = False,
    query_chunk: int = 256,
) -> Tensor:
    """softmax(q' k'^T / sqrt(h) + bias + masks) v, with rows of no key set to zero, where

        q' = RoPE(q @ M), k' = RoPE(k @ M)     rotation = "m_then_rope"
        q' = RoPE(q) @ M, k' = RoPE(k) @ M     rotation = "rope_then_m"

    q: (B, H, Tq, h); k, v: (B, H, Tk, h); M: (h, h) or None (the identity: then both orders are
    plain RoPE); w: (h/2,), or None for no RoPE (q and k rotated already); s: scalar; bias: (2n-1, H) or
    None; key_padding_mask: (B, Tk) bool, True = padded; keys_rotated: k is k' already (q alone is rotated).
    Query i sits at q_offset + i, key j at k_offset + j. Returns (B, H, Tq, h) in q's dtype.

    Queries are taken `query_chunk` at a time, and with a finite window only the keys the band can
    reach are looked at, so local attention costs O(T w) time and memory here too.
    """
    compute = _compute_dtype(q.dtype)
    Tq, Tk, h = q.shape[2], k.shape[2], q.shape[3]
    q_pos_all = torch.arange(q_offset, q_offset + Tq, device=q.device)
    k_pos_all = torch.arange(k_offset, k_offset + Tk, device=q.device)
    M = M.to(compute) if M is not None else None
    if w is not None:
        w, s = w.to(compute), _as_compute(s, compute)

    def rotated(u: Tensor, positions: Tensor) -> Tensor:
        phi = None if w is None else rope_angles(w, s, positions)
        return rotate_for_attention(u.to(compute), M, phi, layout, rotation)

    q_rot = rotated(q, q_pos_all)
    k_rot = k.to(compute) if keys_rotated else rotated(k, k_pos_all)
    v = v.to(compute)
    bias = bias.to(compute) if bias is not None else None
    left, right = window_bounds(window, causal)

    chunks = []
    for start in range(0, Tq, query_chunk):
        stop = min(start + query_chunk, Tq)
        q_pos = q_pos_all[start:stop]
        # keys reachable by this chunk: q_pos[0] - left <= k_offset + j <= q_pos[-1] + right
        k_lo = max(0, q_offset + start - left - k_offset)
        k_hi = min(Tk, max(0, q_offset + stop - 1 + right - k_offset + 1))
        k_hi = max(k_hi, k_lo)
        k_pos = k_pos_all[k_lo:k_hi]
        logits = q_rot[:, :, start:stop] @ k_rot[:, :, k_lo:k_hi].transpose(-1, -2) / math.sqrt(h)
        if bias is not None:
            logits = logits + relative_bias(bias, q_pos, k_pos)
        keep = attention_keep(q_pos, k_pos, window, causal)[None, None]  # (1, 1, tq, tk)
        if key_padding_mask is not None:
            keep = keep & ~key_padding_mask[:, None, None, k_lo:k_hi]
        logits = logits.masked_fill(~keep, -math.inf)
        # A row with no visible key would be softmax(-inf, ...) = NaN: give it zeros instead.
        any_key = keep.any(dim=-1, keepdim=True)
        probs = torch.softmax(logits.masked_fill(~any_key, 0.0), dim=-1) * any_key
        chunks.append(weighted_values(probs, v[:, :, k_lo:k_hi], keep))
    out = torch.cat(chunks, dim=2) if chunks else q_rot.new_zeros(q.shape)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------------
# How far a low-precision result may land from this reference
# --------------------------------------------------------------------------------------------------

# Inputs that a low-precision run takes in its own dtype (and the output gradients, rounded apart).
# Angles and positional parameters (M, w, s, the bias table) are not among them: the model computes
# its frequencies in float32 from a float32 base whatever its dtype, under autocast its parameters
# stay float32 too, and the kernels compute the angles in float32.
ACTIVATIONS = ("q", "k", "v", "x")

# Higham and Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019): with roundings modelled
# as independent and of mean zero, n of them perturb a value by at most LAMBDA sqrt(n) u, relatively,
# with probability at least 1 - 2 exp(-LAMBDA^2 / 2) (above 0.99999 for LAMBDA = 5).
LAMBDA = 5.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: a rounding to `dtype` moves a value by at most u of itself."""
    return torch.finfo(dtype).eps / 2


def rounding_tolerance(dtype: torch.dtype, roundings: int) -> float:
    """Relative error allowed to a result whose elements pass through `roundings` roundings to
    `dtype` on their way (operands cast for a matrix product, intermediates stored in `dtype`;
    float32 accumulation is not counted), against this reference evaluated in float64 on the same
    rounded inputs: LAMBDA sqrt(roundings) u."""
    if roundings < 1:
        raise ValueError(f"roundings must be a positive int, got {roundings!r}")
    return LAMBDA * math.sqrt(roundings) * unit_roundoff(dtype)


def round_activations(inputs: dict[str, Tensor | None], dtype: torch.dtype) -> dict[str, Tensor | None]:
    """inputs with the ACTIVATIONS among them rounded to `dtype` and returned to their own dtype:
    what a low-precision run is given, as the float64 reference sees it. The rest are unchanged."""
    return {name: t.to(dtype).to(t.dtype) if name in ACTIVATIONS and t is not None else t
            for name, t in inputs.items()}
