"""Echo: a Whisper-style encoder-decoder with Givens-orthogonal rotary positions (docs/model.md)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from echo_kernels.optional import MissingExtra

from .attention import EchoAttention, encoder_mixer
from .cache import EchoCache
from .config import EchoConfig, to_echo_config
from .generate import generate as generate_function
from .inputs import as_model_dtype, check_mel, check_tokens
from .layers import MLP, S1LayerNorm, checkpoint_contexts, layer_norm
from .linear import tied_logits
from .positional import (PAIR_SEED, CombinedRotaryEmbedding, GivensSite, LearnedSinusoidalEmbedding,
                         PositionalState, rope_frequencies, site_matrices)
from .transcribe import transcribe as transcribe_function

logger = logging.getLogger(__name__)


def run_block(block: nn.Module, checkpointing: bool, *args):
    """block(*args), with non-reentrant activation checkpointing while training."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, context_fn=checkpoint_contexts)
    return block(*args)


class EncoderBlock(nn.Module):
    """x: (B, T, D) -> (B, T, D):  x += mixer(LN(x)); x += MLP(LN(x))."""

    def __init__(self, config: EchoConfig):
        super().__init__()
        d = config.n_audio_state
        self.attn_ln = layer_norm(config.layer_norm, d)
        self.attn = encoder_mixer(config)
        self.mlp_ln = layer_norm(config.layer_norm, d)
        self.mlp = MLP(d, config.mlp)

    def forward(self, x: Tensor, pos: PositionalState, padding: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), pos, key_padding_mask=padding)
        return x + self.mlp(self.mlp_ln(x))


