"""Audio front end: openai-whisper's own loader, log-mel, pad/trim and tokenizer, on real ARCTIC clips."""

from pathlib import Path

import numpy as np
import pytest
import torch

from echo import audio

SPEECH = Path(__file__).parent / "data" / "speech"
pytestmark = pytest.mark.speech  # every test here compares with openai-whisper or reads audio with ffmpeg


@pytest.mark.parametrize("name", ["arctic_a0007.wav", "arctic_a0009.wav"])
def test_log_mel_of_arctic_clips_equals_whisper(name):
    import whisper  # the speech extra, imported here so that this module imports without it

    path = str(SPEECH / name)
    wave = audio.load_audio(path)
    expected_wave = whisper.load_audio(path)
    np.testing.assert_array_equal(wave, expected_wave)
    assert 3.0 < wave.shape[0] / audio.SAMPLE_RATE < 4.5
    ours = audio.log_mel_spectrogram(path)
    theirs = whisper.log_mel_spectrogram(path)
    assert ours.shape == theirs.shape and ours.shape[0] == 80
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # the 30-second model input, as whisper.transcribe builds it
    window = audio.log_mel_window(path)
    expected = whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(path)))
    assert window.shape == (80, 3000)
    torch.testing.assert_close(window, expected, rtol=0, atol=0)
    # arrays and tensors go through the same path
    torch.testing.assert_close(audio.log_mel_spectrogram(torch.from_numpy(wave)), theirs, rtol=0, atol=0)


def test_pad_or_trim_is_whispers():
    import whisper

    batch = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_array_equal(audio.pad_or_trim(batch, 3, axis=0), whisper.pad_or_trim(batch, 3, axis=0))
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(audio.pad_or_trim(x, 4), x[:4])
    np.testing.assert_array_equal(audio.pad_or_trim(x, 12), np.concatenate([x, [0, 0]]))


def test_tokenizer_is_whispers_multilingual_vocabulary():
    tok = audio.get_tokenizer("en", "transcribe")
    assert tok.encoding.n_vocab == 51865
    assert tok.sot == 50258 and tok.eot == 50257
    assert audio.prompt_tokens("en", "transcribe") == [50258, 50259, 50359, 50363]
    assert audio.prompt_tokens("fr", "translate")[1:3] == [tok.to_language_token("fr"), tok.translate]
    labels = audio.encode_text("three one four")
    assert labels[:3] == [50259, 50359, 50363] and labels[-1] == tok.eot
    assert audio.decode_text(labels) == "three one four"
    # whisper's rule from the vocabulary size: English-only (no language or task token), and large-v3's 100
    # languages
    english = audio.get_tokenizer(vocab_size=51864)
    assert english.encoding.n_vocab == 51864 and english.sot == 50257 and english.eot == 50256
    assert audio.prompt_tokens(vocab_size=51864) == [50257, english.no_timestamps]
    assert audio.encode_text("three", vocab_size=51864)[0] == english.no_timestamps
    assert audio.get_tokenizer(vocab_size=51866).num_languages == 100
    with pytest.raises(ValueError, match="51867"):
        audio.get_tokenizer(vocab_size=51867)


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio.load_audio(missing)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF this is not audio at all" * 10)
    with pytest.raises(ValueError, match="junk.wav"):
        audio.load_audio(junk)
    with pytest.raises(ValueError, match="empty"):
        audio.load_audio(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        audio.load_audio(np.full(100, np.nan, dtype=np.float32))
