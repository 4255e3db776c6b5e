"""Start from a pretrained Whisper (docs/model.md, Starting from Whisper): openai-whisper and Hugging Face
checkpoints become Echo.

    model = Echo.from_whisper("small.en.pt")         # the checkpoint file whisper.load_model reads
    model = Echo.from_whisper(whisper_model)         # a loaded whisper.model.Whisper
    model = Echo.from_whisper(hf_model_or_folder)    # a WhisperForConditionalGeneration, or its folder
    python -m echo.convert SOURCE OUT_DIR [--set local_window=64 ...]   # the same, saved as an Echo folder

Whisper's weights are copied layer for layer. Every part Whisper lacks starts at the identity: attention
s = 0 (RoPE turns nothing), the residual-stream rotary's w = 0, every theta 0 and R = I (M = I), bias 0,
global attention, positional tables added as they are (`positional_norm="none"`) and the residual rotary
written interleaved (with phi = 0 that is the identity; "half_split" would permute the stream). So the
imported Echo computes Whisper's function until fine-tuning moves them. Overrides may turn Echo's options
on; the parts they add start fresh, and the import says which.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..attention import ConvAttention, EchoAttention, LocalGlobalAttention
from ..checkpoint import load_weights_only, read_tensors
from ..config import ECHO_DEFAULTS, EchoConfig, read_json_object
from ..positional import CombinedRotaryEmbedding, GivensSite

logger = logging.getLogger(__name__)

# openai-whisper's ModelDimensions, the "dims" of its checkpoints
DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_vocab", "n_text_ctx",
        "n_text_state", "n_text_head", "n_text_layer")

# What the source decides; an override of these is refused.
FROM_SOURCE = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "vocab_size",
               "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "bos_token_id", "eos_token_id",
               "pad_token_id", "decoder_start_token_id", "cross_attention", "mlp")

# Hugging Face's names -> openai-whisper's, applied in order to each dotted name.
_HF_NAMES = [
    (r"^model\.encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^model\.decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^model\.decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^model\.encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^model\.decoder\.layer_norm\.", "decoder.ln."),
    (r"^model\.(encoder|decoder)\.layers\.", r"\1.blocks."),
    (r"^model\.encoder\.conv", "encoder.conv"),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
]


@dataclasses.dataclass
class WhisperWeights:
    """A Whisper as openai-whisper names it: ModelDimensions' fields, its state dict and its special
    tokens."""

    dims: dict
    tensors: dict[str, Tensor]
    tokens: dict  # bos/eos/pad_token_id, decoder_start_token_id
    origin: str


# ----------------------------------------------------------------------------------------------
# reading a source


def read_whisper(source) -> WhisperWeights:
    """openai-whisper's checkpoint file or model, or a Hugging Face WhisperForConditionalGeneration (or the
    folder it was saved to) -> WhisperWeights. Anything else is a ValueError saying what it is."""
    if isinstance(source, nn.Module):
        if hasattr(source, "dims") and hasattr(source, "encoder") and hasattr(source, "decoder"):
            return _openai(dataclasses.asdict(source.dims), source.state_dict(), type(source).__name__)
        from transformers import WhisperForConditionalGeneration

        if isinstance(source, WhisperForConditionalGeneration):
            return _hugging_face(source.config, source.state_dict(), type(source).__name__)
        raise ValueError(f"{type(source).__name__} is not a Whisper: expected openai-whisper's Whisper or "
                         "transformers' WhisperForConditionalGeneration")
    if not isinstance(source, (str, Path)):
        raise ValueError(f"a Whisper source is a path, a whisper.model.Whisper or a "
                         f"WhisperForConditionalGeneration, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        return _hugging_face_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Whisper checkpoint at {path}")
    checkpoint = load_weights_only(path, "openai-whisper checkpoint")
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not an openai-whisper checkpoint: it needs 'dims' and "
                         f"'model_state_dict' (what whisper.load_model reads), found {keys}")
    return _openai(checkpoint["dims"], checkpoint["model_state_dict"], str(path))


def _openai(dims: dict, tensors: dict, origin: str) -> WhisperWeights:
    from ..audio import WHISPER_VOCAB_SIZES, get_tokenizer

    if not isinstance(dims, dict) or set(dims) != set(DIMS):
        raise ValueError(f"{origin}: 'dims' must hold whisper's ModelDimensions fields {DIMS}, got {dims!r}")
    if dims["n_vocab"] not in WHISPER_VOCAB_SIZES:
        raise ValueError(f"{origin}: a vocabulary of {dims['n_vocab']} tokens is not one of whisper's "
                         f"{WHISPER_VOCAB_SIZES}")
    tokenizer = get_tokenizer(vocab_size=dims["n_vocab"])  # whisper's rule: English-only or multilingual
    tokens = dict(bos_token_id=tokenizer.eot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot,
                  decoder_start_token_id=tokenizer.sot)
    return WhisperWeights(dict(dims), dict(tensors), tokens, origin)


def _hugging_face_folder(path: Path) -> WhisperWeights:
    from transformers import WhisperConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face Whisper folder: it has no config.json")
    model_type = read_json_object(config_file).get("model_type")
    if model_type == "echo":
        raise ValueError(f"{path} is already an Echo folder: load it with Echo.from_pretrained")
    if model_type != "whisper":
        raise ValueError(f"{path} is not a Whisper: config.json has model_type {model_type!r}")
    if (path / "pytorch_model.bin").is_file() and not any(path.glob("*.safetensors")):
        tensors = load_weights_only(path / "pytorch_model.bin", "PyTorch weights file")
    else:
        tensors = read_tensors(path)
    return _hugging_face(WhisperConfig.from_pretrained(path), tensors, str(path))


def _hugging_face(config, tensors: dict, origin: str) -> WhisperWeights:
    if config.activation_function != "gelu" or config.scale_embedding or config.d_model % 2:
        raise ValueError(f"{origin}: Echo's layers are Whisper's own (exact GELU, unscaled embeddings); this "
                         f"config has activation_function={config.activation_function!r}, "
                         f"scale_embedding={config.scale_embedding}")
    dims = dict(n_mels=config.num_mel_bins, n_audio_ctx=config.max_source_positions,
                n_audio_state=config.d_model, n_audio_head=config.encoder_attention_heads,
                n_audio_layer=config.encoder_layers, n_vocab=config.vocab_size,
                n_text_ctx=config.max_target_positions, n_text_state=config.d_model,
                n_text_head=config.decoder_attention_heads, n_text_layer=config.decoder_layers)
    renamed = {}
    for name, tensor in tensors.items():
        if name == "proj_out.weight":  # the output projection is tied to the token embedding
            embedding = tensors.get("model.decoder.embed_tokens.weight")
            if embedding is not None and not torch.equal(tensor, embedding):
                raise ValueError(f"{origin}: proj_out.weight differs from the token embedding; "
                                 f"Echo ties them")
            continue
        for pattern, replacement in _HF_NAMES:
            name = re.sub(pattern, replacement, name)
        renamed[name] = tensor
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    tokens = dict(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id,
                  decoder_start_token_id=config.decoder_start_token_id)
    return WhisperWeights(dims, renamed, tokens, origin)


# ----------------------------------------------------------------------------------------------
# the mapping


def whisper_tensor_names(n_audio_layer: int, n_text_layer: int) -> list[str]:
    """Every tensor of an openai-whisper Whisper's state dict with these depths."""

    def linear(p, bias=True):
        return [f"{p}.weight"] + ([f"{p}.bias"] if bias else [])

    def attention(p):
        return (linear(f"{p}.query") + linear(f"{p}.key", bias=False) + linear(f"{p}.value")
                + linear(f"{p}.out"))

    def block(p, cross):
        names = attention(f"{p}.attn") + linear(f"{p}.attn_ln")
        if cross:
            names += attention(f"{p}.cross_attn") + linear(f"{p}.cross_attn_ln")
        return names + linear(f"{p}.mlp.0") + linear(f"{p}.mlp.2") + linear(f"{p}.mlp_ln")

    names = linear("encoder.conv1") + linear("encoder.conv2") + ["encoder.positional_embedding"]
    for i in range(n_audio_layer):
        names += block(f"encoder.blocks.{i}", cross=False)
    names += linear("encoder.ln_post") + ["decoder.token_embedding.weight", "decoder.positional_embedding"]
    for i in range(n_text_layer):
        names += block(f"decoder.blocks.{i}", cross=True)
    return names + linear("decoder.ln")


