"""Positional machinery: Givens-orthogonal sites, the residual-stream rotary and the
learned, L2-normalised sinusoidal table (docs/model.md: Givens-orthogonal matrix, Rotary embedding,
Positional tables)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from echo_kernels import orthogonal_product, rotary_orthogonal

# The residual-stream rotaries draw their index pairs from generators seeded with this plus a
# per-site number, so that the same config always builds the same pairs.
PAIR_SEED = 1234


def rope_frequencies(base: Tensor | float, h: int) -> Tensor:
    """w[m] = base^(-2m/h) for m = 0..h/2-1, float32.   base: scalar (a tensor stays on its device)."""
    base = torch.as_tensor(base, dtype=torch.float32)
    exponents = torch.arange(0, h, 2, dtype=torch.float32, device=base.device) / h
    return base.pow(-exponents)


def adjacent_pairs(n: int) -> Tensor:
    """(n, 2) int64: the pairs (k, k+1), k = 0..n-1."""
    k = torch.arange(n, dtype=torch.int64)
    return torch.stack([k, k + 1], dim=1)


def random_pairs(n: int, h: int, seed: int) -> Tensor:
    """(n, 2) int64 pairs (i, j), i != j, drawn from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, h, (n,), generator=g)
    j = torch.randint(0, h - 1, (n,), generator=g)
    j = j + (j >= i).long()  # skips i, so j is uniform over the others
    return torch.stack([i, j], dim=1)


