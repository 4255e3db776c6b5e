"""Generation on random-weight models: shapes, determinism, cached == uncached, batch == single, beams,
temperature fallback, whisper's start tokens; transcription plumbing and its edge cases.

Nothing here asserts that an untrained model transcribes anything: only the mechanics are checked.
"""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from echo import Echo, EchoCache
from echo.config import EchoConfig, small_config
from echo.generate import _beam_search, _sample_or_greedy, compression_ratio, logit_filter

SPEECH = Path(__file__).parent / "data" / "speech"


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Echo(small_config(n_text_ctx=16, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def mel(B=3, T=27, seed=1):
    return torch.randn(B, 80, T, generator=torch.Generator().manual_seed(seed))


def whisper_vocab_model(seed=0, n_audio_ctx=50):
    torch.manual_seed(seed)
    config = EchoConfig(n_mels=80, n_audio_ctx=n_audio_ctx, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                        n_text_state=32, n_text_head=2, n_text_layer=1, n_text_ctx=24, max_rel_dist=4,
                        checkpointing=False)
    return Echo(config).eval()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_shapes_determinism_and_cached_equals_uncached(num_beams):
    model, x = random_model(), mel()
    a = model.generate(x, max_new_tokens=8, num_beams=num_beams)
    b = model.generate(x, max_new_tokens=8, num_beams=num_beams)
    c = model.generate(x, max_new_tokens=8, num_beams=num_beams, use_cache=False)
    assert a.dtype == torch.long and a.shape[0] == 3 and 2 <= a.shape[1] <= 9
    assert torch.all(a[:, 0] == model.config.decoder_start_token_id)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


def test_greedy_batch_matches_single():
    model, x = random_model(), mel()
    tokens = model.generate(x, max_new_tokens=10)
    for b in range(3):
        single = model.generate(x[b: b + 1], max_new_tokens=10)
        n = single.shape[1]
        assert torch.equal(single[0], tokens[b, :n])
        assert torch.all(tokens[b, n:] == model.config.pad_token_id)


def sequence_logprob(model, x, row: int, prompt: list[int], tokens: list[int]) -> float:
    """Sum of log p(token | prefix) over `tokens`, by one teacher-forced forward pass without a cache."""
    ids = torch.tensor([prompt + tokens[:-1]])
    logprobs = torch.log_softmax(model(x[row: row + 1], decoder_input_ids=ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


def test_one_beam_is_greedy():
    model, x = random_model(seed=3), mel(B=2)
    start = [model.config.decoder_start_token_id]
    prompt = torch.tensor([start] * 2)
    with torch.no_grad():
        xa, _ = model.encode(x)
        pos = model.positional_state()
        suppress = logit_filter(model.config, 1)
        greedy = _sample_or_greedy(model, xa, None, prompt, 6, 0.0, None, True, pos, suppress)
        beam = _beam_search(model, xa, None, prompt, 6, 1, True, pos, suppress)
    for g, b in zip(greedy, beam):
        assert g.tokens == b.tokens and len(g.tokens) > 0
        assert g.sum_logprob == pytest.approx(b.sum_logprob, rel=1e-9)


def test_beam_search_scores_are_the_models_log_probabilities():
    model, x = random_model(seed=3).double(), mel(B=2).double()  # logits are float32 at the end
    start = [model.config.decoder_start_token_id]
    beam = model.generate(x, max_new_tokens=6, num_beams=4, return_dict_in_generate=True)
    greedy = model.generate(x, max_new_tokens=6, return_dict_in_generate=True)
    assert [b.tokens for b in beam.rows] != [g.tokens for g in greedy.rows]  # the beams searched elsewhere
    with torch.no_grad():
        for row, decoded in enumerate(beam.rows + greedy.rows):
            expected = sequence_logprob(model, x, row % 2, start, decoded.tokens)
            assert decoded.sum_logprob == pytest.approx(expected, rel=1e-6)


def test_beam_search_reorders_the_cache(monkeypatch):
    calls = []
    real = EchoCache.reorder
    monkeypatch.setattr(EchoCache, "reorder",
                        lambda self, index: calls.append(index.clone()) or real(self, index))
    model = random_model()
    model.generate(mel(B=2), max_new_tokens=4, num_beams=3)
    assert calls and all(c.shape == (6,) for c in calls)


def test_temperature_fallback_is_seeded_and_follows_thresholds():
    model, x = random_model(), mel()
    # thresholds nothing can meet: every row falls back to the last temperature
    out = model.generate(x, max_new_tokens=8, temperature=(0.0, 0.5, 1.0), logprob_threshold=0.0,
                         return_dict_in_generate=True)
    assert [r.temperature for r in out.rows] == [1.0, 1.0, 1.0]
    again = model.generate(x, max_new_tokens=8, temperature=(0.0, 0.5, 1.0), logprob_threshold=0.0)
    assert torch.equal(out.sequences, again)
    # thresholds everything meets: temperature 0, the greedy result
    out = model.generate(x, max_new_tokens=8, temperature=(0.0, 1.0), logprob_threshold=None,
                         compression_ratio_threshold=None, return_dict_in_generate=True)
    assert [r.temperature for r in out.rows] == [0.0] * 3
    assert torch.equal(out.sequences, model.generate(x, max_new_tokens=8))
    assert compression_ratio("ab " * 50) > 2.4 > compression_ratio("the quick brown fox")


def test_argument_errors():
    model, x = random_model(), mel()
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(x, num_beams=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(x, temperature=-1.0)
    with pytest.raises(ValueError, match="whisper's vocabularies"):
        model.generate(x, language="en")
    with pytest.raises(ValueError, match="frames"):
        model.generate(torch.randn(1, 80, 2 * model.config.n_audio_ctx + 1))


@pytest.mark.speech
def test_whisper_start_tokens_language_and_task():
    model = whisper_vocab_model()
    x = mel(B=2, T=100)
    out = model.generate(x, max_new_tokens=3, language="fr", task="translate")
    from echo.audio import get_tokenizer

    tok = get_tokenizer("fr", "translate")
    assert out[:, :4].tolist() == [list(tok.sot_sequence_including_notimestamps)] * 2
    assert out.shape[1] <= 7
    assert model.generate(x, max_new_tokens=3, language="english")[0, 1].item() == tok.to_language_token("en")
    with pytest.raises(ValueError, match="language"):
        model.generate(x, language="klingon")


@pytest.mark.speech
def test_language_is_detected_as_whisper_does():
    from echo.audio import get_tokenizer

    model, x = whisper_vocab_model(seed=2), mel(B=3, T=100, seed=4)
    tok = get_tokenizer()
    out = model.generate(x, max_new_tokens=2, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(x, decoder_input_ids=torch.full((3, 1), tok.sot)).logits[:, 0]
    expected = [tok.all_language_tokens[i]
                for i in logits[:, list(tok.all_language_tokens)].argmax(-1).tolist()]
    assert out.sequences[:, 1].tolist() == expected
    codes = dict(zip(tok.all_language_tokens, tok.all_language_codes))
    assert [r.language for r in out.rows] == [codes[t] for t in expected]
    assert out.sequences[:, 2].tolist() == [tok.transcribe] * 3


@pytest.mark.speech
def test_transcribe_long_audio_in_windows_and_batches():
    from echo.audio import load_audio

    model = whisper_vocab_model(n_audio_ctx=500)  # 10-second windows
    conversation = load_audio(SPEECH / "conversation_30s.wav")
    result = model.transcribe(str(SPEECH / "conversation_30s.wav"), max_new_tokens=2, temperature=0.0)
    assert [s["start"] for s in result["segments"]] == [0.0, 10.0, 20.0]
    from whisper.tokenizer import LANGUAGES

    assert isinstance(result["text"], str) and result["language"] in LANGUAGES  # detected: random weights
    longer = np.concatenate([conversation, conversation[: 16000 * 5]])  # 35 s
    results = model.transcribe([longer, torch.from_numpy(conversation[:16000]), SPEECH / "arctic_a0007.wav"],
                               max_new_tokens=2, temperature=0.0, batch_size=3)
    assert [len(r["segments"]) for r in results] == [4, 1, 1]
    assert results[0]["segments"][-1]["end"] == 35.0
    single = model.transcribe(SPEECH / "arctic_a0007.wav", max_new_tokens=2, temperature=0.0)
    assert single["segments"][0]["tokens"] == results[2]["segments"][0]["tokens"]


@pytest.mark.speech
def test_transcribe_thirty_second_windows_at_the_default_context():
    from echo.audio import load_audio

    model = whisper_vocab_model(n_audio_ctx=1500)  # the default context: 3000 mel frames, 30 s per window
    conversation = load_audio(SPEECH / "conversation_30s.wav")
    assert len(model.transcribe(SPEECH / "conversation_30s.wav", max_new_tokens=1,
                                temperature=0.0)["segments"]) == 1
    longer = np.concatenate([conversation, conversation, conversation[:16000 * 5]])  # 65 s
    result = model.transcribe(longer, max_new_tokens=1, temperature=0.0)
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]


@pytest.mark.speech
def test_transcribe_edge_cases(tmp_path):
    model = whisper_vocab_model()
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        model.transcribe(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00\x01not audio" * 100)
    with pytest.raises(ValueError, match="bad.wav"):
        model.transcribe(bad)
    silence = model.transcribe(np.zeros(16000 * 2, dtype=np.float32), max_new_tokens=3)
    assert isinstance(silence["text"], str) and len(silence["segments"]) == 2  # 1-second windows
    short = model.transcribe(np.random.default_rng(0).standard_normal(1600).astype(np.float32) * 0.1,
                             max_new_tokens=3)
    assert isinstance(short["text"], str) and short["segments"][0]["end"] == 0.1


def test_generate_and_transcribe_are_echo_functions_bound_to_the_model():
    """model.generate(mel, ...) is echo.generate.generate(model, mel, ...) (and model.transcribe
    echo.transcribe's): the bound method shows the function's own signature and docstring, and it is Echo's,
    not transformers'."""
    import echo.generate
    import echo.transcribe

    assert Echo.generate is echo.generate.generate and Echo.transcribe is echo.transcribe.transcribe
    model = random_model()
    params = list(inspect.signature(model.generate).parameters)
    assert params[:4] == ["input_features", "attention_mask", "max_new_tokens", "num_beams"]
    assert {"prompt", "use_cache", "return_dict_in_generate"} <= set(params)
    assert list(inspect.signature(model.transcribe).parameters)[:2] == ["audio", "language"]
    assert model.generate.__doc__ == echo.generate.generate.__doc__
    prompt = [model.config.decoder_start_token_id]
    torch.testing.assert_close(model.generate(mel(B=1), max_new_tokens=3, prompt=prompt, suppress_tokens=None,
                                              suppress_blank=False),
                               echo.generate.generate(model, mel(B=1), max_new_tokens=3, prompt=prompt,
                                                      suppress_tokens=None, suppress_blank=False),
                               rtol=0, atol=0)
