"""Exports carry a manifest and come only from intact checkpoints; `export hf` and `report`
turn a full disk into one clear error and leave nothing half written."""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from collections import namedtuple
from pathlib import Path

import pytest

from handgrad.cli import main
from handgrad.diskspace import DiskFullError
from handgrad.eval import hf as hf_module
from handgrad.eval import report as report_module
from handgrad.eval.hf import export_hf, import_hf
from handgrad.manifest import MANIFEST_FILE, ManifestError, verify_manifest, write_manifest

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """The shared tiny run, its checkpoint given a manifest as the trainer writes one."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    write_manifest(out / (out / "latest").read_text().strip())
    records = [
        {"step": 0, "tokens": 0, "val_loss": 5.0},
        {"step": 1, "tokens": 64, "val_loss": 4.0},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def _no_leftovers(parent: Path) -> None:
    hidden = [p for p in parent.rglob(".*")]
    assert not hidden, hidden


def test_export_has_a_manifest_that_verify_checks(hf_dir, capsys):
    checks = verify_manifest(hf_dir)
    expected = {p.name for p in hf_dir.iterdir()} - {MANIFEST_FILE}
    assert {c.name for c in checks} == expected and "model.safetensors" in expected
    assert main(["verify", str(hf_dir)]) == 0
    out = capsys.readouterr().out
    assert f"exported model {hf_dir}" in out and out.strip().endswith("all OK")


def test_damaged_export_is_reported(hf_dir, tmp_path, capsys):
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x80
    path.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    (failed,) = [x for x in capsys.readouterr().out.splitlines() if x.split()[0] == "FAILED"]
    assert "model.safetensors" in failed and "sha256" in failed


def test_imported_run_has_a_manifest(hf_dir, tmp_path):
    run = import_hf(hf_dir, tmp_path / "imported")
    ckpt = run / (run / "latest").read_text().strip()
    names = {c.name for c in verify_manifest(ckpt)}
    assert names == {"model.safetensors", "config.json", "tokenizer.json"}


def test_export_refuses_a_damaged_checkpoint(run_copy, tmp_path, capsys):
    ckpt = run_copy / (run_copy / "latest").read_text().strip()
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ManifestError, match=r"model\.safetensors: sha256"):
        export_hf(run_copy, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    argv = ["export", "hf", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("handgrad export: error: ") and str(weights) in err
    assert "Traceback" not in err


def test_export_checks_free_space_first(run_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 500, 500))
    monkeypatch.setattr(hf_module, "save_file", lambda *a, **k: pytest.fail("wrote anyway"))
    out = tmp_path / "exports" / "hf"
    with pytest.raises(DiskFullError) as info:
        export_hf(run_copy, out)
    message = str(info.value)
    assert message.startswith(f"No space left on device for the Hugging Face export {out} in ")
    weights = (run_copy / "checkpoints/step_0000001/model.safetensors").stat().st_size
    assert info.value.needed >= weights // 2  # float32 weights, padding rows dropped
    assert "500 bytes free" in message
    assert not out.exists()


def test_export_enospc_midway_leaves_nothing(run_copy, tmp_path, monkeypatch, capsys):
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 64)  # part of it landed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_module, "save_file", full)
    out = tmp_path / "exports" / "hf"
    with pytest.raises(DiskFullError, match=f"the Hugging Face export {out} in {out.parent}"):
        export_hf(run_copy, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary sibling either
    argv = ["export", "hf", "--checkpoint", str(run_copy), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("handgrad export: error: No space left on device for the Hugging Face")
    assert "Traceback" not in err and "Errno" not in err
    assert list(out.parent.iterdir()) == []


def test_report_enospc(run_copy, tmp_path, monkeypatch, capsys):
    (run_copy / "loss.png").write_bytes(b"\x89PNG not really")
    card = tmp_path / "cards" / "MODEL_CARD.md"

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_module, "write_text_atomic", full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["report", "--checkpoint", str(run_copy), "--out", str(card)]
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"handgrad report: error: No space left on device for the model card {card} in "
        f"{card.parent}"
    )
    assert "Traceback" not in err
    assert not card.exists()
    _no_leftovers(card.parent)


def test_report_image_copy_enospc_leaves_no_half_image(run_copy, tmp_path, monkeypatch):
    (run_copy / "loss.png").write_bytes(b"\x89PNG" + b"\0" * 4096)
    card = tmp_path / "cards" / "MODEL_CARD.md"
    real_copy = shutil.copyfile

    def full(src, dst, *a, **k):
        if Path(src).suffix == ".png":
            Path(dst).write_bytes(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(report_module.shutil, "copyfile", full)
    with pytest.raises(DiskFullError, match="the model card"):
        report_module.write_report(run_copy, card)
    assert list(card.parent.iterdir()) == []
    # and with room, the card and its image are written as before
    monkeypatch.setattr(report_module.shutil, "copyfile", real_copy)
    report_module.write_report(run_copy, card)
    assert card.is_file() and (card.parent / "MODEL_CARD_loss.png").is_file()
