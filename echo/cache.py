"""The decoder's KV cache: raw projected keys and values per attention layer, plus the state that
must stay fixed while decoding (positions consumed, the positional state, the audio padding)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .positional import PositionalState

KeysValues = tuple[Tensor, Tensor]
FoldedWeights = tuple[Tensor, Tensor | None, Tensor]


class EchoCache:
    """kv[layer] = (k, v), each (B, H, T, h), for every decoder self- and cross-attention layer (the
    EchoAttention module itself is the key).

    On CUDA keys are stored before RoPE: echo_attention's kernels rotate them at their positions. On
    the CPU they are stored as k', rotated once (see EchoAttention.forward). In the "m_then_rope"
    order they are projected with the folded weight (`folded[layer]`:
    that layer's (Wq, bq, Wk) with M folded in, made on the first step). `offset` counts the text
    positions already decoded; `positions` holds w and the site matrices M of the first step, so
    that decoding builds M and the folded weights once, not once per token. `audio_padding` (B, Ta)
    bool, or None, is the encoder frames' padding, which later steps (given no audio) attend with.
    """

    def __init__(self, positions: PositionalState | None = None):
        """positions: the state to decode with (e.g. the one the audio was encoded with); None: the
        first forward's."""
        self.kv: dict[nn.Module, KeysValues] = {}
        self.folded: dict[nn.Module, FoldedWeights] = {}
        self.offset = 0
        self.positions = positions
        self.audio_padding: Tensor | None = None

    def get_seq_length(self) -> int:
        return self.offset

    def __len__(self) -> int:
        return self.offset

    def positional_state(self, build: Callable[[], PositionalState]) -> PositionalState:
        """The state this cache decodes with: `build()`'s on the first step, kept for the later ones."""
        if self.positions is None:
            self.positions = build()
        return self.positions

    def update(self, layer: nn.Module, k: Tensor, v: Tensor) -> KeysValues:
        """Self-attention: append this step's k, v (B, H, T, h) to `layer`'s and return all of them,
        (B, H, offset + T, h) each."""
        if layer in self.kv:
            past_k, past_v = self.kv[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.kv[layer] = (k, v)
        return k, v

    def cross(self, layer: nn.Module, project: Callable[[], KeysValues]) -> KeysValues:
        """Cross-attention: `layer`'s k, v (B, H, Ta, h) of the encoder frames, projected by `project()`
        on the first step only (the frames do not change while decoding)."""
        if layer not in self.kv:
            self.kv[layer] = project()
        return self.kv[layer]

    def folded_weights(self, layer: nn.Module, fold: Callable[[], FoldedWeights]) -> FoldedWeights:
        """`layer`'s (Wq, bq, Wk) with M folded in, made by `fold()` on the first step only (M is fixed
        while decoding)."""
        if layer not in self.folded:
            self.folded[layer] = fold()
        return self.folded[layer]

    def advance(self, n: int) -> None:
        """Count `n` more text positions as decoded (the decoder calls it after each step)."""
        self.offset += n

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) of every entry (for beam search)."""
        self.kv = {layer: (k.index_select(0, index), v.index_select(0, index))
                   for layer, (k, v) in self.kv.items()}
        if self.audio_padding is not None:
            self.audio_padding = self.audio_padding.index_select(0, index)
