"""manifest.json: sizes and sha256 recorded last, every kind of damage refused by name."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import pytest

from handgrad.manifest import (
    MANIFEST_FILE,
    ManifestError,
    UnverifiedWarning,
    check_files,
    hash_file,
    read_manifest,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (d / "config.json").write_text('{"a": 1}\n')
    (d / ".hidden.tmp").write_text("a leftover temp file is not part of the directory")
    return d


def test_manifest_records_size_and_sha256(directory):
    path = write_manifest(directory)
    assert path == directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    assert manifest["format_version"] == 1 and manifest["algorithm"] == "sha256"
    entries = {e["name"]: e for e in manifest["files"]}
    assert set(entries) == {"weights.bin", "config.json"}  # no hidden file, not itself
    for name, entry in entries.items():
        data = (directory / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    checks = verify_manifest(directory)
    assert {c.name for c in checks} == {"weights.bin", "config.json"}
    assert all(c.ok and c.hashed for c in checks)
    assert not [p for p in directory.iterdir() if p.name.startswith(".manifest")]


def test_hash_file_streams_larger_than_a_chunk(tmp_path):
    data = os.urandom((4 << 20) * 2 + 12345)
    (tmp_path / "big").write_bytes(data)
    assert hash_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    assert hash_file(tmp_path / "big", "blake2b") == hashlib.blake2b(data).hexdigest()


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "bit near the start": lambda p: _flip(p, 3),
    "bit in the middle": lambda p: _flip(p, p.stat().st_size // 2),
    "random bytes": lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
    "empty": lambda p: p.write_bytes(b""),
    "grown": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ["weights.bin", "config.json"])
def test_every_damage_is_refused_naming_the_file(directory, name, damage):
    write_manifest(directory)
    DAMAGE[damage](directory / name)
    with pytest.raises(ManifestError) as info:
        verify_manifest(directory)
    message = str(info.value)
    assert str(directory / name) in message
    other = "config.json" if name == "weights.bin" else "weights.bin"
    assert str(directory / other) not in message
    if damage in ("truncated", "empty", "grown"):
        assert "bytes but manifest.json records" in message
    else:
        assert "sha256" in message and "damaged" in message


def test_missing_file_and_several_failures_are_all_named(directory):
    write_manifest(directory)
    (directory / "config.json").unlink()
    _flip(directory / "weights.bin", 1000)
    with pytest.raises(ManifestError) as info:
        verify_manifest(directory)
    message = str(info.value)
    assert "2 files" in message
    assert f"{directory / 'config.json'}: missing" in message
    assert f"{directory / 'weights.bin'}: sha256" in message


def test_names_restrict_the_check_and_sizes_only_skips_hashes(directory):
    write_manifest(directory)
    _flip(directory / "weights.bin", 10)
    assert [c.name for c in verify_manifest(directory, names=["config.json"])] == ["config.json"]
    checks = verify_manifest(directory, hashes=False)  # same size: only a hash sees a flip
    assert all(c.ok and not c.hashed for c in checks)
    (failed,) = [c for c in check_files(directory) if not c.ok]
    assert failed.name == "weights.bin" and failed.size == failed.expected_size


def test_no_manifest_refused_or_warned_once(directory):
    with pytest.raises(ManifestError, match="no manifest.json"):
        verify_manifest(directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert verify_manifest(directory, missing_ok=True) == []
    assert len(caught) == 1 and caught[0].category is UnverifiedWarning
    assert str(directory) in str(caught[0].message) and "\n" not in str(caught[0].message)
    assert read_manifest(directory) is None


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "not valid JSON"),
        ("[1, 2]", "not a manifest"),
        ('{"format_version": 9, "algorithm": "sha256", "files": []}', "format_version 9"),
        ('{"format_version": 1, "algorithm": "rot13", "files": []}', "unknown hash algorithm"),
        ('{"format_version": 1, "algorithm": "sha256", "files": [{"name": "x"}]}', "lacks size"),
        (
            '{"format_version": 1, "algorithm": "sha256", '
            '"files": [{"name": "../x", "size": 1, "sha256": "00"}]}',
            "not a path inside",
        ),
    ],
)
def test_bad_manifest_refused(directory, text, problem):
    (directory / MANIFEST_FILE).write_text(text)
    with pytest.raises(ManifestError, match=problem) as info:
        verify_manifest(directory, missing_ok=True)
    assert str(directory / MANIFEST_FILE) in str(info.value)


def test_listing_a_missing_file_is_an_error(directory):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        write_manifest(directory, ["weights.bin", "nope.bin"])
    assert not (directory / MANIFEST_FILE).exists()
