"""Greedy decoding with the KV cache; kept outside the model, as in openai/whisper."""

from __future__ import annotations

import torch
from torch import Tensor

from .cache import EchoCache


@torch.no_grad()
def greedy_decode(model, input_features: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None,
                  prompt: Tensor | None = None) -> Tensor:
    """mel (B, n_mels, T) -> tokens (B, len(prompt) + n), n <= max_new_tokens.

    Starts from `prompt` (default: decoder_start_token_id), feeds one token per step through the
    cache, stops when every row has produced eos or the text context is full. Rows that finished
    keep receiving pad.
    """
    config = model.config
    B = input_features.shape[0]
    device = input_features.device
    tokens = prompt if prompt is not None else torch.full((B, 1), config.decoder_start_token_id, device=device)
    max_new_tokens = min(max_new_tokens, config.n_text_ctx - tokens.shape[1])
    cache = EchoCache()
    pos = model.positional_state()
    cache.pos = pos
    xa, _ = model.encode(input_features, attention_mask, pos)
    out = model(encoder_outputs=xa, attention_mask=attention_mask, decoder_input_ids=tokens,
                past_key_values=cache, use_cache=True)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(-1)
        next_token = torch.where(done, torch.full_like(next_token, config.pad_token_id), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        done |= next_token == config.eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = model(decoder_input_ids=next_token[:, None], past_key_values=cache, use_cache=True)
    return tokens
