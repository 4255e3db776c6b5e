"""The whole Echo model: a training step (forward + backward) and inference (encoder + 32 cached
decoding steps), timed four ways in the same run:

- echo: the package as shipped (ECHO_BACKEND=auto: compiled kernels where the device has them);
- reference: every op on its plain-PyTorch reference (ECHO_BACKEND=reference);
- naive: the ops computed the way straightforward model code does (benches/naive.py);
- hf-whisper: Hugging Face's WhisperForConditionalGeneration with SDPA at the same widths and depths;
- openai-whisper: openai-whisper's Whisper (its attention also SDPA) at the same widths and depths.

The ways take turns, round by round (harness.alternating_rounds: one pytest case per way and round, each
round starting one way later, the first round of each way after its warm-up calls), and each is reported
with the median of its rounds: on a shared machine whose speed drifts, ways timed one after the other
would meet different weather.

A third comparison, a 30 s transcription (log-mel of the waveform, then 32 greedy tokens after the
English start sequence, the end token suppressed so that every model decodes all 32), runs Echo's
transcribe against openai-whisper's decode and Hugging Face's generate.

The model runs its default attention order, "m_then_rope", with M folded into the q and k
projections (the naive way applies M in attention, factor by factor, as the formula reads).

GPU: the default medium (docs/model.md, Configuration) in bf16, batch 8, 30 s of audio, 448 text tokens.
CPU: Whisper tiny's widths and depths (4 + 4 blocks of width 384) on one 30 s clip and 32 tokens, quick
enough for CI.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from echo import Echo, EchoConfig
from echo.config import TINY
from echo.cache import EchoCache
from echo_kernels import reference

from harness import DEVICE, GPU, alternating_rounds, bench_size, record, run_timed
from naive import naive_ops

if GPU:
    # The default medium, with its activation checkpointing: without it the reference and naive ways
    # (fp32 logits over 1500 x 1500 frames, 24 layers, batch 8) would not fit in 80 GB.
    CONFIG = dict(checkpointing=True)
    BATCH, MEL_FRAMES, TEXT, DTYPE, ROUNDS = 8, 3000, 448, torch.bfloat16, 5
else:
    # Whisper tiny's widths and depths (the demo's model) on the 30 s window every clip is padded to.
    # Ten rounds: a round's time on a shared 2-core machine moves by 10-20%, five left the medians' ratios
    # a few percent apart from run to run.
    CONFIG = dict(TINY, checkpointing=False)
    BATCH, MEL_FRAMES, TEXT, DTYPE, ROUNDS = 1, 3000, 32, torch.float32, 10
DECODE_STEPS = 32
if bench_size() == "tiny":  # two blocks of width 64 on 0.3 s of audio
    CONFIG = dict(n_audio_ctx=16, n_audio_state=64, n_audio_head=4, n_audio_layer=2, n_text_ctx=16,
                  n_text_state=64, n_text_head=4, n_text_layer=2, checkpointing=False)
    MEL_FRAMES, TEXT, DECODE_STEPS = 32, 8, 4
ECHO_WAYS = ("echo", "reference", "naive")
# openai-whisper is the speech extra: its cases are marked `speech` (the harness hides the extra from
# the others, and names them as not run where it is missing)
PEERS = ("hf-whisper", pytest.param("openai-whisper", marks=pytest.mark.speech))


@contextlib.contextmanager
def way(name: str, monkeypatch):
    """Run the Echo model the way `name` says."""
    if name == "naive":
        with naive_ops():
            yield
        return
    monkeypatch.setenv("ECHO_BACKEND", "reference" if name == "reference" else "auto")
    yield


@pytest.fixture(scope="module")
def echo_model():
    torch.manual_seed(0)
    model = Echo(EchoConfig(**CONFIG))
    model.apply_initialization()
    return model.to(DEVICE, DTYPE)


@pytest.fixture(scope="module")
def whisper_model():
    c = EchoConfig(**CONFIG)
    config = WhisperConfig(
        vocab_size=c.vocab_size, num_mel_bins=c.n_mels, d_model=c.n_audio_state,
        encoder_layers=c.n_audio_layer, encoder_attention_heads=c.n_audio_head,
        encoder_ffn_dim=4 * c.n_audio_state,
        decoder_layers=c.n_text_layer, decoder_attention_heads=c.n_text_head,
        decoder_ffn_dim=4 * c.n_text_state,
        max_source_positions=c.n_audio_ctx, max_target_positions=c.n_text_ctx,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        decoder_start_token_id=c.decoder_start_token_id,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.config._attn_implementation = "sdpa"
    if c.checkpointing:  # the same memory policy as Echo's
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(DEVICE, DTYPE)


@pytest.fixture(scope="module")
def openai_whisper_model():
    from whisper.model import ModelDimensions, Whisper

    c = EchoConfig(**CONFIG)
    dims = ModelDimensions(n_mels=c.n_mels, n_audio_ctx=c.n_audio_ctx, n_audio_state=c.n_audio_state,
                           n_audio_head=c.n_audio_head, n_audio_layer=c.n_audio_layer, n_vocab=c.vocab_size,
                           n_text_ctx=c.n_text_ctx, n_text_state=c.n_text_state, n_text_head=c.n_text_head,
                           n_text_layer=c.n_text_layer)
    torch.manual_seed(0)
    # float32 parameters, as openai-whisper keeps them: its Linear and Conv1d cast the weights to the
    # activations' dtype (DTYPE, from the batch) and its LayerNorm computes in float32
    return Whisper(dims).to(DEVICE)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(BATCH, 80, MEL_FRAMES, generator=g).to(DEVICE, DTYPE)
    labels = torch.randint(0, 50000, (BATCH, TEXT), generator=g).to(DEVICE)
    return mel, labels


def model_flops(training: bool) -> float:
    """Matrix-product FLOPs of one forward (x3 for forward + backward): projections, MLPs, attention
    over every (query, key) pair, the front end's second conv and the logits. The same for all four
    ways of computing, so the fraction of the matmul rate compares them fairly."""
    c = EchoConfig(**CONFIG)
    Ta, L, Da, Dt = MEL_FRAMES // 2, TEXT if training else DECODE_STEPS, c.n_audio_state, c.n_text_state
    encoder = c.n_audio_layer * (2 * Ta * 12 * Da**2 + 4 * Ta * Ta * Da) + 2 * Ta * 3 * Da**2
    decoder = c.n_text_layer * (2 * L * 14 * Dt**2 + 2 * Ta * 2 * Da * Dt + 4 * L * (L + Ta) * Dt)
    logits = 2 * L * Dt * c.vocab_size
    return BATCH * (encoder + decoder + logits) * (3 if training else 1)


def training_step(model, mel, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_features=mel, labels=labels).loss
    loss.backward()
    return loss


def openai_training_step(model, mel, labels):
    """openai-whisper's forward gives logits only: the same loss as the others (labels shifted right
    behind the start token)."""
    model.zero_grad(set_to_none=True)
    start = torch.full_like(labels[:, :1], EchoConfig(**CONFIG).decoder_start_token_id)
    logits = model(mel, torch.cat([start, labels[:, :-1]], dim=1))
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    return loss


@torch.no_grad()
def echo_inference(model, mel):
    """Encoder, then DECODE_STEPS greedy tokens one at a time through the KV cache."""
    cache = EchoCache(positions=model.positional_state())
    xa, _ = model.encode(mel, pos=cache.positions)
    token = torch.full((mel.shape[0], 1), model.config.decoder_start_token_id, device=mel.device)
    out = model(encoder_outputs=xa, decoder_input_ids=token, past_key_values=cache, use_cache=True)
    for _ in range(DECODE_STEPS - 1):
        token = out.logits[:, -1:].argmax(-1)
        out = model(decoder_input_ids=token, past_key_values=cache, use_cache=True)
    return out.logits


# The KV cache's keyword and output field: `cache` where the installed transformers has renamed
# past_key_values (which it deprecates, and drops in 5.40), past_key_values before that.
WHISPER_CACHE = ("cache" if "cache" in inspect.signature(WhisperForConditionalGeneration.forward).parameters
                 else "past_key_values")


@torch.no_grad()
def whisper_inference(model, mel):
    encoder_out = model.model.encoder(mel)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    token = torch.full((mel.shape[0], 1), model.config.decoder_start_token_id, device=mel.device)
    for _ in range(DECODE_STEPS):
        out = model(encoder_outputs=encoder_out, decoder_input_ids=token, use_cache=True,
                    **{WHISPER_CACHE: cache})
        cache = getattr(out, WHISPER_CACHE)
        token = out.logits[:, -1:].argmax(-1)
    return out.logits


@torch.no_grad()
def openai_whisper_inference(model, mel):
    """openai-whisper's own KV cache (its hooks on the key and value projections), as its decoding uses it."""
    cache, hooks = model.install_kv_cache_hooks()
    try:
        xa = model.embed_audio(mel)
        tokens = torch.full((mel.shape[0], 1), EchoConfig(**CONFIG).decoder_start_token_id, device=mel.device)
        for _ in range(DECODE_STEPS):
            logits = model.decoder(tokens[:, -1:], xa, kv_cache=cache)
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    finally:
        for hook in hooks:
            hook.remove()
    return logits


