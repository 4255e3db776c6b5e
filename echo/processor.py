"""EchoProcessor: Echo's input features and whisper's tokenizer as Hugging Face components, for
AutoProcessor, the "automatic-speech-recognition" pipeline and the Trainer.

    processor = EchoProcessor.for_config(model.config)   # needs openai-whisper (its vocabulary files), once
    processor.save_pretrained(folder)                    # Echo.save_pretrained does this beside the model
    processor = AutoProcessor.from_pretrained(folder)    # after `import echo`; transformers alone

Features (EchoFeatureExtractor): the log-mel window that Echo.transcribe (and whisper.transcribe) gives the
model: whisper's log-mel of the clip, its frames past the clip's end set to zero, bit for bit
(tests/test_processor.py holds it to openai-whisper's). Tokenizer: transformers' WhisperTokenizer built from
the vocabulary files that ship inside openai-whisper, with whisper's special tokens at whisper's ids.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature, ProcessorMixin, SequenceFeatureExtractor, WhisperTokenizer

from echo_kernels.optional import require

from .audio import HOP_LENGTH, N_SAMPLES_30S, SAMPLE_RATE, WHISPER_VOCAB_SIZES, load_audio

N_FFT = 400  # whisper's 25 ms window


@functools.cache
def mel_filters(n_mels: int) -> np.ndarray:
    """(n_mels, N_FFT // 2 + 1) float32: the Slaney mel filterbank of 16 kHz audio, computed as librosa's
    `filters.mel` computes it, step for step, so that it equals bit for bit the filters openai-whisper ships
    (its assets/mel_filters.npz); transformers' `mel_filter_bank` rounds differently in the last place."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(hz):
        return np.where(hz >= min_log_hz,
                        min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep, hz / f_sp)

    def mel_to_hz(mel):
        return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)

    fft_freqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(np.float64(0.0)), hz_to_mel(np.float64(SAMPLE_RATE / 2)),
                                  n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, N_FFT // 2 + 1), dtype=np.float32)  # float32 rows, as librosa rounds them
    for i in range(n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    weights *= 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])[:, None]  # Slaney norm, rounded to float32 again
    return weights


def log_mel(wave: torch.Tensor, n_mels: int) -> torch.Tensor:
    """(N,) float32 at 16 kHz -> (n_mels, N // 160 + 1), whisper's log_mel_spectrogram op for op."""
    stft = torch.stft(wave, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(torch.from_numpy(mel_filters(n_mels)) @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


class EchoFeatureExtractor(SequenceFeatureExtractor):
    """Clip(s) -> input_features (B, feature_size, n_samples // 160): each clip's model window as
    Echo.transcribe builds it (whisper.transcribe's: log-mel of the clip followed by n_samples of silence,
    its first n_samples // 160 frames, the frames past the clip zero).

    A clip is what echo.audio.load_audio takes (a 16 kHz waveform, numpy or torch; a path with the speech
    extra); a list or tuple is a batch. A clip longer than the window is a ValueError unless
    truncation=True (then its first window is kept): the pipeline's chunk_length_s cuts long audio.
    The model, like Whisper, reads every frame of the window, the zero frames included, so the attention
    mask (return_attention_mask=True, as the pipeline asks) is all ones: given to Echo it masks nothing.
    """

    model_input_names = ["input_features"]

    def __init__(self, feature_size: int = 80, sampling_rate: int = SAMPLE_RATE,
                 n_samples: int = N_SAMPLES_30S, padding_value: float = 0.0,
                 return_attention_mask: bool = False, **kwargs):
        if sampling_rate != SAMPLE_RATE:
            raise ValueError(f"sampling_rate must be {SAMPLE_RATE} (whisper's log-mel), got {sampling_rate}")
        if n_samples <= 0 or n_samples % HOP_LENGTH:
            raise ValueError(f"n_samples must be a positive multiple of {HOP_LENGTH}, got {n_samples}")
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                         return_attention_mask=return_attention_mask, **kwargs)
        self.n_samples = n_samples

    @property
    def nb_max_frames(self) -> int:
        return self.n_samples // HOP_LENGTH

    def window(self, clip, truncation: bool = False) -> torch.Tensor:
        """One clip -> (feature_size, nb_max_frames) float32."""
        wave = torch.from_numpy(np.array(load_audio(clip)))  # a copy: the pipeline's arrays are read-only
        if wave.shape[0] > self.n_samples:
            if not truncation:
                raise ValueError(f"a clip of {wave.shape[0] / SAMPLE_RATE:.2f} s is longer than the model's "
                                 f"window of {self.n_samples / SAMPLE_RATE:g} s: pass truncation=True to "
                                 f"keep its first window, or chunk_length_s to the pipeline to transcribe "
                                 f"all of it")
            wave = wave[: self.n_samples]
        mel = log_mel(F.pad(wave, (0, self.n_samples)), self.feature_size)
        frames = self.nb_max_frames
        content = min(mel.shape[-1] - frames, frames)
        return F.pad(mel[:, :content], (0, frames - content))

    def __call__(self, raw_speech, sampling_rate: int | None = None, truncation: bool = False,
                 return_attention_mask: bool | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        """raw_speech: one clip or a list of clips -> BatchFeature(input_features (B, feature_size, frames)
        [, attention_mask (B, frames) of ones])."""
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"sampling_rate must be {self.sampling_rate}, got {sampling_rate}: resample the "
                             "audio first (the pipeline does, given {'raw': array, 'sampling_rate': rate})")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("padding", "max_length"))
        if unknown:
            raise TypeError(f"EchoFeatureExtractor got unexpected arguments: {unknown}")
        clips = list(raw_speech) if isinstance(raw_speech, (list, tuple)) else [raw_speech]
        if not clips:
            raise ValueError("raw_speech is an empty batch")
        features = torch.stack([self.window(clip, truncation) for clip in clips]).numpy()
        data = {"input_features": features}
        if return_attention_mask if return_attention_mask is not None else self.return_attention_mask:
            data["attention_mask"] = np.ones(features.shape[::2], dtype=np.int32)
        return BatchFeature(data, tensor_type=return_tensors)


