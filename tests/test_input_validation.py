"""Inputs that used to fail late or silently: half-precision models, multichannel audio, end tokens,
config files and saved index pairs, scale and label dtypes, decoding arguments, espeak-ng texts."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import echo_kernels as ek
from echo import Echo, EchoConfig, synthetic
from echo.audio import downmix, load_audio, log_mel_spectrogram, pad_or_trim
from echo.config import small_config
from test_generate import mel, random_model


def wave(seconds=0.5, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def window_tokens(model, audio, **kwargs):
    """The tokens of each window of `audio`, by generate on windows cut as transcribe cuts them."""
    window = 2 * model.config.n_audio_ctx
    full = log_mel_spectrogram(audio, n_mels=model.config.n_mels, padding=window * 160)
    content = full.shape[-1] - window
    windows = torch.stack([pad_or_trim(full[:, s: min(s + window, content)], window)
                           for s in range(0, content, window)])
    return [row.tokens for row in model.generate(windows, return_dict_in_generate=True, **kwargs).rows]


# --------------------------------------------------------------------------------------------------
# half precision

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_generate_casts_float32_features_to_the_models_dtype(dtype):
    model = random_model().to(dtype)
    x = mel(B=2)
    out = model.generate(x, max_new_tokens=5)
    assert out.shape[0] == 2 and torch.all(out[:, 0] == model.config.decoder_start_token_id)
    assert torch.equal(out, model.generate(x.to(dtype), max_new_tokens=5))  # the same as casting by hand
    with torch.no_grad():
        assert model.encode(x)[0].dtype == dtype
        assert torch.isfinite(model(x, labels=torch.tensor([[5, 6], [7, 2]])).loss)


@pytest.mark.speech
@pytest.mark.parametrize("dtype", HALF)
def test_transcribe_in_half_precision(dtype):
    model = random_model(seed=2).to(dtype)
    audio = wave(0.5)  # 50 mel frames: two windows of 2 * n_audio_ctx = 32
    result = model.transcribe(audio, max_new_tokens=4, temperature=0.0)
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 0.32), (0.32, 0.5)]
    assert [s["tokens"] for s in result["segments"]] == window_tokens(model, audio, max_new_tokens=4,
                                                                      temperature=0.0)


def test_features_beyond_float16_are_refused():
    model = random_model().half()
    with pytest.raises(ValueError, match="beyond the range of the model's dtype torch.float16"):
        model.generate(torch.full((1, 80, 8), 1e6), max_new_tokens=2)


# --------------------------------------------------------------------------------------------------
# multichannel audio and batch_size

@pytest.mark.speech
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
@pytest.mark.parametrize("channels", [2, 6])
def test_a_multichannel_clip_is_one_clip_of_its_channel_mean(layout, kind, channels):
    model = random_model(seed=3)
    stacked = np.stack([wave(0.4, seed=c) for c in range(channels)])  # (channels, samples)
    mono = stacked.mean(axis=0)
    clip = stacked if layout == "channels_first" else stacked.T
    clip = torch.from_numpy(np.ascontiguousarray(clip)) if kind == "tensor" else clip
    np.testing.assert_allclose(load_audio(clip), mono, rtol=1e-6, atol=1e-7)
    result = model.transcribe(clip, max_new_tokens=3, temperature=0.0)
    assert isinstance(result, dict) and result["segments"][-1]["end"] == 0.4  # one clip, not a batch
    expected = model.transcribe(mono, max_new_tokens=3, temperature=0.0)
    assert [s["tokens"] for s in result["segments"]] == [s["tokens"] for s in expected["segments"]]


@pytest.mark.speech
def test_a_list_of_clips_is_a_batch_whatever_their_channels():
    model = random_model(seed=3)
    stereo = np.stack([wave(0.3, seed=1), wave(0.3, seed=2)], axis=1)  # (samples, 2)
    results = model.transcribe([stereo, wave(0.2)], max_new_tokens=2, temperature=0.0)
    assert [r["segments"][-1]["end"] for r in results] == [0.3, 0.2]
    single = model.transcribe(stereo.mean(axis=1), max_new_tokens=2, temperature=0.0)
    assert results[0]["segments"][0]["tokens"] == single["segments"][0]["tokens"]


@pytest.mark.parametrize("shape", [(3, 16000), (16000, 3)])
def test_downmix_averages_the_short_axis(shape):
    audio = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    axis = shape.index(3)
    np.testing.assert_allclose(downmix(audio), audio.mean(axis=axis), rtol=1e-6)


@pytest.mark.parametrize("shape", [(20, 16000), (16000, 9), (4, 8), (3, 3)])
def test_two_d_shapes_without_one_channel_axis_are_refused(shape):
    model = random_model()
    with pytest.raises(ValueError, match="no single such axis"):
        model.transcribe(np.zeros(shape, dtype=np.float32), max_new_tokens=1)


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                               (True, TypeError)])
def test_batch_size_must_be_a_positive_int(batch_size, error):
    model = random_model()
    with pytest.raises(error, match="batch_size must be an int >= 1"):
        model.transcribe(wave(0.1), batch_size=batch_size, max_new_tokens=1)


# --------------------------------------------------------------------------------------------------
# end token, config files, saved index pairs

@pytest.mark.parametrize("eos", [None, 100, -1, 2.0])
def test_config_eos_token_id_must_be_in_the_vocabulary(eos):
    with pytest.raises(ValueError, match=r"EchoConfig.eos_token_id must be a token id in \[0, 100\)"):
        small_config(eos_token_id=eos)


def test_generate_checks_the_end_token_it_decodes_with():
    model, x = random_model(), mel(B=1)
    first = model.generate(x, max_new_tokens=4)[0, 1].item()  # the first greedy token
    ended = model.generate(x, max_new_tokens=4, eos_token_id=first, return_dict_in_generate=True)
    assert ended.sequences.shape == (1, 2) and ended.rows[0].tokens == [first]  # it ends the row at once
    with pytest.raises(ValueError, match=r"eos_token_id must be a token id in \[0, 100\), got 100"):
        model.generate(x, eos_token_id=100)
    model.config.eos_token_id = None  # changed after the config was checked
    with pytest.raises(ValueError, match="model.config.eos_token_id must be a token id"):
        model.generate(x)
    with pytest.raises(ValueError, match="model.config.eos_token_id"):
        model.transcribe(wave(0.1))


@pytest.mark.parametrize("content, kind", [("[1, 2]", "array"), ('"echo"', "string"), ("null", "null")])
def test_a_config_file_that_is_not_an_object_is_refused(tmp_path, content, kind):
    random_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(content)
    message = f"config.json must hold a JSON object, got a JSON {kind}"
    with pytest.raises(ValueError, match=message):
        Echo.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        EchoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        EchoConfig.from_json_file(tmp_path / "config.json")


SITES = ["encoder.rotary.site", "decoder.rotary.site", "encoder.blocks.0.attn.site",
         "decoder.blocks.1.attn.site", "decoder.blocks.1.cross_attn.site"]


def _changed_pairs(pairs, kind):
    pairs = pairs.clone()
    if kind == "repeated index":
        pairs[1, 1] = pairs[1, 0]
    else:  # a valid pair, but not the one the config builds
        pairs[1] = torch.tensor([pairs[1, 1], pairs[1, 0]])
    return pairs


@pytest.mark.parametrize("kind", ["repeated index", "other pair"])
@pytest.mark.parametrize("site", SITES)
def test_saved_index_pairs_must_be_the_configs(tmp_path, site, kind):
    model = random_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[f"{site}.pairs"] = _changed_pairs(tensors[f"{site}.pairs"], kind)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    message = rf"{site}.pairs\[1\] = \(\d+, \d+\), but the config builds"
    with pytest.raises(ValueError, match=message):
        Echo.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):  # any load_state_dict, not only from_pretrained
        random_model().load_state_dict(tensors)


def test_saved_index_pairs_of_another_shape_are_refused():
    state = random_model().state_dict()
    state["encoder.rotary.site.pairs"] = state["encoder.rotary.site.pairs"][:-1]
    with pytest.raises(ValueError, match=r"encoder.rotary.site.pairs: the config builds \(\d+, 2\)"):
        random_model().load_state_dict(state)


def test_the_configs_own_pairs_load(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    loaded = Echo.from_pretrained(tmp_path)
    assert torch.equal(loaded.generate(mel(B=2), max_new_tokens=3),
                       model.generate(mel(B=2), max_new_tokens=3))


# --------------------------------------------------------------------------------------------------
# s, label dtypes, decoding arguments

def test_s_must_be_zero_or_one_dimensional():
    q = torch.randn(1, 2, 5, 4)
    M, w, bias = torch.eye(4), torch.ones(2), torch.zeros(3, 2)
    for bad in (torch.ones(1, 1), torch.ones(1, 1, 1)):
        with pytest.raises(ValueError,
                           match=r"s must be a scalar: a float or a tensor of shape \(\) or \(1,\)"):
            ek.echo_attention(q, q, q, M, w, bad, bias)
        with pytest.raises(ValueError,
                           match=r"s must be a scalar: a float or a tensor of shape \(\) or \(1,\)"):
            ek.rotary_orthogonal(q, M, w, bad)
    expected = ek.echo_attention(q, q, q, M, w, 0.5, bias)
    for good in (torch.tensor(0.5), torch.tensor([0.5])):
        torch.testing.assert_close(ek.echo_attention(q, q, q, M, w, good, bias), expected)
        torch.testing.assert_close(ek.rotary_orthogonal(q, M, w, good), ek.rotary_orthogonal(q, M, w, 0.5))


def test_attention_positions_stay_below_the_unbounded_window_side():
    """An unbounded window side is the int reference.UNBOUNDED on every path, so positions must stay
    below it; a window wider than it is the unbounded one."""
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    M, w, bias = torch.eye(4, dtype=torch.float64), torch.ones(2, dtype=torch.float64), None
    for offsets in ({"q_offset": ek.reference.UNBOUNDED - 4}, {"k_offset": ek.reference.UNBOUNDED}):
        with pytest.raises(ValueError, match=r"positions must stay below 2\*\*30"):
            ek.echo_attention(q, q, q, M, w, 1.0, bias, **offsets)
    last = ek.reference.UNBOUNDED - 5
    unbounded = ek.echo_attention(q, q, q, M, w, 1.0, bias, q_offset=last, k_offset=last)
    for window in ((2**40, 2**40), 2**62):
        torch.testing.assert_close(ek.echo_attention(q, q, q, M, w, 1.0, bias, q_offset=last, k_offset=last,
                                                     window=window), unbounded, rtol=0, atol=0)
    assert ek.reference.window_bounds((2**40, 3), causal=True) == (ek.reference.UNBOUNDED, 0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_token_ids_of_any_integer_dtype_are_read_as_int64(dtype):
    model, x = random_model(), mel(B=2)
    labels = torch.tensor([[5, 6, 7], [9, 2, 0]])
    with torch.no_grad():
        expected = model(x, labels=labels)
        got = model(x, labels=labels.to(dtype))
        by_inputs = model(x, decoder_input_ids=labels.to(dtype))
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.logits, expected.logits)
    assert torch.equal(by_inputs.logits, model(x, decoder_input_ids=labels).logits)


def test_labels_that_are_not_integers_are_refused():
    model = random_model()
    with pytest.raises(ValueError, match="labels must be an integer tensor, got torch.bool"):
        model(mel(B=2), labels=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("temperature",
                         [float("nan"), float("inf"), -float("inf"), (0.0, float("nan")), -0.1, ()])
def test_temperature_must_be_finite_and_not_negative(temperature):
    with pytest.raises(ValueError, match="temperature must be a"):
        random_model().generate(mel(B=2), max_new_tokens=2, temperature=temperature)


@pytest.mark.parametrize("temperature", ["hot", (0.0, None)])
def test_temperature_must_be_a_number(temperature):
    with pytest.raises(TypeError, match="temperature must be a number"):
        random_model().generate(mel(B=2), max_new_tokens=2, temperature=temperature)


@pytest.mark.parametrize("language", [5, b"en", ["en"]])
def test_language_must_be_a_string(language):
    model = random_model()
    with pytest.raises(TypeError, match="language must be None or a string"):
        model.generate(mel(B=2), language=language)
    with pytest.raises(TypeError, match="language must be None or a string"):
        model.transcribe(wave(0.1), language=language)


@pytest.mark.parametrize("max_new_tokens, error", [(-1, ValueError), (2.5, TypeError), ("3", TypeError)])
def test_max_new_tokens_must_be_a_non_negative_int(max_new_tokens, error):
    with pytest.raises(error, match="max_new_tokens must be an int >= 0"):
        random_model().generate(mel(B=2), max_new_tokens=max_new_tokens)


def test_zero_new_tokens_gives_the_start_sequence():
    model = random_model()
    out = model.generate(mel(B=2), max_new_tokens=0)
    assert out.tolist() == [[model.config.decoder_start_token_id]] * 2
    assert model.generate(mel(B=2), max_new_tokens=np.int64(2)).shape[1] <= 3  # numpy ints are ints


# --------------------------------------------------------------------------------------------------
# espeak-ng

@pytest.mark.speech
@pytest.mark.parametrize("text", ["-five two", "--version"])
def test_a_text_starting_with_a_dash_is_spoken(tmp_path, text):
    path = synthetic.synthesize(text, tmp_path / "dash.wav")
    audio = load_audio(path)
    assert 0.3 < audio.shape[0] / 16000 < 3.0 and np.abs(audio).max() > 0.05
