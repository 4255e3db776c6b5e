"""Audio and text front end, on openai-whisper's own pieces: ffmpeg loading, log-mel, pad/trim, tokenizer.

Nothing here re-implements a filterbank or a BPE: the mel filters and the vocabularies (English-only and
multilingual; 51865 tokens is the default EchoConfig's) ship inside the openai-whisper package and work
offline. Install it with `pip install "echo-kernels[speech]"`; loading files also needs the `ffmpeg` binary.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from echo_kernels.optional import require

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_SAMPLES_30S = 30 * SAMPLE_RATE  # whisper's window: 480000 samples, 3000 mel frames
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
# whisper's vocabularies: English-only (51864), multilingual (51865, EchoConfig's default) and large-v3's
# (51866)
WHISPER_VOCAB_SIZES = (51864, 51865, 51866)
WHISPER_VOCAB_SIZE = 51865
# A 2-D waveform's channel axis is its axis of at most this many entries (7.1 surround has 8).
MAX_CHANNELS = 8


def _whisper():
    """openai-whisper (the speech extra); importing it loads whisper.audio and whisper.tokenizer."""
    return require("whisper", "echo's audio front end and tokenizer")


def load_audio(source, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A path (decoded and resampled to `sr` mono by ffmpeg, as whisper does), or a waveform array or
    tensor (taken as already at `sr`) -> float32 numpy array (N,).

    A waveform is 1-D (samples,), or 2-D multichannel audio, (channels, samples) or (samples, channels),
    mixed down to mono by averaging its channels (see downmix). A missing file is a FileNotFoundError
    naming it; a file ffmpeg cannot decode, an empty waveform, one holding NaN/inf or a 2-D shape with
    no single channel axis is a ValueError.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"audio file not found: {path}")
        if os.path.isdir(path):
            raise ValueError(f"expected an audio file, got a directory: {path}")
        if shutil.which("ffmpeg") is None:
            raise RuntimeError("loading audio files needs the ffmpeg binary (e.g. apt-get install ffmpeg)")
        try:
            audio = _whisper().audio.load_audio(path, sr)
        except RuntimeError as error:
            detail = str(error).strip().splitlines()
            raise ValueError(f"cannot decode audio file {path}: "
                             f"{detail[-1] if detail else 'ffmpeg failed'}") from None
        if audio.size == 0:
            raise ValueError(f"audio file holds no samples: {path}")
        return audio
    if isinstance(source, Tensor):
        source = source.detach().to("cpu", torch.float32).numpy()
    if not isinstance(source, np.ndarray):
        raise TypeError(f"audio must be a path, a numpy array or a tensor, got {type(source).__name__}")
    audio = np.asarray(source, dtype=np.float32)
    if audio.size == 0:
        raise ValueError(f"the waveform is empty (shape {audio.shape})")
    if audio.ndim == 2:
        audio = downmix(audio)
    if audio.ndim != 1:
        raise ValueError(f"a waveform must be 1-D (samples,) or 2-D (channels, samples) / (samples, "
                         f"channels), got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("the waveform contains NaN or inf")
    return audio


def downmix(audio: np.ndarray) -> np.ndarray:
    """(channels, samples) or (samples, channels) -> (samples,), the mean of the channels.

    The channel axis is the one of at most MAX_CHANNELS entries (an axis of 1 is mono either way). A
    shape with both axes longer, or both no longer, has no single channel axis: a ValueError.
    """
    if 1 in audio.shape:
        return audio.reshape(-1)
    channel_axes = [axis for axis in (0, 1) if audio.shape[axis] <= MAX_CHANNELS]
    if len(channel_axes) != 1:
        raise ValueError(f"a 2-D waveform is one multichannel clip, (channels, samples) or (samples, "
                         f"channels) with at most {MAX_CHANNELS} channels; shape {audio.shape} has no single "
                         f"such axis (pass a list of 1-D waveforms for a batch)")
    return audio.mean(axis=channel_axes[0], dtype=np.float32)


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0) -> Tensor:
    """Waveform (N,) at 16 kHz (or anything load_audio takes) -> log-mel (n_mels, frames) float32,
    whisper's: 25 ms Hann window, 10 ms hop, clamped 8 log10 units below the peak, scaled (x + 4) / 4."""
    audio = load_audio(audio)
    return _whisper().audio.log_mel_spectrogram(torch.from_numpy(audio), n_mels=n_mels, padding=padding)


