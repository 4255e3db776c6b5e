"""EchoConfig: the keys of docs/model.md, Configuration, their checks, and conversion from a WhisperConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from transformers import PretrainedConfig

from echo_kernels.kernels import ATTENTION_HEAD_WIDTHS

logger = logging.getLogger(__name__)

ROPE_LAYOUTS = ("half_split", "interleaved")
MLPS = ("gelu", "s1")
LAYER_NORMS = ("standard", "s1")
HYBRID_COMBINES = ("sum", "linear")
POSITIONAL_NORMS = ("l2", "none")
ATTENTION_ROTATIONS = ("m_then_rope", "rope_then_m")
# The order every Echo saved before attention_rotation existed computed in.
LEGACY_ATTENTION_ROTATION = "rope_then_m"

class EchoConfig(PretrainedConfig):
    """Configuration of `echo.Echo` (docs/model.md, Configuration), defaulting to the "medium" model.
    Unknown keys are kept as attributes.

    n_givens=None means h/2 rotations per site; local_window=None means global attention only.
    attention_rotation: "m_then_rope" (q' = RoPE(q M), x (prod G) R's order, every angle learns) or
    "rope_then_m" (q' = RoPE(q) M, the reference code's order, whose Givens angles cancel).
    """

    model_type = "echo"

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 1024
    n_audio_head: int = 16
    n_audio_layer: int = 24
    vocab_size: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 1024
    n_text_head: int = 16
    n_text_layer: int = 20
    max_rel_dist: int = 15
    cross_attention: bool = True
    checkpointing: bool = True
    base: float = 10000.0
    bos_token_id: int | None = 50257
    eos_token_id: int | None = 50257
    pad_token_id: int | None = 50257
    decoder_start_token_id: int | None = 50258
    init_std: float = 0.02
    base_factor: float = 1.05
    adaptive_base: bool = True
    n_givens: int | None = None
    local_window: int | None = None
    hybrid_combine: str = "sum"
    conv_attention: bool = False
    mlp: str = "gelu"
    layer_norm: str = "standard"
    rope_layout: str = "half_split"
    positional_norm: str = "l2"
    attention_rotation: str = "m_then_rope"
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_echo()

    def validate_echo(self) -> None:
        """Raise ValueError naming the first key whose value cannot build a working model."""
        positive = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "vocab_size",
                    "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EchoConfig.{key} must be a positive int, got {value!r}")
        for side in ("audio", "text"):
            width, heads = getattr(self, f"n_{side}_state"), getattr(self, f"n_{side}_head")
            if width % heads:
                raise ValueError(f"EchoConfig: n_{side}_head = {heads} does not divide n_{side}_state = "
                                 f"{width}")
            h = width // heads
            if h % 2:
                raise ValueError(f"EchoConfig: head width h = n_{side}_state / n_{side}_head = {h} "
                                 f"must be even")
            if h > ATTENTION_HEAD_WIDTHS[-1]:
                raise ValueError(
                    f"EchoConfig: head width h = n_{side}_state / n_{side}_head = {h} is wider than the "
                    f"attention kernels serve (h <= {ATTENTION_HEAD_WIDTHS[-1]}; built for "
                    f"{', '.join(map(str, ATTENTION_HEAD_WIDTHS))}, other even widths run zero-padded): "
                    f"use more heads")
            if self.n_givens is not None and not (
                isinstance(self.n_givens, int) and not isinstance(self.n_givens, bool)
                and 1 <= self.n_givens <= h - 1
            ):
                raise ValueError(
                    f"EchoConfig.n_givens must be None or an int in [1, h - 1] = [1, {h - 1}] "
                    f"(adjacent pairs (k, k+1) for the {side} head width {h}), got {self.n_givens!r}"
                )
        if isinstance(self.max_rel_dist, bool) or not isinstance(self.max_rel_dist, int) \
                or self.max_rel_dist < 1:
            raise ValueError(f"EchoConfig.max_rel_dist must be an int >= 1, got {self.max_rel_dist!r}")
        if self.local_window is not None and (
            isinstance(self.local_window, bool) or not isinstance(self.local_window, int)
            or self.local_window < 0
        ):
            raise ValueError(f"EchoConfig.local_window must be None or an int >= 0, got "
                             f"{self.local_window!r}")
        for key, allowed in (("rope_layout", ROPE_LAYOUTS), ("mlp", MLPS), ("layer_norm", LAYER_NORMS),
                             ("hybrid_combine", HYBRID_COMBINES), ("positional_norm", POSITIONAL_NORMS),
                             ("attention_rotation", ATTENTION_ROTATIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"EchoConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not isinstance(self.base, (int, float)) or isinstance(self.base, bool) or not self.base > 1:
            raise ValueError(f"EchoConfig.base must be a number > 1, got {self.base!r}")
        if not isinstance(self.base_factor, (int, float)) or isinstance(self.base_factor, bool) \
                or not self.base_factor > 0:
            raise ValueError(f"EchoConfig.base_factor must be a number > 0, got {self.base_factor!r}")
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise ValueError(f"EchoConfig.init_std must be a number >= 0, got {self.init_std!r}")
        # eos_token_id ends every decoded row: None, or an id the model can never emit, would not.
        for key in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
            check_token_id(f"EchoConfig.{key}", getattr(self, key), self.vocab_size)
        for key in ("cross_attention", "checkpointing", "adaptive_base", "conv_attention"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"EchoConfig.{key} must be a bool, got {getattr(self, key)!r}")

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """config.json as a dict (what from_pretrained and from_json_file read): a ValueError naming the
        file where it is not valid JSON or holds something other than a JSON object."""
        return read_json_object(json_file)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As PretrainedConfig.from_dict (what from_pretrained and AutoConfig use), except that a saved
        Echo config without attention_rotation predates the key: its model computed "rope_then_m",
        so it loads as that, and says so."""
        if config_dict.get("model_type") == cls.model_type and "attention_rotation" not in config_dict \
                and "attention_rotation" not in kwargs:
            logger.warning(
                "This Echo config has no attention_rotation: it was saved before the key existed, when "
                "attention computed RoPE(q) M. Loading it as attention_rotation=%r, which computes what it "
                "computed; the default for new models is 'm_then_rope'.", LEGACY_ATTENTION_ROTATION)
            config_dict = {**config_dict, "attention_rotation": LEGACY_ATTENTION_ROTATION}
        return super().from_dict(config_dict, **kwargs)

    def head_width(self, side: str) -> int:
        """h of the encoder ("audio") or decoder ("text")."""
        return getattr(self, f"n_{side}_state") // getattr(self, f"n_{side}_head")

    def givens_count(self, side: str) -> int:
        """N, the number of Givens rotations per site of that side (h/2 unless n_givens is set)."""
        return self.n_givens if self.n_givens is not None else self.head_width(side) // 2