def test_naive_baseline_computes_the_same_model(echo_model, batch, monkeypatch):
    """The naive baseline is only a fair peer if it computes what the package computes."""
    mel, labels = batch[0][:1], batch[1][:1]
    echo_model.eval()
    with torch.no_grad():
        ours = echo_model(input_features=mel, labels=labels).logits
        with naive_ops():
            naive = echo_model(input_features=mel, labels=labels).logits
    assert (ours - naive).norm() / ours.norm() < same_model_tolerance(DTYPE)


def same_model_tolerance(dtype: torch.dtype) -> float:
    """How far the naive way's logits may land from the package's. The two ways differ in how the
    attention and rotary ops compute (the angles are float32 in both): each way's result of them is
    rounded to `dtype` on its way into the residual stream, 2 roundings in all. float32 also
    accumulates its own sums: each term of the longest one, an MLP's hidden width, is a rounding too
    (half dtypes accumulate in float32, whose roundings are below a hundredth of theirs)."""
    accumulated = 4 * EchoConfig(**CONFIG).n_audio_state if dtype == torch.float32 else 0
    return reference.rounding_tolerance(dtype, 2 + accumulated)


def timed_round(benchmark, fn, args, round_: int, warmup_calls: int = 2) -> object:
    """One round of an alternating_rounds case; the first round of each way runs `warmup_calls` first."""
    return run_timed(benchmark, fn, args=args, rounds=1, warmup_rounds=warmup_calls if round_ == 0 else 0)


