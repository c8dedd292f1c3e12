"""Prepared data records each shard's sha256; `handgrad verify` checks them; a full disk during
`data prepare` is one clear error and leaves the previous output as it was."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
from pathlib import Path

import pytest

from handgrad.cli import main
from handgrad.data import load_split, prepare
from handgrad.diskspace import DiskFullError

# the module, not the function handgrad.data exports under the same name
prepare_module = importlib.import_module("handgrad.data.prepare")
TEXT = "It was the best of times, it was the worst of times; it was the age of wisdom.\n" * 50


@pytest.fixture
def prepared(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "data"
    prepare(str(tmp_path / "corpus.txt"), "char", out, val_fraction=0.2, workers=1, progress=False)
    return out


def test_meta_records_each_shards_sha256(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    for split in ("train", "val"):
        info = meta["splits"][split]
        data = (prepared / info["file"]).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["bytes"] == len(data) > 0


def test_verify_data_directory(prepared, capsys):
    assert main(["verify", str(prepared)]) == 0
    out = capsys.readouterr().out
    assert f"prepared data {prepared}" in out
    for name in ("meta.json", "tokenizer.json", "train.bin", "val.bin"):
        (line,) = [x for x in out.splitlines() if x.split()[1:2] == [name]]
        assert line.split()[0] == "OK"
        assert f"{(prepared / name).stat().st_size:,} bytes" in line
    assert out.strip().endswith("all OK")


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "tokenizer.json"])
def test_verify_finds_a_flipped_bit(prepared, name, capsys):
    path = prepared / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    assert main(["verify", str(prepared)]) == 1
    out = capsys.readouterr().out
    (failed,) = [x for x in out.splitlines() if x.split()[0] == "FAILED"]
    assert name in failed and "sha256" in failed
    # the cheap check at load time sees sizes only: a same-size flip passes it
    if name.endswith(".bin"):
        assert len(load_split(prepared, name.removesuffix(".bin"))) > 0


def test_truncated_shard_refused_at_load_and_by_verify(prepared, capsys):
    path = prepared / "val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"val\.bin is .* bytes but meta.json expects"):
        load_split(prepared, "val")
    assert main(["verify", str(prepared)]) == 1
    (failed,) = [x for x in capsys.readouterr().out.splitlines() if x.split()[0] == "FAILED"]
    assert "val.bin" in failed and "meta.json records" in failed


def test_older_meta_without_hashes_checks_sizes(prepared, capsys):
    meta = json.loads((prepared / "meta.json").read_text())
    for info in meta["splits"].values():
        del info["sha256"]
    (prepared / "meta.json").write_text(json.dumps(meta))
    assert main(["verify", str(prepared)]) == 0
    out = capsys.readouterr().out
    assert out.count("size only (no sha256 in meta.json)") == 2


def _fill_disk_after(monkeypatch, n_chunks: int) -> None:
    """The disk fills up after `n_chunks` chunks were written."""
    real = prepare_module.encode_all

    def full(*args):
        for i, item in enumerate(real(*args)):
            if i == n_chunks:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield item

    monkeypatch.setattr(prepare_module, "encode_all", full)


def _prepare(src, out, **kw):
    return prepare(str(src), "char", out, workers=1, progress=False, chunk_chars=200, **kw)


def test_full_disk_keeps_the_work_done_and_resumes(prepared, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"  # the source of `prepared`: one document, split by position
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": f"doc {i} {TEXT[: i * 7]}"}) + "\n" for i in range(60))
    )
    reference = _prepare(docs, tmp_path / "reference", checkpoint_seconds=0)
    out = tmp_path / "out"
    _fill_disk_after(monkeypatch, 3)
    with pytest.raises(DiskFullError) as info:
        _prepare(docs, out, checkpoint_seconds=0)
    message = str(info.value)
    assert message.startswith(f"No space left on device for token shards in {out}")
    assert " free" in message and "run the same command to resume" in message
    assert (out / "progress.json").is_file() and not (out / "meta.json").exists()
    monkeypatch.undo()
    assert _prepare(docs, out) == {**reference, "preparation": reference["preparation"]}
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert corpus.is_file() and (prepared / "meta.json").is_file()


def test_full_disk_cli_message(tmp_path, monkeypatch, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "new"
    _fill_disk_after(monkeypatch, 0)
    argv = ["data", "prepare", "--source", str(tmp_path / "corpus.txt"), "--tokenizer", "char"]
    assert main([*argv, "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"handgrad data prepare: error: No space left on device for token shards in {out}"
    )
    assert "nothing was written" in err
    assert "Traceback" not in err and "Errno" not in err
    assert not out.exists()  # a failed start leaves no directory behind