class GivensSite(nn.Module):
    """One place that rotates: N learned angles, N fixed index pairs and a learned dense R (h x h).

    matrix() is G_1 ... G_N R if givens_first else R G_1 ... G_N. Sites with equal pairs, h and order
    share a `group`, so the model can build all their matrices in one orthogonal_product call.
    """

    def __init__(self, h: int, pairs: Tensor, *, givens_first: bool, orthogonal_r: bool, group=None):
        super().__init__()
        self.h = h
        self.givens_first = givens_first
        self.group = group
        self.thetas = nn.Parameter(torch.zeros(pairs.shape[0]))
        self.R = nn.Parameter(torch.empty(h, h))
        self.register_buffer("pairs", pairs.clone())
        self.reset_r(orthogonal_r)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The pairs are not learned: the config fixes them, and a site grouped with others is built
        # with its group's first pairs. Loaded pairs that differ would be ignored there and break the
        # product elsewhere, so every load (any path through load_state_dict) checks them here.
        if prefix + "pairs" in state_dict:
            check_loaded_pairs(prefix + "pairs", state_dict[prefix + "pairs"], self.pairs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def reset_r(self, orthogonal: bool) -> None:
        with torch.no_grad():
            if orthogonal:
                nn.init.orthogonal_(self.R)
            else:
                self.R.copy_(torch.eye(self.h))

    def matrix(self) -> Tensor:
        return orthogonal_product(self.thetas, self.pairs, self.R, self.givens_first)


def check_loaded_pairs(name: str, loaded: Tensor, built: Tensor) -> None:
    """ValueError naming the buffer `name` unless `loaded` holds the (N, 2) pairs the config builds."""
    if not isinstance(loaded, Tensor) or loaded.is_floating_point() \
            or tuple(loaded.shape) != tuple(built.shape):
        raise ValueError(f"{name}: the config builds {tuple(built.shape)} integer index pairs, the state "
                         f"dict holds {getattr(loaded, 'dtype', type(loaded).__name__)} of shape "
                         f"{tuple(getattr(loaded, 'shape', ()))}")
    loaded, built = loaded.detach().cpu().long(), built.detach().cpu().long()
    differ = (loaded != built).any(dim=1).nonzero()
    if differ.numel():
        k = int(differ[0, 0])
        raise ValueError(f"{name}[{k}] = {tuple(loaded[k].tolist())}, but the config builds "
                         f"{tuple(built[k].tolist())}: index pairs are fixed by the config, so this state "
                         f"dict was saved under another one")


def site_matrices(sites: Iterable[GivensSite]) -> dict[GivensSite, Tensor]:
    """{site: M (h, h)} for every site, batching the sites of a group into one orthogonal_product call."""
    groups: dict[object, list[GivensSite]] = defaultdict(list)
    for site in sites:
        groups[site.group if site.group is not None else site].append(site)
    out = {}
    for members in groups.values():
        first = members[0]
        if len(members) == 1:
            out[first] = first.matrix()
            continue
        thetas = torch.stack([site.thetas for site in members])
        R = torch.stack([site.R for site in members])
        M = orthogonal_product(thetas, first.pairs, R, first.givens_first)
        out.update(zip(members, M.unbind(0)))
    return out


@dataclass
class PositionalState:
    """The positional inputs of one forward, which every rotating sub-layer reads (docs/model.md:
    Adaptive base, Givens-orthogonal matrix).

    The model builds it once per forward, outside any checkpointed region (a checkpointed block re-run
    reads it rather than rebuilding every M), and an EchoCache keeps the first step's while decoding.
    w_audio: (h_audio / 2,), w_text: (h_text / 2,) float32: the attention frequencies from the current
    base. matrices: M (h, h) of every Givens site of the model, keyed by the site itself.
    """

    w_audio: Tensor
    w_text: Tensor
    matrices: dict[GivensSite, Tensor]

    def w(self, side: str) -> Tensor:
        """The attention frequencies of side "audio" or "text"."""
        if side == "audio":
            return self.w_audio
        if side == "text":
            return self.w_text
        raise ValueError(f"side must be 'audio' or 'text', got {side!r}")

    def matrix(self, site: GivensSite) -> Tensor:
        """(h, h): the M of `site`, one of the sites this state was built for."""
        return self.matrices[site]


class CombinedRotaryEmbedding(nn.Module):
    """Residual-stream rotary: per head-sized group, y = RoPE(x @ M), M = G_1 ... G_N R
    (docs/model.md, Rotary embedding).

    x: (B, T, D) -> (B, T, D). The frequencies w are learned (initialised from base); s = 1.
    """

    def __init__(self, d: int, n_head: int, n_givens: int, base: float, layout: str, seed: int):
        super().__init__()
        self.n_head = n_head
        self.h = d // n_head
        self.layout = layout
        self.site = GivensSite(self.h, random_pairs(n_givens, self.h, seed), givens_first=True,
                               orthogonal_r=False)
        self.w = nn.Parameter(rope_frequencies(float(base), self.h))

    def forward(self, x: Tensor, M: Tensor, offset: int = 0) -> Tensor:
        B, T, D = x.shape
        y = rotary_orthogonal(x.view(B, T, self.n_head, self.h), M, self.w, 1.0, offset, self.layout)
        return y.reshape(B, T, D)


def sinusoids(n_ctx: int, d: int) -> Tensor:
    """P[p, 2i] = sin(p 10000^(-2i/d)), P[p, 2i+1] = cos(p 10000^(-2i/d)).   -> (n_ctx, d) float32."""
    position = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
    P = torch.zeros(n_ctx, d, dtype=torch.float64)
    P[:, 0::2] = torch.sin(position * inv)
    P[:, 1::2] = torch.cos(position * inv)[:, : d // 2]
    return P.float()


def _normalised_rows(weight: Tensor, positions: Tensor) -> Tensor:
    return F.normalize(weight[positions], dim=-1)


class LearnedSinusoidalEmbedding(nn.Module):
    """A learned (n_ctx, D) table initialised with sinusoids; rows are L2-normalised when looked up
    (norm "l2") or added as they are ("none", e.g. Whisper's own tables after an import).

    positions: (T,) int64 -> (T, D).
    """

    def __init__(self, n_ctx: int, d: int, checkpointing: bool = False, norm: str = "l2"):
        super().__init__()
        self.checkpointing = checkpointing
        self.norm = norm
        self.weight = nn.Parameter(sinusoids(n_ctx, d))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(sinusoids(*self.weight.shape))

    def forward(self, positions: Tensor) -> Tensor:
        if self.norm == "none":
            return self.weight[positions]
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(_normalised_rows, self.weight, positions, use_reentrant=False)
        return _normalised_rows(self.weight, positions)