@functools.cache
def whisper_tokenizer(vocab_size: int) -> WhisperTokenizer:
    """transformers' WhisperTokenizer of a `vocab_size`-token model (51864 English-only, 51865 or 51866
    multilingual), built from the .tiktoken vocabulary that ships inside openai-whisper and its special
    tokens, in whisper's order: the same ids as whisper's tokenizer for text and special tokens alike."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from .audio import get_tokenizer

    encoding = get_tokenizer(vocab_size=vocab_size).encoding
    name = "multilingual" if vocab_size >= 51865 else "gpt2"
    path = os.path.join(os.path.dirname(require("whisper.tokenizer", "whisper's vocabulary").__file__),
                        "assets", f"{name}.tiktoken")
    vocab, merges = TikTokenConverter(path).extract_vocab_merges_from_model(path)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    # tiktoken takes a piece that is a whole token as it is, before any merge
    tokenizer.backend_tokenizer.model.ignore_merges = True
    tokenizer.add_special_tokens({"additional_special_tokens": list(encoding._special_tokens)},
                                 replace_extra_special_tokens=False)
    multilingual = vocab_size >= 51865
    tokenizer.set_prefix_tokens(language="en" if multilingual else None,
                                task="transcribe" if multilingual else None, predict_timestamps=False)
    wrong = {t: i for t, i in encoding._special_tokens.items() if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong or len(tokenizer) != vocab_size:
        raise RuntimeError(f"the converted tokenizer disagrees with whisper's: {len(tokenizer)} tokens, "
                           f"special tokens at other ids: {sorted(wrong)[:5]}")
    return tokenizer


class EchoProcessor(ProcessorMixin):
    """EchoFeatureExtractor + whisper's tokenizer (transformers' WhisperTokenizer).

    processor(audio=clips) -> input_features; processor(text=texts) -> labels; both -> both. Labels are
    echo.audio.encode_text's, Echo's training labels: the start sequence after <|startoftranscript|>
    (<|en|><|transcribe|><|notimestamps|>, or <|notimestamps|> on an English-only vocabulary), the text's
    tokens with a leading space, <|endoftext|>; the model adds <|startoftranscript|> in front.
    """

    # the sub-processors' classes come from the Auto registrations (echo/__init__.py) and the saved files
    def __init__(self, feature_extractor, tokenizer):
        super().__init__(feature_extractor, tokenizer)

    @classmethod
    def for_config(cls, config) -> "EchoProcessor":
        """The processor of a model with this config: its n_mels and window (2 * n_audio_ctx frames), and
        whisper's tokenizer of its vocabulary (a ValueError for any other vocabulary). Needs
        openai-whisper."""
        if config.vocab_size not in WHISPER_VOCAB_SIZES:
            raise ValueError(f"EchoProcessor needs one of whisper's vocabularies {WHISPER_VOCAB_SIZES}; this "
                             f"model has vocab_size = {config.vocab_size}, which no tokenizer here covers")
        features = EchoFeatureExtractor(feature_size=config.n_mels,
                                        n_samples=2 * config.n_audio_ctx * HOP_LENGTH)
        return cls(features, whisper_tokenizer(config.vocab_size))

    def check_matches(self, config) -> None:
        """ValueError unless this processor's mel bins, window and vocabulary are the model's."""
        have = (self.feature_extractor.feature_size, self.feature_extractor.nb_max_frames,
                len(self.tokenizer))
        want = (config.n_mels, 2 * config.n_audio_ctx, config.vocab_size)
        if have != want:
            raise ValueError(f"the processor (n_mels, frames, vocabulary) = {have} does not fit the model's "
                             f"{want}")

    def labels(self, text: str) -> list[int]:
        """One transcript -> Echo's training labels (echo.audio.encode_text)."""
        tok = self.tokenizer
        return (tok.prefix_tokens[1:] + tok.encode(" " + text.strip(), add_special_tokens=False)
                + [tok.eos_token_id])

    def __call__(self, audio=None, text=None, sampling_rate: int | None = None, **kwargs) -> BatchFeature:
        """audio: a clip or a list of clips -> input_features; text: a string or a list -> labels (a list of
        token id lists); return_tensors and the feature extractor's options pass to it."""
        if audio is None and text is None:
            raise ValueError("EchoProcessor needs audio=, text= or both")
        out = (self.feature_extractor(audio, sampling_rate=sampling_rate, **kwargs) if audio is not None
               else BatchFeature())
        if text is not None:
            out["labels"] = ([self.labels(t) for t in text] if isinstance(text, (list, tuple))
                             else self.labels(text))
        return out

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
