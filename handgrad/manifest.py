"""Manifests: the size and sha256 of every file of a directory, so a damaged file is refused.

A checkpoint, an exported model or any other directory whose files must not change after they
are written carries ``manifest.json``::

    {"format_version": 1, "algorithm": "sha256",
     "files": [{"name": "model.safetensors", "size": 497759232, "sha256": "3b1f..."}, ...]}

It is written last, after every file it lists, so a directory with a manifest is complete.
Reading a file back checks its size (a stat, free) and then its hash (one streamed read): a
truncated, emptied, overwritten or bit-flipped file is refused with an error that names it,
instead of training or sampling on with a wrong weight.

sha256 rather than blake2b: with the SHA extensions of current x86 and ARM CPUs (which
OpenSSL, behind ``hashlib``, uses) sha256 streams at about 1.4 GB/s here against 0.3-0.4 GB/s
for blake2b; both are far beyond what an accidental change could collide with.

Host-side code only: no tensor library here, so the data and tokenizer packages use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from handgrad.fileio import fsync_dir, write_json_atomic

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
ALGORITHM = "sha256"
# Large reads keep the per-call overhead negligible; 4 MiB is past the point where the hash,
# not the read, is the limit.
CHUNK_BYTES = 4 << 20


class ManifestError(ValueError):
    """A file that does not match its directory's manifest (missing, resized or changed), or
    a manifest that cannot be read; the message names the file and what differed."""


class UnverifiedWarning(UserWarning):
    """A directory loaded without a manifest to check its files against."""


def hash_file(path: str | os.PathLike[str], algorithm: str = ALGORITHM) -> str:
    """Hex digest of a file's bytes, streamed in ``CHUNK_BYTES`` reads (constant memory)."""
    digest = hashlib.new(algorithm)
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _check_name(name: Any, where: Path) -> str:
    """A manifest entry must be a plain relative path inside its directory."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: file name {name!r} is not a non-empty string")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise ManifestError(f"{where}: file name {name!r} is not a path inside the directory")
    return name


def write_manifest(directory: str | os.PathLike[str], files: Iterable[str] | None = None) -> Path:
    """Hash ``files`` (names relative to ``directory``; default: every visible regular file in
    it) and write ``directory/manifest.json``. Call it after the last of those files is
    written and before the directory is published. Returns the manifest's path."""
    directory = Path(directory)
    if files is None:
        files = sorted(
            p.name
            for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_FILE
        )
    entries = []
    for name in files:
        path = directory / _check_name(name, directory / MANIFEST_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: cannot list it in {MANIFEST_FILE}: no such file")
        entries.append(
            {"name": name, "size": path.stat().st_size, ALGORITHM: hash_file(path, ALGORITHM)}
        )
    out = directory / MANIFEST_FILE
    write_json_atomic(
        out, {"format_version": FORMAT_VERSION, "algorithm": ALGORITHM, "files": entries}
    )
    fsync_dir(directory)
    return out


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``directory/manifest.json`` checked for shape, or None when there is none."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); the manifest is damaged") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ManifestError(f'{path}: not a manifest (no "files" list)')
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest.get('format_version')!r}, this handgrad reads "
            f"{FORMAT_VERSION}"
        )
    algorithm = manifest.get("algorithm")
    if algorithm not in hashlib.algorithms_available:
        raise ManifestError(f"{path}: unknown hash algorithm {algorithm!r}")
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: entry {entry!r} is not an object")
        _check_name(entry.get("name"), path)
        if not isinstance(entry.get("size"), int) or not isinstance(entry.get(algorithm), str):
            raise ManifestError(f"{path}: entry {entry['name']!r} lacks size or {algorithm}")
    return manifest


@dataclass
class FileCheck:
    """The outcome of checking one file: ``problem`` is None when it matched."""

    name: str
    path: Path
    size: int | None  # on disk; None when missing
    expected_size: int
    problem: str | None = None
    hashed: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_files(
    directory: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    hashes: bool = True,
    manifest: dict[str, Any] | None = None,
) -> list[FileCheck]:
    """Check the files of ``directory`` against its manifest without raising on a mismatch:
    one FileCheck per entry (only those named in ``names``, when given). Sizes are checked
    first for every file; hashes (when ``hashes``) only for files of the right size. Raises
    ManifestError when there is no readable manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    if manifest is None:
        raise ManifestError(f"{directory}: no {MANIFEST_FILE} to check the files against")
    algorithm = manifest["algorithm"]
    wanted = None if names is None else set(names)
    pairs: list[tuple[FileCheck, dict[str, Any]]] = []
    for entry in manifest["files"]:
        name = entry["name"]
        if wanted is not None and name not in wanted:
            continue
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        check = FileCheck(name, path, size, entry["size"])
        if size is None:
            check.problem = f"missing (listed in {directory / MANIFEST_FILE})"
        elif size != entry["size"]:
            check.problem = (
                f"{size:,} bytes but {MANIFEST_FILE} records {entry['size']:,}: the file is "
                "truncated or corrupt"
            )
        pairs.append((check, entry))
    if hashes:
        for check, entry in pairs:
            if not check.ok:
                continue
            actual = hash_file(check.path, algorithm)
            check.hashed = True
            if actual != entry[algorithm]:
                check.problem = (
                    f"{algorithm} {actual[:16]}... differs from the {entry[algorithm][:16]}... "
                    f"that {MANIFEST_FILE} records: the file is damaged or was changed after "
                    "it was written"
                )
    return [check for check, _ in pairs]


def verify_manifest(
    directory: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    hashes: bool = True,
    missing_ok: bool = False,
) -> list[FileCheck]:
    """Refuse ``directory`` unless every file its manifest lists (or the ones of ``names``
    among them) has the recorded size and hash: raises ManifestError naming each file that
    differs and how. A directory without a manifest raises too, unless ``missing_ok``: then
    it only warns (UnverifiedWarning; directories written before manifests existed) and
    returns []."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if not missing_ok:
            raise ManifestError(f"{directory}: no {MANIFEST_FILE}; its files cannot be verified")
        warn_unverified(directory)
        return []
    checks = check_files(directory, names, hashes, manifest)
    failed = [c for c in checks if not c.ok]
    if failed:
        lines = [f"{c.path}: {c.problem}" for c in failed]
        if len(lines) > 1:
            lines.insert(0, f"{len(lines)} files of {directory} differ from its {MANIFEST_FILE}:")
        raise ManifestError("\n  ".join(lines))
    return checks


def warn_unverified(directory: Path) -> None:
    warnings.warn(
        UnverifiedWarning(
            f"{directory}: no {MANIFEST_FILE} (written by an older handgrad); loading it "
            "without checking its files"
        ),
        stacklevel=3,
    )


__all__ = [
    "ALGORITHM",
    "MANIFEST_FILE",
    "FileCheck",
    "ManifestError",
    "UnverifiedWarning",
    "check_files",
    "hash_file",
    "read_manifest",
    "verify_manifest",
    "write_manifest",
]
