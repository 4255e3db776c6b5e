"""Files and folders replaced so that a crash at any moment leaves the old version or the new one, never a
mix: the new version is written beside the target under a temporary name, fsynced, renamed over it, and
the folder holding it fsynced so that the rename itself survives a power cut."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


def temporary(path: Path) -> Path:
    """Where the next version of `path` is written: the same folder, as rename is atomic only within one."""
    return path.with_name(path.name + ".tmp")


def aside(folder: Path) -> Path:
    """Where write_folder moves the folder it replaces until the new one is in place."""
    return folder.with_name(folder.name + ".old")


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (the names created, renamed or removed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(f) to temporary(path), flushed and fsynced, then renamed over `path`."""
    path = Path(path)
    tmp = temporary(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda f: f.write(text.encode()))


def write_folder(folder: Path, write: Callable[[Path], object]) -> None:
    """write(a fresh folder temporary(folder)), every file in it fsynced, then put in place of `folder`.

    rename cannot replace a folder that holds files, so an existing `folder` is first renamed aside
    (to folder.old) and removed once the new one is in place; recover() finishes a swap cut short.
    """
    folder = Path(folder)
    recover(folder)
    tmp = temporary(folder)
    tmp.mkdir()
    write(tmp)
    for root, _, files in os.walk(tmp):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    old = aside(folder)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_path(folder.parent)
    if old.exists():
        shutil.rmtree(old)


def recover(path: Path) -> None:
    """Clear what a killed write_file / write_folder of `path` left behind: its temporary file or folder is
    removed; a folder renamed aside whose replacement never arrived is put back."""
    path = Path(path)
    tmp, old = temporary(path), aside(path)
    if not (tmp.exists() or old.exists()):
        return
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    if old.exists() and path.exists():
        shutil.rmtree(old)
    elif old.exists():
        os.replace(old, path)
    fsync_path(path.parent)
