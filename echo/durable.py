"""Files and folders replaced so that a crash at any moment leaves the old version or the new one, never a
mix: the new version is written beside the target under a temporary name, fsynced, renamed over it, and
the folder holding it fsynced so that the rename itself survives a power cut.

No write follows a symbolic link: temporaries are created exclusively (whatever stood at their name, a
link included, is removed first, never written through), and rename replaces a link at the target itself,
not the file it points to. So a link planted in an output folder cannot redirect a write outside it."""

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


def remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder with all it holds; nothing if absent."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):  # a fifo, socket or device node
        path.unlink()


def create_exclusive(path: Path) -> BinaryIO:
    """A new empty file at `path` open for binary writing; whatever was there (a file left by a killed
    write, or a link) is removed first, and O_EXCL | O_NOFOLLOW make sure the file opened is the one
    created here, not a link's target."""
    path = Path(path)
    remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "wb")


def open_append(path: Path):
    """`path` open for appending text, created if absent; a link there is an OSError (O_NOFOLLOW)
    rather than a write into the file it points to."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if path.is_symlink():
            raise OSError(f"{path} is a symbolic link; it is written only as a regular file in its own "
                          "folder (remove the link)") from error
        raise
    return os.fdopen(fd, "a")


def write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(f) to temporary(path) (created exclusively), flushed and fsynced, then renamed over `path`."""
    path = Path(path)
    tmp = temporary(path)
    with create_exclusive(tmp) as f:
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
    (to folder.old) and removed once the new one is in place; recover() finishes a swap cut short. A link
    at `folder` is replaced like a folder, its target left alone. A file at `folder` is a
    NotADirectoryError before anything is written.
    """
    folder = Path(folder)
    if os.path.lexists(folder) and not (folder.is_symlink() or folder.is_dir()):
        raise NotADirectoryError(f"{folder} is a file, not a folder: it cannot be replaced by a folder "
                                 "(move or remove it)")
    recover(folder)
    tmp = temporary(folder)
    remove(tmp)
    tmp.mkdir()  # fails if anything appeared at tmp since: never writes into what someone else put there
    write(tmp)
    for root, _, files in os.walk(tmp):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    old = aside(folder)
    if os.path.lexists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_path(folder.parent)
    remove(old)


def recover(path: Path) -> None:
    """Clear what a killed write_file / write_folder of `path` left behind: its temporary file or folder is
    removed; a folder (or link) renamed aside whose replacement never arrived is put back. Links are
    removed or renamed as links, never followed."""
    path = Path(path)
    tmp, old = temporary(path), aside(path)
    if not (os.path.lexists(tmp) or os.path.lexists(old)):
        return
    remove(tmp)
    if os.path.lexists(old) and os.path.lexists(path):
        remove(old)
    elif os.path.lexists(old):
        os.replace(old, path)
    fsync_path(path.parent)
