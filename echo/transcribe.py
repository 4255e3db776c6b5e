"""Transcription for Echo, as openai/whisper's transcribe.py without timestamps.

`transcribe`: paths, waveforms or tensors (one or a list) -> text, long audio cut into consecutive
windows of the model's input length (30 s for the default n_audio_ctx = 1500), all windows of all
inputs batched together and decoded by echo.generate.
"""

from __future__ import annotations

import torch

from .generate import (
    DEFAULT_TEMPERATURES,
    Decoded,
    check_language,
    detect_language,
    end_token,
    generate,
    int_at_least,
    is_multilingual,
    tokens_text,
)


def _as_inputs(audio) -> tuple[list, bool]:
    """One input or a batch -> (list of inputs, whether a batch was given). Only a list or tuple is a batch:
    a 2-D array is one multichannel clip (see echo.audio.load_audio), as (B, samples) with B <= 8 could not
    be told from (channels, samples)."""
    if isinstance(audio, (list, tuple)):
        if not audio:
            raise ValueError("transcribe() got an empty batch")
        return list(audio), True
    return [audio], False


@torch.no_grad()
def transcribe(model, audio, language: str | None = None, task: str | None = None, num_beams: int = 1,
               temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES, batch_size: int = 8,
               max_new_tokens: int | None = None, **generate_kwargs):
    """audio: one clip, or a list (or tuple) of clips for a batch
    -> {"text", "segments": [{"start", "end", "text", "tokens", ...}], "language"}, or a list of those for a
    batch.

    A clip is a path (decoded to 16 kHz mono by ffmpeg) or a 16 kHz waveform, numpy array or tensor:
    1-D (samples,) is mono; 2-D is one multichannel clip, (channels, samples) or (samples, channels),
    whose channel axis is the one of at most 8 entries and whose channels are averaged. A 2-D array is
    never a batch: with both axes longer than 8 (or both at most 8) it is a ValueError, so stack clips
    in a list. batch_size (an int >= 1) is the number of windows decoded together.

    As whisper.transcribe without timestamps: the log-mel of the whole input is cut into consecutive windows
    of the model's input length (2 * n_audio_ctx frames: 30 s at the default 1500), each zero-padded to that
    length and decoded on its own; the texts are joined. language=None on a multilingual vocabulary is
    detected once per input, from its first window. A missing file raises FileNotFoundError, an undecodable
    one ValueError; silence and very short clips give a (possibly empty) result.
    """
    from .audio import FRAMES_PER_SECOND, HOP_LENGTH, load_audio, log_mel_spectrogram, pad_or_trim

    config = model.config
    batch_size = int_at_least("batch_size", batch_size, 1)
    check_language(language)
    eot = end_token(config, generate_kwargs.get("eos_token_id"))
    inputs, batched = _as_inputs(audio)
    window = 2 * config.n_audio_ctx  # mel frames per window
    device = next(model.parameters()).device
    mels = []
    for item in inputs:
        wave = load_audio(item)
        mels.append(log_mel_spectrogram(wave, n_mels=config.n_mels, padding=window * HOP_LENGTH))
    languages = [language] * len(inputs)
    if language is None and is_multilingual(config):
        was_training = model.training
        model.eval()
        try:
            for b in range(0, len(mels), batch_size):
                first = torch.stack([pad_or_trim(m, window) for m in mels[b: b + batch_size]]).to(device)
                languages[b: b + batch_size] = detect_language(model, model.encode(first)[0], None)[1]
        finally:
            model.train(was_training)
    jobs = []  # (input index, start frame, end frame, mel window): the content frames, then zeros
    for i, mel in enumerate(mels):
        content = mel.shape[-1] - window
        for s in range(0, content, window):
            e = min(s + window, content)
            jobs.append((i, s, e, pad_or_trim(mel[:, s:e], window)))
    decoded: dict[int, Decoded] = {}
    for lang in dict.fromkeys(languages):  # one generate call per language, in batches
        group = [j for j, job in enumerate(jobs) if languages[job[0]] == lang]
        for b in range(0, len(group), batch_size):
            chunk = group[b: b + batch_size]
            mel = torch.stack([jobs[j][3] for j in chunk]).to(device)
            out = generate(model, mel, max_new_tokens=max_new_tokens, num_beams=num_beams,
                           temperature=temperature, language=lang, task=task, return_dict_in_generate=True,
                           **generate_kwargs)
            decoded.update(zip(chunk, out.rows))
    results = [{"text": "", "segments": [], "language": languages[i]} for i in range(len(inputs))]
    seconds = 1 / FRAMES_PER_SECOND
    for j, (i, s, e, _) in enumerate(jobs):
        d = decoded[j]
        results[i]["language"] = d.language
        results[i]["segments"].append({"start": round(s * seconds, 2), "end": round(e * seconds, 2),
                                       "text": tokens_text(config, d.tokens, eot).strip(), "tokens": d.tokens,
                                       "temperature": d.temperature, "avg_logprob": d.avg_logprob,
                                       "compression_ratio": d.compression_ratio})
    for r in results:
        r["text"] = " ".join(seg["text"] for seg in r["segments"] if seg["text"]).strip()
    return results if batched else results[0]
