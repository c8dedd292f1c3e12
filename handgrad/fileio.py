"""Writing files so that a reader never sees half of one: the one helper every writer uses.

A file is written under a hidden temporary name in the same directory, flushed to disk, then
renamed over the target (``os.replace`` is atomic on POSIX and Windows within one file
system). A crash, a full disk or an exception at any point leaves either the old file or the
new one, never a mix, and no temporary file behind.

Host-side code only: no tensor library here, so the tokenizer and data packages use it too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``.

    ``suffix`` is kept at the end of the temporary name for writers that pick a format by it
    (matplotlib's ``savefig``). On an exception the temporary file is removed and ``path`` is
    untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """JSON with a trailing newline, UTF-8, non-ASCII kept as is."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a new empty directory beside ``path`` (``.tmp-NAME-PID``); on a clean exit its
    contents are flushed and it is renamed to ``path``, else it is deleted. A reader sees the
    old directory or the complete new one, never a half-written one.

    ``path`` must be absent or an empty directory, unless ``replace``: then an existing one is
    renamed aside, the new one renamed in, and the old one deleted."""
    path = Path(path)
    if path.exists() and not replace and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    if tmp.exists():  # left by an earlier process with this pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        old = None
        if path.is_dir() and any(path.iterdir()):
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.rename(path, old)
        elif path.exists():
            path.rmdir()
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    if not path.exists():
        return
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
