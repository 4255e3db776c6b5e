"""Loading an Echo folder: config.json plus model.safetensors (or a sharded index), checked in full
before a single tensor is copied into the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import EchoConfig, config_object, to_echo_config

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _read_config(folder: Path) -> dict:
    """config.json as a dict, checked to be an Echo's (model_type "echo")."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not an Echo checkpoint: it has no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    raw = config_object(raw, path)
    if raw.get("model_type") != "echo":
        raise ValueError(f"{folder} is not an Echo checkpoint: config.json has model_type {raw.get('model_type')!r}, "
                         "expected 'echo'")
    raw.pop("transformers_version", None)
    return raw


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{folder}: shard(s) named in {INDEX} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    raise ValueError(f"{folder} is not an Echo checkpoint: it has neither {WEIGHTS} nor {INDEX}")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ValueError(f"{folder}: tensor {key!r} appears in more than one shard")
                    tensors[key] = f.get_tensor(key)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    return tensors


def load_checkpoint(cls, source, *, config=None, dtype=None):
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"{source!r} is not a local folder; Echo loads checkpoints written by save_pretrained")
    saved_config = _read_config(folder)
    # from_dict reads a config saved before a key existed as what that model computed
    config = EchoConfig.from_dict(saved_config) if config is None else to_echo_config(config)
    tensors = read_tensors(folder)

    model = cls(config)
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    for key in sorted(set(expected) & set(tensors)):
        want, got = expected[key], tensors[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, the config needs {tuple(want.shape)}")
        elif want.is_floating_point() != got.is_floating_point():
            problems.append(f"{key} has dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise ValueError(f"{folder} does not match its Echo config: " + "; ".join(problems))

    # keep every saved value bit for bit: cast the model to the stored dtypes before copying
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if value.dtype != tensors[key].dtype:
                value.data = value.data.to(tensors[key].dtype)
    model.load_state_dict(tensors, strict=True)
    if dtype is not None and dtype != "auto":
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.name_or_path = str(source)
    model.eval()
    return model
