"""The decoder's KV cache: raw projected keys and values per attention layer, plus the state that
must stay fixed while decoding (positions consumed, the positional matrices, the audio padding)."""

from __future__ import annotations

from torch import Tensor


class EchoCache:
    """kv[name] = (k, v), each (B, H, T, h), for every decoder self- and cross-attention layer.

    Keys are stored before RoPE: echo_attention rotates them itself at their positions. In the
    "m_then_rope" order they are stored as k M, projected with the folded weight (`folded[name]`:
    that layer's (Wq, bq, Wk) with M folded in, made on the first step). `offset` counts the text
    positions already decoded; `pos` holds w and the site matrices M computed on the first step, so
    that decoding builds M and the folded weights once, not once per token.
    """

    def __init__(self):
        self.kv: dict[str, tuple[Tensor, Tensor]] = {}
        self.folded: dict[str, tuple[Tensor, Tensor | None, Tensor]] = {}
        self.offset = 0
        self.pos: dict[str, Tensor] | None = None
        self.audio_padding: Tensor | None = None

    def get_seq_length(self) -> int:
        return self.offset

    def __len__(self) -> int:
        return self.offset

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) of every entry (for beam search)."""
        self.kv = {name: (k.index_select(0, index), v.index_select(0, index)) for name, (k, v) in self.kv.items()}
        if self.audio_padding is not None:
            self.audio_padding = self.audio_padding.index_select(0, index)
