"""EchoProcessor: whisper's log-mel window and tokenizer as transformers components; AutoProcessor and the
"automatic-speech-recognition" pipeline on a saved Echo folder (text equal to Echo.transcribe's), and
Seq2SeqTrainer on data the processor maps."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from echo import AdaptiveBaseCallback, Echo, EchoConfig, EchoProcessor
from echo.processor import EchoFeatureExtractor, mel_filters

from test_optional import run_blocked

SPEECH = Path(__file__).parent / "data" / "speech"
CLIPS = ["arctic_a0007.wav", "arctic_a0009.wav"]
TEXTS = ["Author of the danger trail, Philip Steels, etc.", "There was a change now."]
os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is built from local files


def wave(name: str) -> np.ndarray:
    import whisper

    return whisper.load_audio(str(SPEECH / name))


def tiny(vocab_size: int, n_audio_ctx: int = 1500, **extra) -> Echo:
    torch.manual_seed(0)
    config = EchoConfig(n_mels=80, n_audio_ctx=n_audio_ctx, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                        vocab_size=vocab_size, n_text_ctx=16, n_text_state=64, n_text_head=4, n_text_layer=2,
                        checkpointing=False, **extra)
    model = Echo(config)
    model.apply_initialization()
    return model.eval()


@pytest.mark.speech
@pytest.mark.parametrize("n_mels", [80, 128])
def test_features_are_whispers_log_mel_window(n_mels):
    import whisper

    np.testing.assert_array_equal(mel_filters(n_mels), whisper.audio.mel_filters("cpu", n_mels).numpy())
    extractor = EchoFeatureExtractor(feature_size=n_mels)
    clips = [wave(name) for name in CLIPS]
    features = extractor(clips, return_tensors="pt")["input_features"]
    assert features.shape == (2, n_mels, 3000)
    for clip, ours in zip(clips, features):
        # whisper.transcribe's (and Echo.transcribe's) window: the clip's log-mel, zero frames after it
        mel = whisper.log_mel_spectrogram(clip, n_mels=n_mels, padding=whisper.audio.N_SAMPLES)
        content = mel.shape[-1] - 3000
        torch.testing.assert_close(ours, whisper.pad_or_trim(mel[:, :content], 3000), rtol=0, atol=0)
        assert ours[:, content:].abs().max() == 0
        # its clip frames are those of whisper's log-mel of the padded waveform (echo.audio.log_mel_window)
        padded = whisper.log_mel_spectrogram(whisper.pad_or_trim(clip), n_mels=n_mels)
        torch.testing.assert_close(ours[:, :content], padded[:, :content], rtol=0, atol=0)
    long = np.zeros(whisper.audio.N_SAMPLES + 1, dtype=np.float32)
    with pytest.raises(ValueError, match="truncation=True"):
        extractor(long)
    assert extractor(long, truncation=True)["input_features"][0].shape == (n_mels, 3000)
    with pytest.raises(ValueError, match="sampling_rate must be 16000"):
        extractor(clips[0], sampling_rate=8000)


@pytest.mark.speech
@pytest.mark.parametrize("vocab_size", [51864, 51865])
def test_tokenizer_is_whispers(vocab_size):
    from echo import audio

    processor = EchoProcessor.for_config(tiny(vocab_size, n_audio_ctx=8).config)
    ours, theirs = processor.tokenizer, audio.get_tokenizer(vocab_size=vocab_size)
    assert len(ours) == theirs.encoding.n_vocab == vocab_size
    for text in TEXTS + [" naïve café: 東京タワー, ёлка!", "  two  spaces\n\tand 12345",
                         "<|endoftext|> in text"]:
        ids = theirs.encoding.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False) == ids
        assert ours.decode(ids) == theirs.encoding.decode(ids)
    for token, index in theirs.encoding._special_tokens.items():  # every special token at whisper's id
        assert ours.convert_tokens_to_ids(token) == index
    assert ours.prefix_tokens == list(theirs.sot_sequence_including_notimestamps)
    assert processor(text=TEXTS)["labels"] == [audio.encode_text(t, vocab_size=vocab_size) for t in TEXTS]


def transcribed(model: Echo, audio, **options) -> str:
    return model.transcribe(audio, temperature=0.0, **options)["text"]


def long_audio(window_s: int) -> np.ndarray:
    """Two windows of window_s seconds, each holding the same clip, silent across the cut (so that a
    window's features do not depend on the samples of the other, nor on its loudness)."""
    clip = wave(CLIPS[1])
    first = np.pad(clip, (0, window_s * 16000 - clip.shape[0]))
    return np.concatenate([first, np.zeros(3200, np.float32), clip])


def joined_tokens(model: Echo, processor, audio, **options) -> tuple[str, int]:
    """(the text of transcribe's windows' tokens decoded together, as the pipeline joins its chunks;
    the number of windows)."""
    segments = model.transcribe(audio, temperature=0.0, **options)["segments"]
    tokens = [t for segment in segments for t in segment["tokens"]]
    return processor.decode(tokens, skip_special_tokens=True).strip(), len(segments)


@pytest.mark.speech
def test_pipeline_from_the_folder_transcribes_as_transcribe(tmp_path, caplog):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

    model = tiny(51864, n_audio_ctx=200)  # 4 s windows (the encoder's 30 s take seconds per call on a CPU)
    model.save_pretrained(tmp_path)
    assert {"processor_config.json", "tokenizer.json", "config.json"} <= set(os.listdir(tmp_path))
    processor = AutoProcessor.from_pretrained(tmp_path)
    loaded = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path)
    assert isinstance(processor, EchoProcessor) and isinstance(loaded, Echo)
    assert processor.feature_extractor.nb_max_frames == 400 and len(processor.tokenizer) == 51864
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path))
    assert asr.type == "seq2seq" and isinstance(asr.model, Echo)
    path = str(SPEECH / CLIPS[0])
    options = dict(num_beams=1, max_new_tokens=6)
    # a path and an array; the pipeline's text keeps the leading space of whisper's first token
    assert asr(path, **options)["text"].strip() == transcribed(model, path, **options)
    clips = [wave(name) for name in CLIPS]
    assert asr(clips[1], **options)["text"].strip() == transcribed(model, clips[1], **options)
    # a batch, with the pipeline's default decoding (num_beams=5, max_new_tokens=256: the context's limit)
    batch = asr(clips)
    assert [r["text"].strip() for r in batch] == [transcribed(model, c, num_beams=5, max_new_tokens=256)
                                                  for c in clips]
    # long audio, cut where transcribe cuts it (chunks of the model's window, no overlap): the same tokens
    # (transcribe joins the windows' texts with a space, the pipeline joins their tokens)
    text, windows = joined_tokens(model, processor, long_audio(4), **options)
    assert windows == 2
    assert asr(long_audio(4), chunk_length_s=4, stride_length_s=0, **options)["text"].strip() == text


