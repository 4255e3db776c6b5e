"""Attention sub-layers: Echo attention, local + global and convolution + attention
(docs/model.md: Attention, Local + global attention, Convolution + attention).

Every sub-layer takes `pos`, the PositionalState computed once per forward by the model: the
attention frequencies of each side (from the current adaptive base) and one matrix M per Givens site.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from echo_kernels import echo_attention
from echo_kernels.backend import use_kernel
from echo_kernels.reference import rope_angles, rotate_for_attention

from .cache import EchoCache, FoldedWeights, KeysValues
from .config import EchoConfig
from .layers import layer_norm
from .linear import Linear, linear
from .positional import GivensSite, PositionalState, adjacent_pairs

# In the "m_then_rope" order, fold M into the q and k projections and give the op M=None (True), or
# give the op M (False): the same maths, which the tests compare and the naive bench baseline uses.
FOLD_M = True

# While decoding, keep the cached keys rotated (True: cross-attention's always, self-attention's where the op
# does not run the Triton kernels; the op is told so and rotates only the queries) or raw, rotated by the op
# at every step (False): the same maths; the naive bench baseline does the latter.
ROTATE_CACHED_KEYS = True


def fold_rotation(weight: Tensor, bias: Tensor | None, M: Tensor, n_head: int
                  ) -> tuple[Tensor, Tensor | None]:
    """A Linear's (weight (D, D_in), bias (D,) or None) with M applied to each head's outputs.

    Per head, (x W^T + b) M = x (M^T W)^T + b M: M: (h, h), D = n_head h. One (h, h) by (h, D_in)
    product per head, D h D_in multiply-adds in all; gradients reach W, b and M through autograd.
    """
    D, d_in = weight.shape
    M = M.to(weight.dtype)
    folded = (M.T @ weight.view(n_head, D // n_head, d_in)).reshape(D, d_in)
    return folded, (bias.view(n_head, -1) @ M).reshape(D) if bias is not None else None


class EchoAttention(nn.Module):
    """x: (B, Tq, D), xa: (B, Tk, D_kv) or None (self-attention) -> (B, Tq, D).

    q = x Wq + bq, k = x' Wk, v = x' Wv + bv; q and k are rotated per head as config.attention_rotation
    says, with w from the adaptive base, a learned scale s and this layer's M:
    "m_then_rope" RoPE(q M) with M = G_1 ... G_N R, "rope_then_m" RoPE(q) M with M = R G_1 ... G_N.
    echo_attention adds the clamped relative bias and masks. In the "m_then_rope" order M is folded
    into Wq, bq and Wk (see fold_rotation) and the op is given M=None: it then does RoPE only.
    Without `out_proj` the heads are returned merged but unprojected (the conv mixer projects).
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
        self.rotation = config.attention_rotation
        d_kv = d if d_kv is None else d_kv
        self.query = Linear(d, d)
        self.key = Linear(d_kv, d, bias=False)
        self.value = Linear(d_kv, d)
        self.out = Linear(d, d) if out_proj else None
        n = config.givens_count(side)
        givens_first = self.rotation == "m_then_rope"  # M = G_1 ... G_N R, as the residual-stream rotary
        self.site = GivensSite(self.h, adjacent_pairs(n), givens_first=givens_first, orthogonal_r=True,
                               group=("attention", self.h, n, givens_first))
        self.s = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(2 * config.max_rel_dist - 1, self.n_head))

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.h).transpose(1, 2)

    def _projections(self, M: Tensor,
                     cache: EchoCache | None) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(Wq, bq, Wk, M for the op): M folded into Wq, bq and Wk ("m_then_rope"), else as they are.
        A KV cache keeps the folded weights of its first step: M is fixed while decoding."""
        if self.rotation != "m_then_rope" or not FOLD_M:
            return self.query.weight, self.query.bias, self.key.weight, M

        def fold() -> FoldedWeights:
            wq, bq = fold_rotation(self.query.weight, self.query.bias, M, self.n_head)
            wk, _ = fold_rotation(self.key.weight, None, M, self.n_head)
            return wq, bq, wk

        wq, bq, wk = fold() if cache is None else cache.folded_weights(self, fold)
        return wq, bq, wk, None

    def _keys_values(self, source: Tensor | None, wk: Tensor) -> KeysValues:
        """source (B, Tk, D_kv) -> k, v (B, H, Tk, h), k by the (possibly folded) Wk. source None (a
        cross-attention given no encoder output) is a ValueError."""
        if source is None:
            raise ValueError("cross-attention needs the encoder output (input_features or encoder_outputs)")
        return self._heads(linear(source, wk)), self._heads(self.value(source))

    def _rotated(self, u: Tensor, M: Tensor | None, w: Tensor, offset: int) -> Tensor:
        """u (B, H, T, h) -> q' or k' (B, H, T, h) at positions offset + t, as echo_attention rotates
        (angles in float32 or float64, whatever u's dtype)."""
        compute = torch.promote_types(u.dtype, torch.float32)
        phi = rope_angles(w.to(compute), self.s.to(compute),
                          torch.arange(offset, offset + u.shape[2], device=u.device))
        M = M.to(compute) if M is not None else None
        return rotate_for_attention(u.to(compute), M, phi, self.layout, self.rotation).to(u.dtype)

    def forward(self, x: Tensor, pos: PositionalState, xa: Tensor | None = None,
                key_padding_mask: Tensor | None = None, cache: EchoCache | None = None,
                offset: int = 0) -> Tensor:
        """offset: the position of x's first token (the tokens a KV cache holds before this step)."""
        wq, bq, wk, M = self._projections(pos.matrix(self.site), cache)
        q = self._heads(linear(x, wq, bq))
        w = pos.w(self.side)
        keys_rotated = cache is not None and ROTATE_CACHED_KEYS and (
            self.cross or not use_kernel("echo_attention", x.device))
        if keys_rotated:
            # The op rotates the keys it is given at every call: decoding would rotate every cached key (all
            # the encoder frames, for cross-attention) at every step. The cache keeps k' instead, rotated
            # once when stored, and the op rotates only q (keys_rotated). Self-attention keeps its keys raw
            # where the op runs the Triton kernels: their rotation pass over them is a launch the step makes
            # anyway, where rotating each new key here would add PyTorch's several small ones.
            if not self.cross:
                k, v = self._keys_values(x, wk)
                k, v = cache.update(self, self._rotated(k, M, w, offset), v)
            else:
                def project() -> KeysValues:
                    k, v = self._keys_values(xa, wk)
                    return self._rotated(k, M, w, 0), v

                k, v = cache.cross(self, project)
        elif not self.cross:
            k, v = self._keys_values(x, wk)
            if cache is not None:
                k, v = cache.update(self, k, v)
        elif cache is None:
            k, v = self._keys_values(xa, wk)
        else:  # the encoder frames are projected on the first step only
            k, v = cache.cross(self, lambda: self._keys_values(xa, wk))
        a = echo_attention(
            q, k, v, M, w, self.s, self.bias,
            window=self.window, causal=self.causal, q_offset=offset, k_offset=0,
            key_padding_mask=key_padding_mask, layout=self.layout, rotation=self.rotation,
            keys_rotated=keys_rotated,
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
        self.combine = Linear(2 * d, d) if config.hybrid_combine == "linear" else None

    def forward(self, x: Tensor, pos: PositionalState, key_padding_mask: Tensor | None = None) -> Tensor:
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
    """u: (B, T, D) -> (B, T, D) = Wo(LN_o(LN_c(conv(u)) + attn(u))) (docs/model.md, Convolution + attention).

    conv is a grouped Conv1d(D, D, 3, padding=1, groups=H); attn has no output projection of its own.
    """

    def __init__(self, config: EchoConfig):
        super().__init__()
        d = config.n_audio_state
        self.conv = nn.Conv1d(d, d, 3, padding=1, groups=config.n_audio_head)
        self.conv_ln = layer_norm(config.layer_norm, d)
        self.attn = encoder_attention(config, out_proj=False)
        self.out_ln = layer_norm(config.layer_norm, d)
        self.out = Linear(d, d)

    def forward(self, u: Tensor, pos: PositionalState, key_padding_mask: Tensor | None = None) -> Tensor:
        c = self.conv_ln(self.conv(u.transpose(1, 2)).transpose(1, 2))
        return self.out(self.out_ln(c + self.attn(u, pos, key_padding_mask=key_padding_mask)))


def encoder_mixer(config: EchoConfig) -> nn.Module:
    """The self-attention sub-layer of an encoder block, as configured (docs/model.md:
    Attention, Local + global attention, Convolution + attention)."""
    if config.conv_attention:
        return ConvAttention(config)
    return encoder_attention(config)