def check_token_id(name: str, value, vocab_size: int) -> None:
    """ValueError naming `name` unless value is an int in [0, vocab_size)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")


def read_json_object(path) -> dict:
    """The JSON object (a dict) in the file `path`; invalid JSON, or JSON of another kind, is a ValueError
    naming the file (config.json, a shard index, a checkpoint's metadata)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a JSON {_json_kind(value)}")
    return value


def _json_kind(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


# Every key Echo reads (the fields EchoConfig declares), with its default.
ECHO_DEFAULTS = {
    field.name: field.default for field in dataclasses.fields(EchoConfig)
    if field.name in EchoConfig.__annotations__ and field.name != "is_encoder_decoder"
}


def to_echo_config(config: PretrainedConfig) -> EchoConfig:
    """An EchoConfig from an EchoConfig (returned as is) or any other config carrying Echo's keys.

    A WhisperConfig in the form of docs/model.md, Configuration, holds Echo's keys as extra attributes;
    its own architecture keys (d_model, encoder_layers, ...) are ignored. Keys both configs define
    (vocab_size, init_std, the special token ids) are read from it as they mean the same thing.
    """
    if isinstance(config, EchoConfig):
        config.validate_echo()
        return config
    if not isinstance(config, PretrainedConfig):
        raise ValueError(f"Echo needs an EchoConfig (or a WhisperConfig carrying Echo's keys), got "
                         f"{type(config).__name__}")
    values = {}
    for key in ECHO_DEFAULTS:
        if hasattr(config, key):
            values[key] = getattr(config, key)
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = values["eos_token_id"][0]
    return EchoConfig(**values)


# Whisper "tiny" widths and depths at the default context lengths and vocabulary: the demo's default.
TINY = dict(n_audio_state=384, n_audio_head=6, n_audio_layer=4, n_text_state=384, n_text_head=6,
            n_text_layer=4)

# A model small enough for tests on a laptop CPU (about 0.3 M parameters).
SMALL = dict(
    n_mels=80, n_audio_ctx=16, n_audio_state=64, n_audio_head=4, n_audio_layer=2, vocab_size=100,
    n_text_ctx=12, n_text_state=64, n_text_head=4, n_text_layer=2, max_rel_dist=4,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=3,
)


def small_config(**overrides) -> EchoConfig:
    """EchoConfig of SMALL, with `overrides` applied."""
    return EchoConfig(**{**SMALL, **overrides})