@pytest.mark.parametrize("name, round_", alternating_rounds(ECHO_WAYS + PEERS, ROUNDS))
def test_training_step(benchmark, name, round_, echo_model, whisper_model, batch, monkeypatch, request):
    mel, labels = batch
    benchmark.group = f"training step B={BATCH} T={MEL_FRAMES} L={TEXT} {str(DTYPE)[6:]}"
    if name == "hf-whisper":
        model = whisper_model.train()
        timed_round(benchmark, training_step, (model, mel, labels), round_)
    elif name == "openai-whisper":
        model = request.getfixturevalue("openai_whisper_model").train()
        timed_round(benchmark, openai_training_step, (model, mel, labels), round_)
    else:
        model = echo_model.train()
        with way(name, monkeypatch):
            timed_round(benchmark, training_step, (model, mel, labels), round_)
    record(benchmark, role="ours" if name == "echo" else "peer", case=name, flops=model_flops(training=True))


@pytest.mark.parametrize("name, round_", alternating_rounds(ECHO_WAYS + PEERS, ROUNDS))
def test_inference(benchmark, name, round_, echo_model, whisper_model, batch, monkeypatch, request):
    mel = batch[0]
    benchmark.group = f"inference B={BATCH} T={MEL_FRAMES} + {DECODE_STEPS} steps {str(DTYPE)[6:]}"
    if name == "hf-whisper":
        timed_round(benchmark, whisper_inference, (whisper_model.eval(), mel), round_)
    elif name == "openai-whisper":
        model = request.getfixturevalue("openai_whisper_model").eval()
        timed_round(benchmark, openai_whisper_inference, (model, mel), round_)
    else:
        with way(name, monkeypatch):
            timed_round(benchmark, echo_inference, (echo_model.eval(), mel), round_)
    record(benchmark, role="ours" if name == "echo" else "peer", case=name, flops=model_flops(training=False))


