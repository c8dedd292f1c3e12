"""A checkpoint that does not fit: one DiskFullError naming the checkpoint, the directory, the
space needed and free and the checkpoint still `latest`; nothing half written is left."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from handgrad import diskspace
from handgrad.cli import main
from handgrad.diskspace import DiskFullError
from handgrad.manifest import verify_manifest
from handgrad.serialization import save_file as real_save_file
from handgrad.train import checkpointing as ckpt_module
from handgrad.train import train
from handgrad.train.config import from_dict

Usage = namedtuple("Usage", "total used free")
PREVIOUS = "checkpoints/step_0000004"


def run(cfg_dict, out, resume=None):
    return train(from_dict(cfg_dict), out, resume=resume, progress=False, log=lambda m: None)


@pytest.fixture
def four_steps(tiny, tmp_path) -> Path:
    out = tmp_path / "run"
    run(tiny(train={"max_steps": 4, "checkpoint_interval": 2}), out)
    assert (out / "latest").read_text().strip() == PREVIOUS
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in (out / "checkpoints").rglob("*")
        if p.is_file()
    }


def _assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    assert (out / "latest").read_text().strip() == PREVIOUS
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000002",
        "step_0000004",
    ]
    assert _snapshot(out) == before  # no byte of the previous checkpoints changed
    verify_manifest(out / PREVIOUS)  # and what latest names is complete and intact
    hidden = [p for p in out.rglob(".*")]
    assert not hidden, hidden  # no temporary file or directory left anywhere


def _check_message(e: DiskFullError, out: Path) -> None:
    message = str(e)
    assert message.startswith(
        f"No space left on device for checkpoint checkpoints/step_0000006 in {out / 'checkpoints'}"
    )
    assert f"{out / 'latest'} still names {PREVIOUS}, which is unchanged" in message
    assert "nothing was written" in message
    assert "Errno" not in message
    # what a checkpoint of this model needs: at least its two safetensors files
    files = [out / PREVIOUS / "model.safetensors", out / PREVIOUS / "optimizer.safetensors"]
    assert e.needed >= sum(p.stat().st_size for p in files)
    assert f"needs {diskspace.format_bytes(e.needed)}, " in message


def test_enospc_midway_through_a_file(tiny, four_steps, monkeypatch):
    out = four_steps
    before = _snapshot(out)
    calls = []

    def fills_the_disk(tensors, path, metadata=None):
        calls.append(Path(path).name)
        if len(calls) == 2:  # optimizer.safetensors: half of it lands, then the disk is full
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, metadata)

    monkeypatch.setattr(ckpt_module, "save_file", fills_the_disk)
    with pytest.raises(DiskFullError) as info:
        run(tiny(train={"max_steps": 8, "checkpoint_interval": 2}), out, resume=out)
    assert calls == ["model.safetensors", "optimizer.safetensors"]
    _check_message(info.value, out)
    assert info.value.free is not None and f"{diskspace.format_bytes(info.value.free)} free" in str(
        info.value
    )
    _assert_untouched(out, before)


def test_too_little_free_space_is_refused_before_writing(tiny, four_steps, monkeypatch):
    out = four_steps
    before = _snapshot(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 123, 123))
    monkeypatch.setattr(
        ckpt_module, "save_file", lambda *a, **k: pytest.fail("wrote despite no space")
    )
    with pytest.raises(DiskFullError) as info:
        run(tiny(train={"max_steps": 6}), out, resume=out)
    _check_message(info.value, out)
    assert info.value.free == 123 and "123 bytes free" in str(info.value)
    _assert_untouched(out, before)


def test_enospc_while_publishing_latest(tiny, four_steps, monkeypatch):
    out = four_steps
    before = _snapshot(out)

    def full(run_dir, target):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(ckpt_module, "write_latest", full)
    with pytest.raises(DiskFullError) as info:
        run(tiny(train={"max_steps": 6}), out, resume=out)
    _check_message(info.value, out)
    _assert_untouched(out, before)  # the complete but unpublished step 6 was removed too


def test_first_checkpoint_of_a_run(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))
    with pytest.raises(DiskFullError, match="the run has no complete checkpoint yet"):
        run(tiny(train={"max_steps": 2}), out)
    assert not (out / "latest").exists()
    assert not list((out / "checkpoints").iterdir())


def test_train_cli_prints_one_line(tiny, four_steps, monkeypatch, capsys):
    out = four_steps
    before = _snapshot(out)
    real_copy = shutil.copyfile

    def full_on_tokenizer_copy(src, dst, *a, **k):
        if Path(dst).name == "tokenizer.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(ckpt_module.shutil, "copyfile", full_on_tokenizer_copy)
    argv = ["train", "--resume", str(out), "--set", "train.max_steps=6", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert line.startswith("handgrad train: error: No space left on device for checkpoint ")
    assert f"still names {PREVIOUS}" in line and "Traceback" not in err
    _assert_untouched(out, before)
