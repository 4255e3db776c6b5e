"""Starting from a pretrained Whisper (echo.convert; docs/model.md, Starting from Whisper): randomly
initialised small Whispers of openai-whisper and of transformers, English-only and multilingual, 80 and
128 mels, become Echos that compute their function; greedy decoding and transcription give whisper's tokens
and text; training moves the extras off the identity; bad sources are clear errors."""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from echo import Echo
from echo.cache import EchoCache
from echo.convert.__main__ import main as convert_main
from echo.generate import logit_filter
from echo.positional import CombinedRotaryEmbedding, GivensSite

from numerics import rel_err

pytestmark = pytest.mark.speech  # every test here builds an openai-whisper model

SPEECH = Path(__file__).parent / "data" / "speech"
CLIPS = ["arctic_a0007.wav", "arctic_a0009.wav"]
AUDIO_CTX = 200  # 4-second windows: the ARCTIC clips fit one

# (vocabulary, mel bins): English-only, multilingual, large-v3's multilingual
VOCABS = [(51864, 80), (51865, 80), (51866, 128)]


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights, LayerNorm scales near 1 (Whisper's own init leaves the decoder positions empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = (p.dim() == 1 and name.endswith("weight")
                             and ("ln" in name or "layer_norm" in name))
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.2 * noise)


def openai_whisper(vocab: int, n_mels: int, seed: int = 0, n_audio_ctx: int = AUDIO_CTX):
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=n_mels, n_audio_ctx=n_audio_ctx, n_audio_state=64, n_audio_head=4,
                           n_audio_layer=2, n_vocab=vocab, n_text_ctx=32, n_text_state=64, n_text_head=4,
                           n_text_layer=2)
    model = Whisper(dims)
    randomise(model, seed)
    return model.eval()


