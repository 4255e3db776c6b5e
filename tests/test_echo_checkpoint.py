"""save_pretrained / from_pretrained: bit-for-bit round trips, Auto classes, and refused folders."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq, WhisperConfig

from echo import Echo, EchoConfig
from echo.config import ECHO_DEFAULTS, SMALL, small_config


def trained(**overrides):
    torch.manual_seed(0)
    model = Echo(small_config(**overrides))
    model.apply_initialization()
    model.train()
    mel = torch.randn(2, model.config.n_mels, 32)
    labels = torch.randint(4, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        for p in model.parameters():  # move every parameter off its initial value
            p.add_(0.01 * torch.randn_like(p))
    model(mel, labels=labels).loss.backward()  # base and prev_loss change
    return model.eval(), mel, labels


def assert_identical(a, b, mel, labels):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(a(mel, labels=labels).logits, b(mel, labels=labels).logits)


@pytest.mark.parametrize("overrides", [{}, dict(local_window=2, hybrid_combine="linear", conv_attention=True,
                                                mlp="s1", layer_norm="s1", rope_layout="interleaved",
                                                attention_rotation="rope_then_m")])
def test_round_trip_is_bit_for_bit(tmp_path, overrides):
    model, mel, labels = trained(**overrides)
    assert model.base.item() != model.config.base  # the adaptive state is not the initial one
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for key in ("base", "prev_loss", "encoder.rotary.site.pairs", "decoder.blocks.0.attn.site.pairs"):
        assert key in saved
    for loader in (Echo.from_pretrained, AutoModelForSpeechSeq2Seq.from_pretrained,
                   AutoModel.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is Echo and type(loaded.config) is EchoConfig
        for key in ECHO_DEFAULTS:
            assert getattr(loaded.config, key) == getattr(model.config, key), key
        assert_identical(model, loaded, mel, labels)
    assert type(AutoConfig.from_pretrained(tmp_path)) is EchoConfig


def test_a_config_saved_before_attention_rotation_loads_as_rope_then_m(tmp_path, caplog):
    """Before the key existed attention computed RoPE(q) M with M = R G_1 ... G_N: a folder without it
    loads in that order, says so once per load, and gives the saved model's outputs bit for bit."""
    model, mel, labels = trained(attention_rotation="rope_then_m")
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["attention_rotation"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for loader in (Echo.from_pretrained, AutoModelForSpeechSeq2Seq.from_pretrained):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = loader(tmp_path)
        warnings = [r for r in caplog.records if "attention_rotation" in r.getMessage()]
        assert len(warnings) == 1 and "rope_then_m" in warnings[0].getMessage()
        assert loaded.config.attention_rotation == "rope_then_m"
        assert not loaded.decoder.blocks[0].attn.site.givens_first  # M = R G_1 ... G_N
        assert_identical(model, loaded, mel, labels)
    assert EchoConfig.from_dict({"model_type": "echo", **SMALL}).attention_rotation == "rope_then_m"
    assert EchoConfig(**SMALL).attention_rotation == "m_then_rope"  # a new config: the default


def test_sharded_round_trip(tmp_path):
    model, mel, labels = trained()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_identical(model, Echo.from_pretrained(tmp_path), mel, labels)


def test_whisper_config_model_reloads_as_echo(tmp_path):
    model = Echo(WhisperConfig(**SMALL, is_encoder_decoder=True))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "echo"
    loaded = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(loaded) is Echo and type(loaded.config) is EchoConfig


def test_not_an_echo_folder(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        Echo.from_pretrained(tmp_path)
    WhisperConfig(d_model=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'whisper'"):
        Echo.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a local folder"):
        Echo.from_pretrained(tmp_path / "nowhere")


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    model, _, _ = trained()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = load_file(path)

    def check(tensors, message):
        save_file(tensors, path, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            Echo.from_pretrained(tmp_path)

    check({k: v for k, v in good.items() if k != "prev_loss"}, "missing tensors: prev_loss")
    check({**good, "decoder.extra": torch.zeros(2)}, "unexpected tensors: decoder.extra")
    check({**good, "decoder.blocks.1.attn.bias": torch.zeros(3, 4)},
          r"decoder.blocks.1.attn.bias has shape \(3, 4\)")
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        Echo.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither"):
        Echo.from_pretrained(tmp_path)


def test_config_from_the_folder_must_match_the_tensors(tmp_path):
    model, _, _ = trained()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["n_text_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="missing tensors: decoder.blocks.2"):
        Echo.from_pretrained(tmp_path)
