"""Loading an Echo folder: config.json plus model.safetensors (or a sharded index), checked in full
before a single tensor is copied into the model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .config import EchoConfig, read_json_object, to_echo_config

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def load_weights_only(path: Path, what: str):
    """torch.load of tensors, containers, numbers and strings only (weights_only: a pickle that would run
    code, or build any other object, is refused); an unreadable file is a ValueError naming `what` it
    should be."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated, foreign or code-carrying file: torch raises several kinds
        raise ValueError(f"{path} is not a readable {what} (only tensors, containers, numbers and strings "
                         f"are loaded, never code): {error}") from None


def _read_config(folder: Path) -> dict:
    """config.json as a dict, checked to be an Echo's (model_type "echo")."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not an Echo checkpoint: it has no config.json")
    raw = read_json_object(path)
    if raw.get("model_type") != "echo":
        raise ValueError(f"{folder} is not an Echo checkpoint: config.json has model_type "
                         f"{raw.get('model_type')!r}, expected 'echo'")
    raw.pop("transformers_version", None)
    return raw


def _shard_names(folder: Path) -> list[str]:
    """The shard file names of `folder`'s INDEX, each checked to name a file inside `folder`: an absolute
    path or a `..` is a ValueError, so an index cannot point a load at files elsewhere. (Shards that are
    links are followed: Hugging Face's cache links every snapshot file to its blob store.)"""
    path = folder / INDEX
    index = read_json_object(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path} needs a \"weight_map\" object of tensor name -> shard file name, "
                         f"got {type(weight_map).__name__}")
    names = sorted(set(weight_map.values()))
    for name in names:
        shard = Path(name)
        if not name or shard.is_absolute() or ".." in shard.parts:
            raise ValueError(f"{path}: shard {name!r} is not a file inside {folder}; shard names must be "
                             "relative paths within the checkpoint folder")
    return names


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / INDEX).is_file():
        names = _shard_names(folder)
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
        raise ValueError(f"{source!r} is not a local folder; Echo loads checkpoints written by "
                         f"save_pretrained")
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
        problems.append(f"unexpected tensors: "
                        f"{', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
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
