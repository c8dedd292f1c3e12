"""A full disk as one clear error: what was being written, where, how much it needed, how
much is free, and what is still intact.

Writers check the free space first where they know the size (``check_free_space``), and turn
the ENOSPC / EDQUOT an ``OSError`` carries when the disk fills anyway (another process
writing, a size estimate too small) into the same ``DiskFullError``
(``raise_if_disk_full`` in an ``except OSError`` clause, or the ``disk_full_guard`` context).
Cleaning up what was half written stays the writer's job; the error only says so.

Host-side code only: no tensor library here, so the data and tokenizer packages use it too.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# EDQUOT: a quota, not the disk, is full; the same advice applies. Not defined everywhere.
DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None
)


class DiskFullError(OSError):
    """Not enough space to write something; ``str()`` is the whole message (no "[Errno 28]")
    and ``errno`` is ENOSPC, so code testing for it keeps working."""

    def __init__(
        self,
        message: str,
        what: str,
        directory: Path,
        needed: int | None = None,
        free: int | None = None,
    ) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.what = what
        self.directory = directory
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across processes despite the extra arguments
        return (type(self), (self.message, self.what, self.directory, self.needed, self.free))


def format_bytes(n: int) -> str:
    """Decimal units, as ``df -H`` and disk vendors count: 1 GB = 10^9 bytes."""
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value):,} bytes" if unit == "bytes" else f"{value:.2f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def free_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes free to this user on the file system of ``directory`` (or of its nearest existing
    ancestor, for a directory not created yet)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _message(what: str, directory: Path, needed: int | None, free: int | None, note: str) -> str:
    text = f"No space left on device for {what} in {directory}"
    if needed is not None and free is not None:
        text += f": needs {format_bytes(needed)}, {format_bytes(free)} free"
    elif free is not None:
        text += f" ({format_bytes(free)} free)"
    return f"{text}; {note}" if note else text


def check_free_space(
    directory: str | os.PathLike[str], needed_bytes: int, what: str, note: str = ""
) -> None:
    """Raise DiskFullError before writing ``needed_bytes`` of ``what`` into ``directory`` when
    the file system has less free. ``note`` ends the message (what is still intact)."""
    directory = Path(directory)
    free = free_bytes(directory)
    if free < needed_bytes:
        raise DiskFullError(
            _message(what, directory, needed_bytes, free, note), what, directory, needed_bytes, free
        )


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def raise_if_disk_full(
    err: BaseException,
    what: str,
    directory: str | os.PathLike[str],
    needed_bytes: int | None = None,
    note: str | Callable[[], str] = "",
) -> None:
    """In an ``except`` clause: when ``err`` is ENOSPC/EDQUOT raise DiskFullError in its place
    (``note`` may be a function, called only then, for text read after the cleanup); any other
    error returns, for the caller to re-raise."""
    if isinstance(err, DiskFullError) or not is_disk_full(err):
        return
    directory = Path(directory)
    try:
        free: int | None = free_bytes(directory)
    except OSError:
        free = None
    text = note() if callable(note) else note
    raise DiskFullError(
        _message(what, directory, needed_bytes, free, text), what, directory, needed_bytes, free
    ) from None


@contextmanager
def disk_full_guard(
    what: str,
    directory: str | os.PathLike[str],
    needed_bytes: int | None = None,
    note: str | Callable[[], str] = "",
) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into DiskFullError (see raise_if_disk_full).
    Put it outside the writer's own cleanup so the message is built after the cleanup."""
    try:
        yield
    except OSError as err:
        raise_if_disk_full(err, what, directory, needed_bytes, note)
        raise


__all__ = [
    "DiskFullError",
    "check_free_space",
    "disk_full_guard",
    "format_bytes",
    "free_bytes",
    "is_disk_full",
    "raise_if_disk_full",
]
