"""EchoConfig: checks of impossible values, WhisperConfig conversion, and the WhisperConfig form of
docs/model.md, Configuration."""

import json

import pytest
import torch
from transformers import WhisperConfig

from echo import Echo, EchoConfig
from echo.config import SMALL, small_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_audio_state=60, n_audio_head=4), "must be even"),  # h = 15
        (dict(n_text_state=512, n_text_head=2), r"h = n_text_state / n_text_head = 256 is wider than the "
                                                r"attention kernels serve \(h <= 128; built for 32, 64, 128"),
        (dict(n_text_state=64, n_text_head=5), "does not divide"),
        (dict(max_rel_dist=0), "max_rel_dist"),
        (dict(local_window=-1), "local_window"),
        (dict(rope_layout="diagonal"), "rope_layout"),
        (dict(mlp="swiglu"), "mlp"),
        (dict(layer_norm="rms"), "layer_norm"),
        (dict(hybrid_combine="max"), "hybrid_combine"),
        (dict(attention_rotation="rope_only"), "attention_rotation"),
        (dict(n_givens=16), "n_givens"),  # h = 16: adjacent pairs stop at (14, 15)
        (dict(n_audio_layer=0), "n_audio_layer"),
        (dict(pad_token_id=100), "pad_token_id"),
        (dict(base=1.0), "base"),
    ],
)
def test_impossible_config_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_values_changed_after_construction_are_checked_by_the_model():
    config = small_config()
    config.n_text_head = 3
    with pytest.raises(ValueError, match="n_text_head"):
        Echo(config)


def test_whisper_config_keys_are_read_and_whisper_own_keys_ignored():
    whisper = WhisperConfig(**SMALL, d_model=999, encoder_layers=7, is_encoder_decoder=True, init_std=0.02)
    model = Echo(whisper)
    assert isinstance(model.config, EchoConfig)
    assert model.config.model_type == "echo"
    assert model.config.n_audio_state == SMALL["n_audio_state"]
    assert len(model.encoder.blocks) == SMALL["n_audio_layer"]
    assert model.decoder.token_embedding.weight.shape == (SMALL["vocab_size"], SMALL["n_text_state"])


def test_whisper_config_form_runs_unchanged(tmp_path, monkeypatch):
    # the WhisperConfig form of docs/model.md, Configuration, with the sizes shrunk
    monkeypatch.chdir(tmp_path)
    device = "cpu"
    config = WhisperConfig(
        n_mels=80,
        n_audio_ctx=16,
        n_audio_state=64,
        n_audio_head=4,
        n_audio_layer=2,
        vocab_size=51865,
        n_text_ctx=12,
        n_text_state=64,
        n_text_head=4,
        n_text_layer=2,
        max_rel_dist=15,
        cross_attention=True,
        checkpointing=True,
        base=10000,
        bos_token_id = 50257,
        eos_token_id = 50257,
        pad_token_id = 50257,
        decoder_start_token_id = 50258,
        is_encoder_decoder = True,
        init_std=0.02,
    )

    model = Echo(config).to(device)

    model.apply_initialization()

    model.save_pretrained("./models/echo2")

    model = Echo.from_pretrained("./models/echo2")

    assert isinstance(model, Echo) and isinstance(model.config, EchoConfig)
    assert json.loads((tmp_path / "models/echo2/config.json").read_text())["model_type"] == "echo"
    out = model(torch.randn(1, 80, 32), decoder_input_ids=torch.tensor([[50258, 50257]]))
    assert out.logits.shape == (1, 2, 51865)