def pad_or_trim(array, length: int = N_SAMPLES_30S, *, axis: int = -1):
    """whisper.pad_or_trim: zero-pad or cut `array` to `length` along `axis`."""
    return _whisper().audio.pad_or_trim(array, length, axis=axis)


def log_mel_window(audio, n_samples: int = N_SAMPLES_30S, n_mels: int = 80) -> Tensor:
    """The model input of one window, as whisper builds it: waveform padded/trimmed to `n_samples`,
    then log-mel -> (n_mels, n_samples // 160)."""
    audio = pad_or_trim(load_audio(audio), n_samples)
    return log_mel_spectrogram(audio, n_mels=n_mels)[:, : n_samples // HOP_LENGTH]


@lru_cache(maxsize=None)
def get_tokenizer(language: str | None = "en", task: str | None = "transcribe",
                  vocab_size: int = WHISPER_VOCAB_SIZE):
    """openai-whisper's tokenizer of a `vocab_size`-token model, chosen by whisper's own rule
    (`Whisper.is_multilingual`, `.num_languages`): multilingual from 51865 tokens up, with
    vocab_size - 51766 languages (99, or 100 for large-v3's 51866); English-only (51864: no language or
    task tokens, so `language` and `task` are ignored) below."""
    if vocab_size not in WHISPER_VOCAB_SIZES:
        raise ValueError(f"whisper's vocabularies have {WHISPER_VOCAB_SIZES} tokens, not {vocab_size}")
    multilingual = vocab_size >= 51865
    num_languages = vocab_size - 51765 - int(multilingual)
    if not multilingual:
        language = task = None
    tokenizer = _whisper().tokenizer.get_tokenizer(multilingual, num_languages=num_languages,
                                                   language=language, task=task)
    assert tokenizer.encoding.n_vocab == vocab_size
    return tokenizer


def uses_whisper_vocab(config) -> bool:
    """True when a model's vocabulary is one of whisper's (so whisper's tokenizer applies)."""
    return config.vocab_size in WHISPER_VOCAB_SIZES


def prompt_tokens(language: str | None = "en", task: str | None = "transcribe", timestamps: bool = False,
                  vocab_size: int = WHISPER_VOCAB_SIZE) -> list[int]:
    """<|startoftranscript|> <|lang|> <|task|> [<|notimestamps|>] as whisper starts every transcript
    (<|startoftranscript|> [<|notimestamps|>] for an English-only vocabulary)."""
    tokenizer = get_tokenizer(language, task, vocab_size)
    return list(tokenizer.sot_sequence if timestamps else tokenizer.sot_sequence_including_notimestamps)


def encode_text(text: str, language: str | None = "en", task: str | None = "transcribe",
                vocab_size: int = WHISPER_VOCAB_SIZE) -> list[int]:
    """Training labels of a transcript: the prompt after <|startoftranscript|>, the text's tokens,
    <|endoftext|>.

    (The decoder input starts with <|startoftranscript|> = decoder_start_token_id, added by the shift.)
    """
    tokenizer = get_tokenizer(language, task, vocab_size)
    return prompt_tokens(language, task, vocab_size=vocab_size)[1:] + tokenizer.encode(" " + text.strip()) + [
        tokenizer.eot]


def decode_text(tokens, vocab_size: int = WHISPER_VOCAB_SIZE) -> str:
    """Token ids -> text, special tokens (>= <|endoftext|>) dropped."""
    tokenizer = get_tokenizer(vocab_size=vocab_size)
    return tokenizer.decode([int(t) for t in tokens if int(t) < tokenizer.eot]).strip()