def hf_whisper(vocab: int, n_mels: int, seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    eot = 50256 if vocab == 51864 else 50257
    config = WhisperConfig(vocab_size=vocab, num_mel_bins=n_mels, d_model=64, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=AUDIO_CTX,
                           max_target_positions=32, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                           decoder_start_token_id=eot + 1)
    model = WhisperForConditionalGeneration(config)
    randomise(model, seed)
    # tied, as trained ones are
    model.model.decoder.embed_tokens.weight.data.copy_(model.proj_out.weight.data)
    return model.eval()


def clip_mel(name: str, n_mels: int, frames: int = 2 * AUDIO_CTX) -> torch.Tensor:
    """whisper's log-mel of a clip, padded or cut to the model's window: (n_mels, frames)."""
    import whisper

    audio = whisper.pad_or_trim(whisper.load_audio(str(SPEECH / name)), frames * 160)
    return whisper.log_mel_spectrogram(audio, n_mels=n_mels)


def tokens_for(vocab: int) -> torch.Tensor:
    sot = 50257 if vocab == 51864 else 50258
    return torch.tensor([[sot, 300, 1000, 7000, 220, 50000], [sot, 40, 5000, 9, 31000, 12]])


@pytest.mark.parametrize("vocab,n_mels", VOCABS, ids=["en-80", "multi-80", "v3-128"])
def test_openai_whisper_imports_exactly(vocab, n_mels):
    whisper_model = openai_whisper(vocab, n_mels)
    echo = Echo.from_whisper(whisper_model)
    mel = torch.stack([clip_mel(c, n_mels) for c in CLIPS])
    tokens = tokens_for(vocab)
    with torch.no_grad():
        audio = whisper_model.encoder(mel)
        expected = whisper_model.logits(tokens, audio)
        assert rel_err(echo.encode(mel)[0], audio) < 1e-5
        assert rel_err(echo(mel, decoder_input_ids=tokens).logits, expected) < 1e-5
        cache = EchoCache()  # token by token through the KV cache
        steps = [echo(mel if i == 0 else None, decoder_input_ids=tokens[:, i: i + 1], past_key_values=cache,
                      use_cache=True).logits for i in range(tokens.shape[1])]
        assert rel_err(torch.cat(steps, dim=1), expected) < 1e-5
    assert echo.config.vocab_size == vocab and echo.config.n_mels == n_mels
    assert echo.config.positional_norm == "none"


@pytest.mark.parametrize("vocab,n_mels", [(51865, 80), (51864, 128)], ids=["multi-80", "en-128"])
def test_hugging_face_whisper_imports_exactly(vocab, n_mels, tmp_path):
    hf = hf_whisper(vocab, n_mels, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    mel = torch.stack([clip_mel(c, n_mels) for c in CLIPS])
    tokens = tokens_for(vocab)
    with torch.no_grad():
        expected = hf(input_features=mel, decoder_input_ids=tokens).logits
        audio = hf.model.encoder(mel).last_hidden_state
        for source in (hf, tmp_path / "hf"):
            echo = Echo.from_whisper(source)
            assert rel_err(echo.encode(mel)[0], audio) < 1e-5
            assert rel_err(echo(mel, decoder_input_ids=tokens).logits, expected) < 1e-5
    assert echo.config.decoder_start_token_id == hf.config.decoder_start_token_id


@pytest.mark.parametrize("vocab", [51864, 51865], ids=["en", "multi"])
def test_greedy_tokens_are_whispers(vocab):
    from whisper.decoding import DecodingOptions, decode

    whisper_model = openai_whisper(vocab, 80, seed=3)
    echo = Echo.from_whisper(whisper_model)
    options = DecodingOptions(without_timestamps=True, fp16=False, language="en" if vocab == 51864 else None)
    for name in CLIPS:
        mel = clip_mel(name, 80)
        theirs = decode(whisper_model, mel, options)
        ours = echo.generate(mel[None], return_dict_in_generate=True).rows[0]
        assert len(theirs.tokens) > 3  # random weights say something arbitrary, but comparable
        assert [t for t in ours.tokens if t != echo.config.eos_token_id] == theirs.tokens
        assert ours.language == theirs.language


@pytest.mark.parametrize("vocab", [51864, 51865, 51866])
def test_logit_filters_are_whispers(vocab):
    from whisper.decoding import DecodingOptions, DecodingTask

    whisper_model = openai_whisper(vocab, 80)
    echo = Echo.from_whisper(whisper_model)
    task = DecodingTask(whisper_model, DecodingOptions(without_timestamps=True, fp16=False, language="en"))
    begin = task.sample_begin
    ours = logit_filter(echo.config, begin)
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(vocab))
    for length in (begin, begin + 1):  # the first sampled token (blank suppressed), then any later one
        tokens = torch.full((2, length), 220)
        theirs = logits.clone()
        for rule in task.logit_filters:
            rule.apply(theirs, tokens)
        assert torch.equal(ours(logits, tokens), theirs)
        assert int(torch.isinf(theirs[0]).sum()) > 80  # non-speech symbols and specials
    off = logit_filter(echo.config, begin, suppress_tokens=None, suppress_blank=False)
    assert off(logits, torch.full((2, begin), 220)) is logits


@pytest.mark.slow
def test_transcription_is_whispers():
    import whisper

    whisper_model = openai_whisper(51864, 80, seed=5, n_audio_ctx=1500)  # whisper.transcribe's 30 s windows
    echo = Echo.from_whisper(whisper_model)
    path = str(SPEECH / CLIPS[0])
    theirs = whisper.transcribe(whisper_model, path, temperature=0.0, without_timestamps=True, fp16=False,
                                condition_on_previous_text=False, language="en", verbose=None)
    ours = echo.transcribe(path, temperature=0.0, language="en")
    assert len(theirs["text"].split()) > 1 and ours["text"] == theirs["text"].strip()


def test_checkpoint_file_converts_to_an_echo_folder(tmp_path, caplog):
    from transformers import AutoModelForSpeechSeq2Seq

    whisper_model = openai_whisper(51865, 80, seed=2)
    torch.save({"dims": dataclasses.asdict(whisper_model.dims),
                "model_state_dict": whisper_model.state_dict()},
               tmp_path / "tiny.pt")
    assert convert_main([str(tmp_path / "tiny.pt"), str(tmp_path / "echo")]) == 0
    mel = clip_mel(CLIPS[1], 80)[None]
    tokens = tokens_for(51865)[:1]
    with torch.no_grad():
        expected = whisper_model.logits(tokens, whisper_model.encoder(mel))
        for loaded in (Echo.from_pretrained(tmp_path / "echo"),
                       AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "echo")):
            assert isinstance(loaded, Echo)
            assert rel_err(loaded(mel, decoder_input_ids=tokens).logits, expected) < 1e-5
    with caplog.at_level(logging.WARNING, logger="echo.convert"):
        assert convert_main([str(tmp_path / "tiny.pt"), str(tmp_path / "local"),
                             "--set", "local_window=8"]) == 0
    assert "start fresh" in caplog.text and "local_attn" in caplog.text
    local = Echo.from_pretrained(tmp_path / "local")
    assert local.config.local_window == 8
    with torch.no_grad():  # the fresh local branch adds nothing yet: still Whisper's function
        assert rel_err(local(mel, decoder_input_ids=tokens).logits, expected) < 1e-5


