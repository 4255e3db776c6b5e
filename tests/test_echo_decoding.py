"""KV cache and greedy decoding: token-by-token logits equal the full forward; M is built once."""

import pytest
import torch

import echo.attention
import echo.positional
from echo import Echo, EchoCache
from echo.config import small_config
from echo.model import _CACHE_FIELD


def model_and_audio(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Echo(small_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the initial values: angles, biases, R departing orthogonality
            p.add_(0.05 * torch.randn_like(p))
    mel = torch.randn(2, model.config.n_mels, 27)
    return model, mel


@pytest.mark.parametrize("overrides", [{}, dict(cross_attention=False),
                                       dict(attention_rotation="rope_then_m"),
                                       dict(local_window=2, mlp="s1", layer_norm="s1",
                                            rope_layout="interleaved")])
def test_cached_decoding_matches_the_full_forward(overrides):
    model, mel = model_and_audio(**overrides)
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.n_text_ctx))
    with torch.no_grad():
        full = model(mel, decoder_input_ids=tokens).logits
        cache = EchoCache()
        steps = [model(mel, decoder_input_ids=tokens[:, :3], past_key_values=cache, use_cache=True)]
        for t in range(3, tokens.shape[1]):
            steps.append(model(decoder_input_ids=tokens[:, t:t + 1], past_key_values=cache, use_cache=True))
    assert steps[-1][_CACHE_FIELD] is cache and cache.offset == tokens.shape[1]
    n_attention = model.config.n_text_layer * (2 if model.config.cross_attention else 1)
    assert len(cache.kv) == n_attention
    k, v = cache.kv[model.decoder.blocks[0].attn]
    assert k.shape == (2, model.config.n_text_head, tokens.shape[1], model.config.head_width("text"))
    stepped = torch.cat([s.logits for s in steps], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def _decode_hidden(model, mel, tokens):
    """The decoder's last hidden states (before its final LayerNorm), token by token through the cache."""
    hidden = []
    hook = model.decoder.ln.register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
    cache = EchoCache()
    with torch.no_grad():
        model(mel, decoder_input_ids=tokens[:, :1], past_key_values=cache, use_cache=True)
        for t in range(1, tokens.shape[1]):
            model(decoder_input_ids=tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
    hook.remove()
    return torch.cat(hidden, dim=1), cache


def test_cached_decoding_with_folded_projections_matches_unfolded(monkeypatch):
    """Token by token in float64 (s1 LayerNorms, so nothing rounds to float32): keys cached as x (Wk M)
    give the hidden states of keys cached as x Wk with M applied by the op."""
    model, mel = model_and_audio(layer_norm="s1")
    model.double()
    mel = mel.double()
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.n_text_ctx))
    folded, cache = _decode_hidden(model, mel, tokens)
    assert len(cache.folded) == 2 * model.config.n_text_layer  # self and cross: folded once, on step 1
    monkeypatch.setattr(echo.attention, "FOLD_M", False)
    unfolded, cache = _decode_hidden(model, mel, tokens)
    assert not cache.folded
    assert folded.dtype == torch.float64 and folded.shape[1] == tokens.shape[1]
    torch.testing.assert_close(folded, unfolded, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("overrides", [{}, dict(attention_rotation="rope_then_m", rope_layout="interleaved")])
def test_cached_keys_rotated_or_raw_agree(monkeypatch, overrides):
    """Token by token in float64: keys cached rotated (the op told keys_rotated, rotating only the queries)
    give the hidden states of keys cached raw and rotated by the op at every step; the cross-attention
    cache then holds the encoder frames' keys rotated."""
    model, mel = model_and_audio(layer_norm="s1", **overrides)
    model.double()
    mel = mel.double()
    tokens = torch.randint(0, model.config.vocab_size, (2, 6))
    rotated, cache = _decode_hidden(model, mel, tokens)
    cross = model.decoder.blocks[0].cross_attn
    k_rotated, _ = cache.kv[cross]
    monkeypatch.setattr(echo.attention, "ROTATE_CACHED_KEYS", False)
    raw, cache = _decode_hidden(model, mel, tokens)
    k_raw, _ = cache.kv[cross]
    assert rotated.shape[1] == tokens.shape[1]
    torch.testing.assert_close(rotated, raw, rtol=1e-11, atol=1e-11)
    with torch.no_grad():
        pos = model.positional_state()
        M = (pos.matrix(cross.site) if model.config.attention_rotation == "rope_then_m"
             else None)  # else folded
        torch.testing.assert_close(k_rotated, cross._rotated(k_raw, M, pos.w("text"), 0), rtol=1e-12,
                                   atol=1e-12)
    assert (k_rotated - k_raw).abs().max() > 0.1


def test_cached_decoding_with_self_attention_keys_raw(monkeypatch):
    """Where the op runs the Triton kernels (on a GPU), the cache keeps self-attention's keys raw and
    cross-attention's rotated: token by token in float64 the hidden states are those of every key cached
    rotated."""
    model, mel = model_and_audio(layer_norm="s1")
    model.double()
    mel = mel.double()
    tokens = torch.randint(0, model.config.vocab_size, (2, 6))
    rotated, cache = _decode_hidden(model, mel, tokens)
    block = model.decoder.blocks[0]
    k_self, _ = cache.kv[block.attn]
    k_cross, _ = cache.kv[block.cross_attn]
    monkeypatch.setattr(echo.attention, "use_kernel", lambda op, device: True)
    mixed, cache = _decode_hidden(model, mel, tokens)
    torch.testing.assert_close(mixed, rotated, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(cache.kv[block.cross_attn][0], k_cross, rtol=0, atol=0)
    assert (cache.kv[block.attn][0] - k_self).abs().max() > 0.1  # raw, where the first run cached k'


def test_cache_past_the_text_context_is_refused():
    model, mel = model_and_audio()
    cache = EchoCache()
    n = model.config.n_text_ctx
    model(mel, decoder_input_ids=torch.zeros(2, n, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="n_text_ctx"):
        model(decoder_input_ids=torch.zeros(2, 1, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_greedy_generate_builds_each_matrix_once_and_agrees_with_full_forward(monkeypatch):
    model, mel = model_and_audio()
    calls, folds = [], []
    real = echo.positional.orthogonal_product
    monkeypatch.setattr(echo.positional, "orthogonal_product",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fold = echo.attention.fold_rotation
    monkeypatch.setattr(echo.attention, "fold_rotation", lambda *a: folds.append(1) or fold(*a))
    tokens = model.generate(mel, max_new_tokens=6)
    n_groups = len(calls)
    assert n_groups <= 4  # encoder and decoder attention sites batched, plus the two rotaries
    # q and k weights folded once per attention layer: the encoder's, and the decoder's on the first step
    n_layers = model.config.n_audio_layer + 2 * model.config.n_text_layer
    assert len(folds) == 2 * n_layers
    assert tokens.shape[0] == 2 and 2 <= tokens.shape[1] <= 7
    assert torch.all(tokens[:, 0] == model.config.decoder_start_token_id)
    with torch.no_grad():
        logits = model(mel, decoder_input_ids=tokens[:, :-1]).logits
    finished = torch.zeros(2, dtype=torch.bool)
    for t in range(tokens.shape[1] - 1):
        expected = torch.where(finished, model.config.pad_token_id, logits[:, t].argmax(-1))
        assert torch.equal(tokens[:, t + 1], expected)
        finished |= tokens[:, t + 1] == model.config.eos_token_id
