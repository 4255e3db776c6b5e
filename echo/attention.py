"""Attention sub-layers: Echo attention (ECHO_SPEC 4), local + global (6) and convolution + attention (7).

Every sub-layer takes `pos`, the positional state computed once per forward by the model: the
attention frequencies "w.audio" / "w.text" (from the current adaptive base) and one matrix M per
Givens site, keyed by the site's module name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from echo_kernels import echo_attention

from .config import EchoConfig
from .layers import layer_norm
from .positional import GivensSite, adjacent_pairs


class EchoAttention(nn.Module):
    """x: (B, Tq, D), xa: (B, Tk, D_kv) or None (self-attention) -> (B, Tq, D).

    q = x Wq + bq, k = x' Wk, v = x' Wv + bv; echo_attention rotates q and k (RoPE with w from the
    adaptive base and a learned scale s, then M = R G_1 ... G_N), adds the clamped relative bias and
    masks. Without `out_proj` the heads are returned merged but unprojected (the conv mixer projects).
    """

    def __init__(self, config: EchoConfig, side: str, *, cross: bool = False, d_kv: int | None = None,
                 window: int | None = None, causal: bool = False, out_proj: bool = True):
        super().__init__()
        self.cross = cross
        d = getattr(config, f"n_{side}_state")
        self.n_head = getattr(config, f"n_{side}_head")
        self.h = d // self.n_head
        self.side = side
        self.window = window
        self.causal = causal
        self.layout = config.rope_layout
        d_kv = d if d_kv is None else d_kv
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d_kv, d, bias=False)
        self.value = nn.Linear(d_kv, d)
        self.out = nn.Linear(d, d) if out_proj else None
        n = config.givens_count(side)
        self.site = GivensSite(self.h, adjacent_pairs(n), givens_first=False, orthogonal_r=True,
                               group=("attention", self.h, n))
        self.s = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(2 * config.max_rel_dist - 1, self.n_head))
        self.cache_key = None  # set by the model: where this layer keeps its k and v in an EchoCache

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.h).transpose(1, 2)

    def forward(self, x: Tensor, pos: dict, xa: Tensor | None = None, key_padding_mask: Tensor | None = None,
                cache=None, offset: int = 0) -> Tensor:
        q = self.query(x)
        if self.cross and cache is not None and self.cache_key in cache.kv:
            # the encoder frames were projected on the first step
            k, v = cache.kv[self.cache_key]
        else:
            if self.cross and xa is None:
                raise ValueError("cross-attention needs the encoder output (input_features or encoder_outputs)")
            source = xa if self.cross else x
            k, v = self._heads(self.key(source)), self._heads(self.value(source))
            if cache is not None:
                if not self.cross and self.cache_key in cache.kv:
                    past_k, past_v = cache.kv[self.cache_key]
                    k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                cache.kv[self.cache_key] = (k, v)
        a = echo_attention(
            self._heads(q), k, v, pos[self.site.key], pos[f"w.{self.side}"], self.s, self.bias,
            window=self.window, causal=self.causal, q_offset=offset, k_offset=0,
            key_padding_mask=key_padding_mask, layout=self.layout,
        )
        B, _, T, _ = a.shape
        a = a.transpose(1, 2).reshape(B, T, self.n_head * self.h)
        return self.out(a) if self.out is not None else a


class LocalGlobalAttention(nn.Module):
    """x: (B, T, D) -> (B, T, D): a global and a banded (|i - j| <= local_window) branch, each with its
    own projections, M and bias, combined by "sum" or a Linear(2D -> D) ("linear")."""

    def __init__(self, config: EchoConfig, side: str, *, out_proj: bool = True):
        super().__init__()
        d = getattr(config, f"n_{side}_state")
        self.global_attn = EchoAttention(config, side, out_proj=out_proj)
        self.local_attn = EchoAttention(config, side, window=config.local_window, out_proj=out_proj)
        self.combine = nn.Linear(2 * d, d) if config.hybrid_combine == "linear" else None

    def forward(self, x: Tensor, pos: dict, key_padding_mask: Tensor | None = None) -> Tensor:
        g = self.global_attn(x, pos, key_padding_mask=key_padding_mask)
        l = self.local_attn(x, pos, key_padding_mask=key_padding_mask)
        if self.combine is None:
            return l + g
        return self.combine(torch.cat([l, g], dim=-1))


def encoder_attention(config: EchoConfig, *, out_proj: bool = True) -> nn.Module:
    if config.local_window is not None:
        return LocalGlobalAttention(config, "audio", out_proj=out_proj)
    return EchoAttention(config, "audio", out_proj=out_proj)


class ConvAttention(nn.Module):
    """u: (B, T, D) -> (B, T, D) = Wo(LN_o(LN_c(conv(u)) + attn(u))) (ECHO_SPEC 7).

    conv is a grouped Conv1d(D, D, 3, padding=1, groups=H); attn has no output projection of its own.
    """

    def __init__(self, config: EchoConfig):
        super().__init__()
        d = config.n_audio_state
        self.conv = nn.Conv1d(d, d, 3, padding=1, groups=config.n_audio_head)
        self.conv_ln = layer_norm(config.layer_norm, d)
        self.attn = encoder_attention(config, out_proj=False)
        self.out_ln = layer_norm(config.layer_norm, d)
        self.out = nn.Linear(d, d)

    def forward(self, u: Tensor, pos: dict, key_padding_mask: Tensor | None = None) -> Tensor:
        c = self.conv_ln(self.conv(u.transpose(1, 2)).transpose(1, 2))
        return self.out(self.out_ln(c + self.attn(u, pos, key_padding_mask=key_padding_mask)))


def encoder_mixer(config: EchoConfig) -> nn.Module:
    """The self-attention sub-layer of an encoder block, as configured (sections 4, 6, 7)."""
    if config.conv_attention:
        return ConvAttention(config)
    return encoder_attention(config)