@pytest.fixture(scope="module")
def waveform():
    """One window of noise at 16 kHz: 30 s for the full models."""
    g = torch.Generator().manual_seed(0)
    return 0.1 * torch.randn(MEL_FRAMES * 160, generator=g)


def echo_transcription(model, wave):
    eot = model.config.eos_token_id
    return model.transcribe(wave, language="en", temperature=0.0, max_new_tokens=DECODE_STEPS,
                            suppress_tokens=[eot], suppress_blank=False, compression_ratio_threshold=None,
                            logprob_threshold=None)


def openai_whisper_transcription(model, wave):
    import whisper

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(wave, MEL_FRAMES * 160), model.dims.n_mels)
    # its decoding runs in float32 or, fp16=True, float16 (it has no bf16): 16-bit where the others are
    options = whisper.DecodingOptions(language="en", without_timestamps=True, sample_len=DECODE_STEPS,
                                      fp16=DTYPE != torch.float32,
                                      suppress_tokens=[EchoConfig(**CONFIG).eos_token_id],
                                      suppress_blank=False)
    return whisper.decode(model, mel.to(DEVICE), options)


def hf_whisper_transcription(model, wave, start):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    # the models' window (30 s full size)
    extractor.n_samples, extractor.nb_max_frames = MEL_FRAMES * 160, MEL_FRAMES
    mel = extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features.to(DEVICE, DTYPE)
    with torch.no_grad():
        return model.generate(mel, decoder_input_ids=start, max_new_tokens=DECODE_STEPS,
                              min_new_tokens=DECODE_STEPS, do_sample=False)


@pytest.mark.speech  # whisper's tokenizer gives every model its start sequence
@pytest.mark.parametrize("name, round_", alternating_rounds(("echo", "hf-whisper", "openai-whisper"), ROUNDS))
def test_transcription(benchmark, name, round_, echo_model, whisper_model, openai_whisper_model, waveform):
    """Waveform to DECODE_STEPS greedy tokens after the English start sequence, each library's own way."""
    benchmark.group = f"transcription of {MEL_FRAMES // 100} s, {DECODE_STEPS} tokens {str(DTYPE)[6:]}"
    if name == "echo":
        result = timed_round(benchmark, echo_transcription, (echo_model.eval(), waveform), round_,
                             warmup_calls=1)
        assert len(result["segments"][0]["tokens"]) == DECODE_STEPS
    elif name == "openai-whisper":
        result = timed_round(benchmark, openai_whisper_transcription, (openai_whisper_model.eval(), waveform),
                             round_, warmup_calls=1)
        assert len(result.tokens) == DECODE_STEPS
    else:
        from echo.audio import prompt_tokens

        c = EchoConfig(**CONFIG)
        start = torch.tensor([prompt_tokens("en", "transcribe", vocab_size=c.vocab_size)], device=DEVICE)
        result = timed_round(benchmark, hf_whisper_transcription, (whisper_model.eval(), waveform, start),
                             round_, warmup_calls=1)
        # WhisperForConditionalGeneration.generate returns the new tokens
        assert result.shape[1] == DECODE_STEPS
    record(benchmark, role="ours" if name == "echo" else "peer", case=name)