def test_bad_sources_are_clear_errors(tmp_path):
    whisper_model = openai_whisper(51865, 80)
    dims = dataclasses.asdict(whisper_model.dims)
    state = whisper_model.state_dict()
    torch.save({"weights": torch.randn(3, 3)}, tmp_path / "random.pt")
    with pytest.raises(ValueError, match="not an openai-whisper checkpoint.*'dims'"):
        Echo.from_whisper(tmp_path / "random.pt")
    torch.save({"dims": dims, "model_state_dict": state}, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pt is not a readable openai-whisper checkpoint"):
        Echo.from_whisper(tmp_path / "truncated.pt")
    wrong = dict(state, **{"decoder.blocks.1.mlp.0.weight": torch.randn(256, 63)})
    torch.save({"dims": dims, "model_state_dict": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"decoder.blocks.1.mlp.0.weight has shape \(256, 63\).*\(256, 64\)"):
        Echo.from_whisper(tmp_path / "wrong.pt")
    missing = {k: v for k, v in state.items() if k != "encoder.blocks.0.attn.key.weight"}
    torch.save({"dims": dims, "model_state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing tensor.*encoder.blocks.0.attn.key.weight"):
        Echo.from_whisper(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        Echo.from_whisper(tmp_path / "nothere.pt")
    with pytest.raises(ValueError, match="not a Whisper"):
        Echo.from_whisper(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="n_mels.*cannot be overridden"):
        Echo.from_whisper(whisper_model, n_mels=128)
    with pytest.raises(ValueError, match="unknown EchoConfig keys: colour"):
        Echo.from_whisper(whisper_model, colour="blue")
    Echo(Echo.from_whisper(whisper_model).config).save_pretrained(tmp_path / "an-echo")
    with pytest.raises(ValueError, match="already an Echo folder"):
        Echo.from_whisper(tmp_path / "an-echo")
    with pytest.raises(SystemExit, match="python -m echo.convert: .*random.pt is not an openai-whisper"):
        convert_main([str(tmp_path / "random.pt"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def extras(model: Echo) -> dict[str, torch.Tensor]:
    """The parameters Whisper does not have, by name."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, GivensSite):
            names[f"{name}.thetas"], names[f"{name}.R"] = module.thetas, module.R
        elif isinstance(module, CombinedRotaryEmbedding):
            names[f"{name}.w"] = module.w
        elif hasattr(module, "site") and hasattr(module, "s"):
            names[f"{name}.s"], names[f"{name}.bias"] = module.s, module.bias
    return names


def test_fine_tuning_moves_every_extra_off_the_identity():
    """s, the bias, the residual rotary's w and angles, and every R learn from the first step; attention
    angles rotate q and k alike, which cancels while s = 0, so they learn from the second step on."""
    torch.manual_seed(0)
    model = Echo.from_whisper(openai_whisper(51865, 80, seed=4), checkpointing=False).train()
    start = {n: p.detach().clone() for n, p in extras(model).items()}
    mel = torch.stack([clip_mel(c, 80) for c in CLIPS])
    labels = tokens_for(51865)[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    attention_angles = [n for n in start if n.endswith("attn.site.thetas")]
    assert attention_angles and len(start) > 3 * len(attention_angles)
    for step in (1, 2):
        optimizer.zero_grad()
        model(mel, labels=labels).loss.backward()
        for name, p in extras(model).items():
            norm = p.grad.norm().item()
            if step == 1 and name in attention_angles:
                assert norm < 1e-6 * extras(model)[name.replace("thetas", "R")].grad.norm().item(), name
            else:
                assert norm > 0, (step, name)
        optimizer.step()
    for name, p in extras(model).items():
        assert not torch.equal(p, start[name]), name
    assert float(model.base) != 10000.0  # the adaptive base moved too
    np.testing.assert_array_equal(start["encoder.rotary.w"].numpy(), 0.0)


def test_train_init_fine_tunes_an_imported_whisper(tmp_path):
    from echo import train
    from train_cases import write_manifest

    manifest = write_manifest(tmp_path / "data")  # half-second clips
    whisper_model = openai_whisper(51864, 80, seed=6, n_audio_ctx=25)  # a half-second window, English-only
    torch.save({"dims": dataclasses.asdict(whisper_model.dims),
                "model_state_dict": whisper_model.state_dict()},
               tmp_path / "w.pt")
    assert convert_main([str(tmp_path / "w.pt"), str(tmp_path / "echo")]) == 0
    runs = {}
    for name, source in (("from-pt", tmp_path / "w.pt"), ("from-folder", tmp_path / "echo")):
        out = tmp_path / name
        assert train.main(["--manifest", str(manifest), "--out", str(out), "--init", str(source),
                           "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--warmup", "1",
                           "--no-progress", "--workers", "2"]) == 0
        runs[name] = Echo.from_pretrained(out / "model")
    tuned, imported = runs["from-pt"], Echo.from_whisper(whisper_model)
    assert tuned.config.vocab_size == 51864 and tuned.config.positional_norm == "none"
    for name, p in runs["from-folder"].state_dict().items():
        assert torch.equal(p, tuned.state_dict()[name]), name  # the .pt and its converted folder train alike
    moved = {n: not torch.equal(p, imported.state_dict()[n]) for n, p in tuned.state_dict().items()}
    assert moved["encoder.blocks.0.attn.s"] and moved["decoder.rotary.w"] and moved["encoder.conv1.weight"]
    assert float(tuned.base) != 10000.0
    with pytest.raises(SystemExit, match="takes at most 0.5 s"):
        train.main(["--manifest", str(manifest), "--out", str(tmp_path / "bad"),
                    "--init", str(tmp_path / "w.pt"), "--seconds", "3"])