def echo_name(name: str, config: EchoConfig) -> str:
    """An openai-whisper tensor name -> the Echo parameter that holds it under `config`."""
    name = re.sub(r"^(encoder|decoder)\.positional_embedding$", r"\1.positional.weight", name)
    name = re.sub(r"\.mlp\.([02])\.", r".mlp.net.\1.", name)
    encoder_attention = re.match(r"^(encoder\.blocks\.\d+\.attn)\.(query|key|value|out)\.(weight|bias)$",
                                 name)
    if encoder_attention:
        prefix, part, kind = encoder_attention.groups()
        if config.conv_attention:  # the mixer projects the sum of convolution and attention
            if part == "out":
                return f"{prefix}.out.{kind}"
            prefix += ".attn"
        if config.local_window is not None:  # Whisper's attention is the global branch
            prefix += ".global_attn"
        return f"{prefix}.{part}.{kind}"
    return name


def build_config(weights: WhisperWeights, overrides: dict) -> EchoConfig:
    unknown = sorted(set(overrides) - set(ECHO_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown EchoConfig keys: {', '.join(unknown)}")
    fixed = sorted(set(overrides) & set(FROM_SOURCE))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} come(s) from the Whisper being imported and "
                         f"cannot be overridden")
    dims = weights.dims
    values = dict(n_mels=dims["n_mels"], n_audio_ctx=dims["n_audio_ctx"], n_audio_state=dims["n_audio_state"],
                  n_audio_head=dims["n_audio_head"], n_audio_layer=dims["n_audio_layer"],
                  vocab_size=dims["n_vocab"], n_text_ctx=dims["n_text_ctx"],
                  n_text_state=dims["n_text_state"], n_text_head=dims["n_text_head"],
                  n_text_layer=dims["n_text_layer"], **weights.tokens, positional_norm="none",
                  rope_layout="interleaved", local_window=None)
    return EchoConfig(**{**values, **overrides})


