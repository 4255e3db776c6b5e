"""Loading never runs code and never reads outside the folder it is given: Whisper files whose pickle
carries code, shard indexes naming files elsewhere, and malformed index or config files are clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig

from echo import Echo
from echo.checkpoint import INDEX
from echo.config import small_config


class Payload:
    """Unpickling this creates `marker`: what a weights file that runs code would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_whisper_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"dims": {}, "model_state_dict": Payload(marker)}, tmp_path / "whisper.pt")
    with pytest.raises(ValueError,
                       match="whisper.pt is not a readable openai-whisper checkpoint .*never code"):
        Echo.from_whisper(tmp_path / "whisper.pt")
    assert not marker.exists()
    torch.load(tmp_path / "whisper.pt", weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


def test_a_hugging_face_bin_that_runs_code_is_refused(tmp_path):
    folder, marker = tmp_path / "whisper", tmp_path / "marker"
    WhisperConfig(d_model=64).save_pretrained(folder)
    torch.save({"model.encoder.conv1.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError,
                       match="pytorch_model.bin is not a readable PyTorch weights file .*never code"):
        Echo.from_whisper(folder)
    assert not marker.exists()


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A sharded Echo folder (several safetensors files and their index)."""
    torch.manual_seed(0)
    folder = tmp_path / "model"
    Echo(small_config()).save_pretrained(folder, max_shard_size="100KB")
    assert len(json.loads((folder / INDEX).read_text())["weight_map"]) > 1
    return folder


def rewrite_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    (folder / INDEX).write_text(json.dumps(change(index)))


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_shard_names_leaving_the_folder_are_refused(sharded, tmp_path, where):
    index = json.loads((sharded / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere" / shard
    outside.parent.mkdir()
    shutil.copy(sharded / shard, outside)  # a real shard: only the name's place is wrong
    name = str(outside) if where == "absolute" else f"../elsewhere/{shard}"
    rewrite_index(sharded, lambda index: {**index, "weight_map": {k: name if v == shard else v
                                                                    for k, v in index["weight_map"].items()}})
    with pytest.raises(ValueError, match=f"shard '{name}' is not a file inside .*relative paths within"):
        Echo.from_pretrained(sharded)


@pytest.mark.parametrize("index, message", [
    ([], "must hold a JSON object, got a JSON array"),
    ({"metadata": {}}, 'needs a "weight_map" object .* got NoneType'),
    ({"weight_map": {"base": 3}}, 'needs a "weight_map" object'),
])
def test_a_malformed_shard_index_is_a_clear_error(sharded, index, message):
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        Echo.from_pretrained(sharded)


def test_an_index_that_is_not_json_is_a_clear_error(sharded):
    (sharded / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        Echo.from_pretrained(sharded)


def test_a_config_that_is_not_a_json_object_is_a_clear_error(sharded):
    (sharded / "config.json").write_text(json.dumps(["model_type", "echo"]))
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got a JSON array"):
        Echo.from_pretrained(sharded)
