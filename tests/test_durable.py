"""echo.durable: a file or folder is replaced whole or not at all, and recover() clears what a write cut
short leaves behind (the kill itself is exercised on real training runs in test_train_crash.py)."""

from __future__ import annotations

import pytest

from echo import durable


class Killed(Exception):
    pass


def die(*_):
    raise Killed


def test_write_file_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "state.bin"
    durable.write_text(path, "old")
    durable.temporary(path).write_text("left by a killed save")
    durable.write_file(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_a_file_write_cut_short_keeps_the_old_version(tmp_path):
    path = tmp_path / "state.bin"
    durable.write_text(path, "old")
    with pytest.raises(Killed):
        durable.write_file(path, lambda f: (f.write(b"half"), die()))
    assert path.read_text() == "old"
    assert durable.temporary(path).read_text() == "half"
    durable.recover(path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def _write_model(text: str):
    def write(folder):
        (folder / "weights").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "config").write_text(text + " config")
    return write


def test_write_folder_replaces_the_folder_whole(tmp_path):
    folder = tmp_path / "model"
    durable.write_folder(folder, _write_model("old"))
    (folder / "only in old").write_text("x")
    durable.write_folder(folder, _write_model("new"))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["sub", "sub/config", "weights"]
    assert (folder / "weights").read_text() == "new"
    assert (folder / "sub" / "config").read_text() == "new config"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_folder_write_cut_short_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "model"
    durable.write_folder(folder, _write_model("old"))
    with pytest.raises(Killed):
        durable.write_folder(folder, lambda tmp: ((tmp / "weights").write_text("half"), die()))
    assert (folder / "weights").read_text() == "old"
    durable.recover(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (folder / "weights").read_text() == "old"


def _folders(tmp_path, **texts) -> None:
    for name, text in texts.items():
        (tmp_path / name).mkdir()
        _write_model(text)(tmp_path / name)


def test_recover_puts_back_a_folder_renamed_aside_whose_replacement_never_arrived(tmp_path):
    folder = tmp_path / "model"
    _folders(tmp_path, **{durable.aside(folder).name: "old", durable.temporary(folder).name: "new"})
    durable.recover(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (folder / "weights").read_text() == "old"


def test_recover_drops_a_folder_renamed_aside_once_replaced(tmp_path):
    folder = tmp_path / "model"
    _folders(tmp_path, **{durable.aside(folder).name: "old", "model": "new"})
    durable.recover(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (folder / "weights").read_text() == "new"