def _check(weights: WhisperWeights, model: nn.Module, config: EchoConfig) -> dict[str, str]:
    """{whisper name: echo name}, after checking that the source holds exactly a Whisper of these dims."""
    expected = whisper_tensor_names(config.n_audio_layer, config.n_text_layer)
    given = set(weights.tensors)
    missing = [n for n in expected if n not in given]
    unexpected = sorted(given - set(expected))
    origin = weights.origin
    if missing:
        raise ValueError(f"{origin} is not a complete Whisper: missing tensor(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(f"{origin} is not a Whisper of dims {weights.dims}: unexpected tensor(s) "
                         f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    targets = model.state_dict()
    mapping = {}
    for name in expected:
        target = echo_name(name, config)
        got, want = tuple(weights.tensors[name].shape), tuple(targets[target].shape)
        if got != want:
            raise ValueError(f"{origin}: tensor {name} has shape {got}; a Whisper of dims {weights.dims} "
                             f"needs {want}")
        if not weights.tensors[name].is_floating_point():
            raise ValueError(f"{origin}: tensor {name} has dtype {weights.tensors[name].dtype}, "
                             f"not floating point")
        mapping[name] = target
    return mapping


def _identity_start(model: nn.Module) -> None:
    """Every extra of Echo at the identity (docs/model.md, Starting from Whisper); branches an override
    added contribute nothing."""
    for module in model.modules():
        if isinstance(module, GivensSite):
            module.thetas.zero_()
            module.R.copy_(torch.eye(module.h))
        elif isinstance(module, EchoAttention):
            module.s.zero_()
            module.bias.zero_()
        elif isinstance(module, CombinedRotaryEmbedding):
            module.w.zero_()
        elif isinstance(module, LocalGlobalAttention):
            if module.combine is not None:  # out = combine([local, global]) = global
                d = module.combine.out_features
                module.combine.weight.copy_(torch.cat([torch.zeros(d, d), torch.eye(d)], dim=1))
                module.combine.bias.zero_()
            elif module.local_attn.out is not None:  # out = local + global, local = 0
                module.local_attn.out.weight.zero_()
                module.local_attn.out.bias.zero_()


def from_whisper(cls, source, **overrides):
    """A Whisper (see read_whisper) -> an Echo of class `cls` that computes its function (eval mode)."""
    weights = read_whisper(source)
    config = build_config(weights, overrides)
    model = cls(config)
    mapping = _check(weights, model, config)
    with torch.no_grad():
        _identity_start(model)
        state = model.state_dict()
        for name, target in mapping.items():
            state[target].copy_(weights.tensors[name])
    _report(model, config, set(mapping.values()))
    model.name_or_path = weights.origin
    return model.eval()


def _report(model: nn.Module, config: EchoConfig, copied: set[str]) -> None:
    """Log which modules the overrides added (they start fresh) and whether the import is still exact."""
    fresh = set()
    for name, module in model.named_modules():
        if isinstance(module, LocalGlobalAttention):
            fresh.add(f"{name}.local_attn")
        elif isinstance(module, ConvAttention):
            fresh.update(f"{name}.{part}" for part in ("conv", "conv_ln", "out_ln"))
    inexact = []
    if config.conv_attention:
        inexact.append("conv_attention mixes a fresh convolution into every encoder block")
    if config.layer_norm != "standard":
        inexact.append(f"layer_norm={config.layer_norm!r} is not Whisper's LayerNorm")
    if config.rope_layout != "interleaved":
        inexact.append(f"rope_layout={config.rope_layout!r} permutes the residual stream")
    if config.positional_norm != "none":
        inexact.append(f"positional_norm={config.positional_norm!r} rescales Whisper's positional tables")
    if fresh:
        logger.warning("Echo.from_whisper: these parts start fresh: %s", ", ".join(sorted(fresh)))
    if inexact:
        logger.warning("Echo.from_whisper: outputs differ from the Whisper's at import: %s",
                       "; ".join(inexact))


# ----------------------------------------------------------------------------------------------