class DecoderBlock(nn.Module):
    """x: (B, T, D), xa: (B, Ta, Da) -> (B, T, D): causal self-attention, cross-attention, MLP."""

    def __init__(self, config: EchoConfig):
        super().__init__()
        d = config.n_text_state
        self.attn_ln = layer_norm(config.layer_norm, d)
        self.attn = EchoAttention(config, "text", causal=True)
        if config.cross_attention:
            self.cross_attn_ln = layer_norm(config.layer_norm, d)
            self.cross_attn = EchoAttention(config, "text", cross=True, d_kv=config.n_audio_state)
        else:
            self.cross_attn_ln = self.cross_attn = None
        self.mlp_ln = layer_norm(config.layer_norm, d)
        self.mlp = MLP(d, config.mlp)

    def forward(self, x: Tensor, xa: Tensor | None, pos: PositionalState, padding: Tensor | None,
                audio_padding: Tensor | None, cache: EchoCache | None, offset: int) -> Tensor:
        x = x + self.attn(self.attn_ln(x), pos, key_padding_mask=padding, cache=cache, offset=offset)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), pos, xa=xa, key_padding_mask=audio_padding,
                                    cache=cache, offset=offset)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """mel: (B, n_mels, T) -> (B, ceil(T / 2), D).

    conv front end, residual-stream rotary, + L2-normalised learned sinusoidal rows, blocks, LN.
    """

    def __init__(self, config: EchoConfig):
        super().__init__()
        d = config.n_audio_state
        self.checkpointing = config.checkpointing
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.rotary = CombinedRotaryEmbedding(d, config.n_audio_head, config.givens_count("audio"),
                                              config.base, config.rope_layout, seed=PAIR_SEED)
        self.positional = LearnedSinusoidalEmbedding(config.n_audio_ctx, d, config.checkpointing,
                                                     config.positional_norm)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_audio_layer))
        self.ln_post = layer_norm(config.layer_norm, d)

    def forward(self, mel: Tensor, pos: PositionalState, padding: Tensor | None = None) -> Tensor:
        """padding: (B, ceil(T / 2)) bool, True = a padded frame."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = self.rotary(x, pos.matrix(self.rotary.site))
        x = x + self.positional(torch.arange(x.shape[1], device=x.device)).to(x.dtype)
        for block in self.blocks:
            x = run_block(block, self.checkpointing, x, pos, padding)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    """tokens: (B, T), xa: (B, Ta, Da) -> logits (B, T, vocab) float32, tied to the token embedding."""

    def __init__(self, config: EchoConfig):
        super().__init__()
        d = config.n_text_state
        self.checkpointing = config.checkpointing
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.positional = LearnedSinusoidalEmbedding(config.n_text_ctx, d, config.checkpointing,
                                                     config.positional_norm)
        self.rotary = CombinedRotaryEmbedding(d, config.n_text_head, config.givens_count("text"), config.base,
                                              config.rope_layout, seed=PAIR_SEED + 1)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_text_layer))
        self.ln = layer_norm(config.layer_norm, d)

    def forward(self, tokens: Tensor, xa: Tensor | None, pos: PositionalState, padding: Tensor | None = None,
                audio_padding: Tensor | None = None, cache: EchoCache | None = None) -> Tensor:
        """padding: (B, offset + T) bool over all text keys so far, True = padded."""
        offset = cache.offset if cache is not None else 0
        T = tokens.shape[1]
        x = self.token_embedding(tokens)
        x = x + self.positional(torch.arange(offset, offset + T, device=tokens.device)).to(x.dtype)
        x = self.rotary(x, pos.matrix(self.rotary.site), offset)
        for block in self.blocks:
            # a cached step mutates the cache, so it must not be re-run by checkpointing
            x = run_block(block, self.checkpointing and cache is None, x, xa, pos, padding, audio_padding,
                          cache, offset)
        x = self.ln(x)
        if cache is not None:
            cache.advance(T)
        return tied_logits(x, self.token_embedding.weight)


class Echo(PreTrainedModel):
    """The Echo speech model: AudioEncoder + TextDecoder, Hugging Face style.

    Buffers `base` (the current rotary base of attention) and `prev_loss` (last training loss,
    +inf at first) implement the self-adjusting base (docs/model.md, Adaptive base). By default a training
    forward with labels moves the base; `defer_base_updates()` makes it move once per optimizer step instead
    (`step_base()`, which echo.AdaptiveBaseCallback calls under transformers' Trainer).
    """

    config_class = EchoConfig
    base_model_prefix = "echo"
    main_input_name = "input_features"
    _no_split_modules = ["EncoderBlock", "DecoderBlock"]
    # transformers' Trainer passes forward num_items_in_batch, and as the loss is divided by it, does not
    # divide it again by gradient_accumulation_steps
    accepts_loss_kwargs = True

    def __init__(self, config):
        config = to_echo_config(config)
        super().__init__(config)
        self.encoder = AudioEncoder(config)
        self.decoder = TextDecoder(config)
        self.register_buffer("base", torch.tensor(float(config.base), dtype=torch.float32))
        self.register_buffer("prev_loss", torch.tensor(float("inf"), dtype=torch.float32))
        # (3,) float32 [sum of token losses, tokens, forwards] of the optimizer step so far, or None when
        # forward moves the base itself. Not a buffer: never saved, cast, or broadcast by DDP from rank 0.
        self.step_loss: Tensor | None = None
        self.post_init()

    def _init_weights(self, module):
        # modules initialise themselves at construction; apply_initialization() is the scheme
        # of docs/model.md, Encoder and decoder
        pass

    def apply_initialization(self) -> None:
        """docs/model.md, Encoder and decoder: embedding N(0, init_std); conv1 xavier-normal, conv2
        kaiming-normal (fan_out, relu), zero conv biases; LayerNorm weight 1, bias 0; decoder Linear weights
        xavier-normal; attention R orthogonal. Everything else keeps its construction-time value."""
        with torch.no_grad():
            nn.init.normal_(self.decoder.token_embedding.weight, 0.0, self.config.init_std)
            nn.init.xavier_normal_(self.encoder.conv1.weight)
            nn.init.kaiming_normal_(self.encoder.conv2.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.encoder.conv1.bias)
            nn.init.zeros_(self.encoder.conv2.bias)
            for module in self.modules():
                if isinstance(module, (nn.LayerNorm, S1LayerNorm)):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, EchoAttention):
                    module.site.reset_r(orthogonal=True)
            for module in self.decoder.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_normal_(module.weight)

    # ------------------------------------------------------------------------------------------
    # positional state, computed once per forward outside any checkpointed region

    def positional_state(self) -> PositionalState:
        """The attention frequencies from the current base and the M of every Givens site of the model."""
        return PositionalState(
            w_audio=rope_frequencies(self.base, self.config.head_width("audio")),
            w_text=rope_frequencies(self.base, self.config.head_width("text")),
            matrices=site_matrices(m for m in self.modules() if isinstance(m, GivensSite)),
        )

    def update_base(self, loss: Tensor) -> None:
        """base *= f if loss < prev_loss else base /= f; prev_loss = loss. On the device, no sync.

        A NaN or infinite loss (e.g. every label ignored) leaves both untouched: compared with it,
        every later loss would count as worse and the base would only ever shrink.
        """
        with torch.no_grad():
            loss = loss.detach().to(self.prev_loss.dtype)
            f = self.config.base_factor
            finite = torch.isfinite(loss)
            new_base = torch.where(loss < self.prev_loss, self.base * f, self.base / f)
            self.base.copy_(torch.where(finite, new_base, self.base))
            self.prev_loss.copy_(torch.where(finite, loss, self.prev_loss))

    def defer_base_updates(self, enabled: bool = True) -> None:
        """enabled: a training forward with labels only adds its loss to `step_loss` (on the device, no
        sync), and the base moves when `step_base()` is called, once per optimizer step.
        False: forward moves the base itself again, from each forward's loss."""
        self.step_loss = torch.zeros(3, dtype=torch.float32, device=self.base.device) if enabled else None

    def step_base(self) -> None:
        """Move the base once, from the mean token loss of the forwards since the last call, summed over
        all processes when torch.distributed is initialised (so every process moves it alike); then
        start the next step's sum. Needs `defer_base_updates()` first. On the device, no host sync."""
        if self.step_loss is None:
            raise RuntimeError("Echo.step_base() needs defer_base_updates() first "
                               "(forward moves the base now)")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.step_loss)
        self.update_base(self.step_loss[0] / self.step_loss[1])  # no labelled token: 0/0, and the base stays
        self.step_loss.zero_()

    def _adapt_base(self, loss_sum: Tensor, tokens: Tensor, num_items_given: bool) -> None:
        """One training forward's share of the adaptive base (docs/model.md, Adaptive base): loss_sum of its
        `tokens` labelled tokens."""
        if self.step_loss is not None:
            if self.step_loss.device != loss_sum.device:
                self.step_loss = self.step_loss.to(loss_sum.device)
            one = torch.ones_like(self.step_loss[0])
            self.step_loss += torch.stack([loss_sum.detach().float(), tokens.float(), one])
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _warn_base_moves_in_forward("each process moves it by its own loss, so their bases drift apart")
        elif num_items_given:
            _warn_base_moves_in_forward("under gradient accumulation it moves once per micro-batch, not once "
                                        "per optimizer step")
        self.update_base(loss_sum.detach() / tokens)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the adaptive state: it stays float32 on the new device
        kept = {name: self._buffers[name] for name in ("base", "prev_loss") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    # ------------------------------------------------------------------------------------------

    def encode(self, input_features: Tensor, attention_mask: Tensor | None = None,
               pos: PositionalState | None = None) -> tuple[Tensor, Tensor | None]:
        """mel (B, n_mels, T) -> (audio features (B, ceil(T/2), D), frame padding (B, ceil(T/2)) or None).

        The mel is cast to the model's dtype here, where every path into the encoder passes: the
        front end computes float32 features, and a bfloat16 or float16 model's convolutions need theirs.
        """
        check_mel(self.config, input_features, attention_mask)
        input_features = as_model_dtype(input_features, self.encoder.conv1.weight.dtype)
        padding = frame_padding(attention_mask)
        pos = self.positional_state() if pos is None else pos
        return self.encoder(input_features, pos, padding), padding

    def forward(
        self,
        input_features: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_outputs=None,
        past_key_values: EchoCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        cache: EchoCache | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """input_features: (B, n_mels, T) log-mel (any floating dtype: cast to the model's);
        labels / decoder_input_ids: (B, L) token ids of any integer dtype, used as int64.

        past_key_values (or `cache`, its newer transformers name): an EchoCache to continue from.
        The loss is the mean cross-entropy of the labelled tokens; given num_items_in_batch (the labelled
        tokens of a whole accumulated batch, as transformers' Trainer passes it), their sum divided by it.
        Returns Seq2SeqLMOutput(loss, logits (B, L, vocab) float32, cache, encoder_last_hidden_state);
        the cache is returned when use_cache is set (read it as .cache or .past_key_values).
        """
        cache, use_cache = self._cache_argument(past_key_values, cache, use_cache)
        labels, decoder_input_ids = self._decoder_inputs(labels, decoder_input_ids, cache)
        pos = self.positional_state() if cache is None else cache.positional_state(self.positional_state)
        xa, audio_padding = self._audio(input_features, encoder_outputs, attention_mask, pos, cache)
        padding = self._text_padding(decoder_attention_mask, decoder_input_ids, cache)
        logits = self.decoder(decoder_input_ids, xa, pos, padding, audio_padding, cache)
        loss = None if labels is None else self._loss(logits, labels, num_items_in_batch)
        return _output(loss, logits, xa, cache if use_cache else None, return_dict)

    # ------------------------------------------------------------------------------------------
    # forward's steps, and its Hugging Face conventions

    @staticmethod
    def _cache_argument(past_key_values: EchoCache | None, cache: EchoCache | None,
                        use_cache: bool | None) -> tuple[EchoCache | None, bool]:
        """(the EchoCache to decode with, or None; whether forward returns it).

        transformers names the cache past_key_values, newer versions `cache`: either is accepted, once.
        use_cache None means "if a cache was given"; use_cache without one starts a new EchoCache.
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once, as past_key_values or as cache")
        cache = cache if cache is not None else past_key_values
        use_cache = bool(use_cache) or (use_cache is None and cache is not None)
        if cache is None and use_cache:
            cache = EchoCache()
        if cache is not None and not isinstance(cache, EchoCache):
            raise ValueError(f"past_key_values must be an EchoCache, got {type(cache).__name__}")
        return cache, use_cache

    def _decoder_inputs(self, labels: Tensor | None, decoder_input_ids: Tensor | None,
                        cache: EchoCache | None) -> tuple[Tensor | None, Tensor]:
        """(labels, decoder_input_ids), checked and int64, each (B, L).

        As in transformers' seq2seq models, labels alone give decoder_input_ids = the labels shifted
        right behind decoder_start_token_id (shift_tokens_right).
        """
        config = self.config
        if labels is not None:
            check_tokens(config, "labels", labels, allow_ignore=True)
            labels = labels.long()  # cross_entropy takes int64 targets only
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(labels, config.pad_token_id,
                                                       config.decoder_start_token_id)
        if decoder_input_ids is None:
            raise ValueError("Echo.forward needs labels or decoder_input_ids")
        check_tokens(config, "decoder_input_ids", decoder_input_ids, offset=cache.offset if cache else 0)
        decoder_input_ids = decoder_input_ids.long()  # the embedding takes int32 and int64 indices only
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and decoder_input_ids "
                             f"{tuple(decoder_input_ids.shape)} must have the same shape")
        return labels, decoder_input_ids

    def _audio(self, input_features: Tensor | None, encoder_outputs, attention_mask: Tensor | None,
               pos: PositionalState, cache: EchoCache | None) -> tuple[Tensor | None, Tensor | None]:
        """(xa (B, Ta, Da), its frame padding (B, Ta) or None) for the decoder's cross-attention.

        xa is encoded from input_features, or taken from encoder_outputs (a tensor, a tuple or a
        BaseModelOutput, as transformers passes it), or None on a cached step past the first (the
        cross-attention keys and values are in the cache, and the padding too).
        """
        audio_padding = cache.audio_padding if cache is not None else None
        if encoder_outputs is not None:
            xa = (encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list, BaseModelOutput))
                  else encoder_outputs)
            if attention_mask is not None:
                audio_padding = frame_padding(attention_mask)
        elif input_features is not None:
            xa, audio_padding = self.encode(input_features, attention_mask, pos)
        elif cache is not None and cache.offset > 0:
            xa = None
        else:
            raise ValueError("Echo.forward needs input_features (or encoder_outputs)")
        if cache is not None:
            cache.audio_padding = audio_padding
        return xa, audio_padding

    @staticmethod
    def _text_padding(decoder_attention_mask: Tensor | None, decoder_input_ids: Tensor,
                      cache: EchoCache | None) -> Tensor | None:
        """decoder_attention_mask (B, past + L), 1 = a real token -> padding (B, past + L) bool,
        True = padded; None without a mask. past: the tokens the cache holds."""
        if decoder_attention_mask is None:
            return None
        offset = cache.offset if cache is not None else 0
        B, L = decoder_input_ids.shape
        if decoder_attention_mask.shape != (B, offset + L):
            raise ValueError(f"decoder_attention_mask must have shape (B, past + L) = ({B}, {offset + L}), "
                             f"got {tuple(decoder_attention_mask.shape)}")
        return ~decoder_attention_mask.bool()

    def _loss(self, logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
        """() float32: the labelled tokens' summed cross-entropy over their count, or over
        num_items_in_batch (transformers' Trainer: the labelled tokens of the whole accumulated batch).
        A training forward also feeds the adaptive base (docs/model.md, Adaptive base)."""
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        tokens = labels.ne(-100).sum()
        if num_items_in_batch is None:
            loss = loss_sum / tokens
        else:
            if isinstance(num_items_in_batch, Tensor):
                num_items_in_batch = num_items_in_batch.to(loss_sum.device)
            loss = loss_sum / num_items_in_batch
        if self.training and self.config.adaptive_base:
            self._adapt_base(loss_sum, tokens, num_items_given=num_items_in_batch is not None)
        return loss

    # ------------------------------------------------------------------------------------------
    # decoding lives in echo/generate.py and echo/transcribe.py, outside the model as openai-whisper keeps it;
    # bound here as the model's methods (model.generate(mel, ...) is generate(model, mel, ...)), which also
    # override transformers' generate

    generate = generate_function
    transcribe = transcribe_function

    @classmethod
    def can_generate(cls) -> bool:
        """True: Echo decodes with its own generate (not transformers' GenerationMixin). transformers reads
        this to give the model a generation_config, which the speech-recognition pipeline consults."""
        return True

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_whisper(cls, source, **overrides) -> "Echo":
        """A pretrained Whisper as an Echo that computes its function (docs/model.md, Starting
        from Whisper); see echo.convert.

        source: openai-whisper's checkpoint file (.pt) or loaded Whisper, or a Hugging Face
        WhisperForConditionalGeneration or the folder it was saved to. overrides: EchoConfig keys that
        turn Echo's options on (sizes, vocabulary and token ids come from the source).
        """
        from .convert import from_whisper

        return from_whisper(cls, source, **overrides)

    def save_pretrained(self, save_directory, *args, processor="auto", **kwargs):
        """transformers' save_pretrained (config.json + model.safetensors), and the processor beside them, so
        that AutoProcessor and the "automatic-speech-recognition" pipeline load the folder.

        processor: an EchoProcessor to save (checked to fit this model); "auto" (the default) builds
        EchoProcessor.for_config(self.config) where it can be built (one of whisper's vocabularies, and
        openai-whisper installed for its vocabulary files) and otherwise saves the model alone, logging a
        warning that says why and how to add it; None saves the model alone. Returns what was saved.
        """
        processor = self._processor_to_save(processor)
        super().save_pretrained(save_directory, *args, **kwargs)
        if processor is not None and kwargs.get("is_main_process", True):
            processor.save_pretrained(save_directory)
        return processor

    def _processor_to_save(self, processor):
        from .audio import uses_whisper_vocab
        from .processor import EchoProcessor

        if processor is None:
            return None
        if isinstance(processor, EchoProcessor):
            processor.check_matches(self.config)
            return processor
        if processor != "auto":
            raise TypeError(f"processor must be an EchoProcessor, \"auto\" or None, got "
                            f"{type(processor).__name__}")
        if not uses_whisper_vocab(self.config):
            reason = f"its vocabulary of {self.config.vocab_size} tokens is not one of whisper's"
        else:
            try:
                return EchoProcessor.for_config(self.config)
            except MissingExtra as missing:  # whisper's vocabulary files ship with openai-whisper
                reason = (f"{missing}; or pass "
                          f"save_pretrained(..., processor=EchoProcessor.from_pretrained(folder))")
        logger.warning("Echo.save_pretrained: the model is saved without a processor (AutoProcessor and the "
                       "speech-recognition pipeline need one): %s", reason)
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a folder written by save_pretrained (config.json + model.safetensors, or shards).

        Keys and shapes are checked before anything is loaded; a problem is a ValueError naming it.
        Hub arguments that Auto classes pass along (trust_remote_code, revision, ...) are ignored:
        Echo loads local folders only. `dtype` / `torch_dtype` cast the loaded model.
        """
        from .checkpoint import load_checkpoint

        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return load_checkpoint(cls, pretrained_model_name_or_path, config=config, dtype=dtype)


# Seq2SeqLMOutput's cache field: `cache` in newer transformers, `past_key_values` before.
_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(Seq2SeqLMOutput)}
                else "past_key_values")



def _output(loss: Tensor | None, logits: Tensor, xa: Tensor | None, cache: EchoCache | None,
            return_dict: bool | None) -> Seq2SeqLMOutput | tuple:
    """forward's result as transformers' seq2seq models give it: a Seq2SeqLMOutput, its cache under the
    field name of the installed transformers; its to_tuple() (the fields that are not None) when
    return_dict is False."""
    out = Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=xa, **{_CACHE_FIELD: cache})
    return out.to_tuple() if return_dict is False else out


@functools.cache
def _warn_base_moves_in_forward(consequence: str) -> None:
    warnings.warn(f"Echo.forward moves the adaptive rotary base itself: {consequence}. Under transformers' "
                  "Trainer pass callbacks=[echo.AdaptiveBaseCallback()]; in a loop of your own call "
                  "model.defer_base_updates() once and model.step_base() after each optimizer step.",
                  stacklevel=3)


def shift_tokens_right(labels: Tensor, pad_token_id: int, decoder_start_token_id: int) -> Tensor:
    """(B, L) -> (B, L): [start, labels[:, :-1]] with -100 replaced by pad."""
    shifted = labels.new_empty(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def frame_padding(attention_mask: Tensor | None) -> Tensor | None:
    """mel attention_mask (B, T), 1 = a real frame -> padding (B, ceil(T / 2)) bool of the encoder's
    frames (its stride-2 convolution keeps every other one), True = padded; None -> None."""
    return None if attention_mask is None else ~attention_mask[:, ::2].bool()
