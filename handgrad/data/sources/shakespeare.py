"""Tiny Shakespeare: a local copy, the cache, or a download, each checked by sha256."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from handgrad.data.sources.base import cache_dir
from handgrad.fileio import atomic_path
from handgrad.manifest import hash_file

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"

REPO_ROOT = Path(__file__).resolve().parents[3]


def local_shakespeare_candidates() -> list[Path]:
    """Shared copies that may already be on this machine (tried before the cache)."""
    rel = Path("..") / "shared" / "data" / SHAKESPEARE_FILE
    return [(Path.cwd() / rel).resolve(), (REPO_ROOT / rel).resolve()]


def shakespeare_path() -> Path:
    """Path to a verified copy of tiny Shakespeare, downloading it into the cache if needed.

    Order: $HANDGRAD_SHAKESPEARE (must match the sha256), ../shared/data relative to the current
    directory or the repo, the cache, then the canonical URL.
    """
    explicit = os.environ.get("HANDGRAD_SHAKESPEARE")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"HANDGRAD_SHAKESPEARE={explicit}: no such file")
        _check_shakespeare(path)
        return path
    for path in [*local_shakespeare_candidates(), cache_dir() / SHAKESPEARE_FILE]:
        if path.is_file() and hash_file(path, "sha256") == SHAKESPEARE_SHA256:
            return path
    return _download_shakespeare(cache_dir() / SHAKESPEARE_FILE)


def _check_shakespeare(path: Path) -> None:
    sha = hash_file(path, "sha256")
    if sha != SHAKESPEARE_SHA256:
        raise ValueError(
            f"{path}: sha256 {sha} does not match tiny Shakespeare's {SHAKESPEARE_SHA256}; "
            "to use other text, pass it with --source path/to/file.txt"
        )


def _download_shakespeare(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp:  # checked before it takes the real name
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
                tmp.write_bytes(response.read())
            _check_shakespeare(tmp)
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(
            f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({e}). Without network, "
            "pass a local copy: `handgrad data prepare --source path/to/input.txt ...`, or set "
            f"HANDGRAD_SHAKESPEARE=path/to/input.txt (sha256 {SHAKESPEARE_SHA256})"
        ) from e
    return dest
