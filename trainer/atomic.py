"""Writing a user's file so that a crash, a full disk or a killed process never leaves half of it.

The new content goes to a temporary file in the same folder (a rename is atomic only within one file system),
is flushed to the disk (fsync), then renamed over the old file; the folder is flushed too where the OS allows,
so the rename itself survives a power cut. Any failure removes the temporary file and leaves the old file as it
was. Every writer of user files (exports, checkpoints, configs, captions, uploads, images) goes through here.
"""
from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows flushes only a handle opened for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in this folder durable; Windows has no such call (NTFS journals it)."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden name beside `path`, unique per process and call: several processes may write the same file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to (by any writer: save_file, PIL, shutil);
    on a clean exit it replaces `path`, on an exception it is deleted and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no stray temporary file
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