@pytest.mark.speech
@pytest.mark.slow  # 30 s windows: each encoder call takes about a second on two cores
def test_converted_whisper_folder_runs_in_the_pipeline(tmp_path):
    from transformers import pipeline

    from echo.convert.__main__ import main as convert_main
    from test_convert import openai_whisper

    whisper_model = openai_whisper(51865, 80, seed=5, n_audio_ctx=1500)
    torch.save({"dims": dataclasses.asdict(whisper_model.dims),
                "model_state_dict": whisper_model.state_dict()},
               tmp_path / "w.pt")
    assert convert_main([str(tmp_path / "w.pt"), str(tmp_path / "echo")]) == 0
    assert (tmp_path / "echo" / "processor_config.json").is_file()
    model = Echo.from_pretrained(tmp_path / "echo")
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "echo"))
    path = str(SPEECH / CLIPS[1])
    # language given: transcribe detects it on whisper's padded log-mel (silence frames, not zeros)
    options = dict(num_beams=1, max_new_tokens=4, language="en")
    assert asr(path, **options)["text"].strip() == transcribed(model, path, **options)
    processor = EchoProcessor.from_pretrained(tmp_path / "echo")
    text, windows = joined_tokens(model, processor, long_audio(30), **options)
    assert windows == 2
    ours = asr(long_audio(30), chunk_length_s=30, stride_length_s=0, **options)["text"].strip()
    assert ours == text


def test_save_pretrained_processor_choices(tmp_path, caplog):
    model = tiny(100, n_audio_ctx=8, bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=3)
    with caplog.at_level("WARNING", logger="echo.model"):
        model.save_pretrained(tmp_path / "auto")
    assert "without a processor" in caplog.text and "100 tokens is not one of whisper's" in caplog.text
    assert not (tmp_path / "auto" / "processor_config.json").exists()
    with pytest.raises(TypeError, match="processor must be an EchoProcessor"):
        model.save_pretrained(tmp_path / "bad", processor="yes")


def test_save_pretrained_without_openai_whisper_says_so(tmp_path):
    run = run_blocked("from echo import Echo, EchoConfig\n"
                      "Echo(EchoConfig(n_audio_ctx=8, n_audio_state=64, n_audio_head=4, n_audio_layer=1, "
                      "n_text_ctx=8, n_text_state=64, n_text_head=4, "
                      "n_text_layer=1)).save_pretrained(sys.argv[1])",
                      str(tmp_path / "m"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "saved without a processor" in run.stderr and "needs openai-whisper" in run.stderr
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "generation_config.json",
                                                  "model.safetensors"]


@pytest.mark.speech
def test_trainer_on_processor_mapped_data_moves_the_base_once_per_step(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from echo import audio
    from test_callbacks import Recorder, logged_losses, replay

    model = tiny(51865, n_audio_ctx=200).train()  # 4 s windows: the clips fit one
    processor = EchoProcessor.for_config(model.config)
    pairs = list(zip([wave(name) for name in CLIPS], TEXTS)) * 2
    data = [{"input_features": processor(audio=a, return_tensors="pt")["input_features"][0],
             "labels": processor(text=t)["labels"]} for a, t in pairs]
    assert data[0]["labels"] == audio.encode_text(TEXTS[0])

    def collate(batch):
        labels = torch.full((len(batch), max(len(b["labels"]) for b in batch)), -100)
        for row, b in zip(labels, batch):
            row[: len(b["labels"])] = torch.tensor(b["labels"])
        return {"input_features": torch.stack([b["input_features"] for b in batch]), "labels": labels}

    recorder = Recorder(model)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        learning_rate=0.05, optim="sgd", max_grad_norm=0.0, train_sampling_strategy="sequential",
        logging_steps=1, report_to=[], save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
        use_cpu=True)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=collate,
                             callbacks=[AdaptiveBaseCallback(), recorder])
    trainer.train()
    losses = logged_losses(trainer)
    bases, _ = replay(model.config, losses)
    assert (len(losses) == len(recorder.bases) == 2
            and len(recorder.substep_bases) == 2)  # the first micro-batch of each step
    before = torch.tensor(float(model.config.base))
    for step in range(2):
        assert all(torch.equal(b, before) for b in recorder.substep_bases[step: step + 1])
        assert torch.equal(recorder.bases[step], bases[step]) and not torch.equal(bases[step], before)
        before = recorder.bases[step]
