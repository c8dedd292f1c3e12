"""A damaged checkpoint file is refused by `sample`, `train --resume` and `verify`, each with
one line naming the file; a checkpoint without a manifest loads with a one-line warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handgrad.cli import main
from handgrad.manifest import MANIFEST_FILE
from handgrad.train import checkpointing as ckpt_module
from handgrad.train import train
from handgrad.train.config import from_dict

ROOT = Path(__file__).resolve().parents[2]
STEP = "checkpoints/step_0000004"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data_dir) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (latest)."""
    cfg = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0},
        "data": {"source": str(data_dir)},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "checkpoint_interval": 2,
            "sample_tokens": 0,
            "log_interval": 2,
        },
        "eval": {"interval": 0, "batches": 1},
    }
    out = tmp_path_factory.mktemp("integrity") / "run"
    train(from_dict(cfg), out, progress=False, log=lambda m: None)
    assert (out / "latest").read_text().strip() == STEP
    return out


@pytest.fixture
def run_copy(good_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _middle_of_data(path: Path) -> int:
    """The middle of the tensor bytes of a safetensors file, the middle of any other file."""
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        return size // 2
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert start < size
    return start + (size - start) // 2


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3]),
    "bit near the start": lambda p: _flip(p, 4),
    "bit in the tensor data": lambda p: _flip(p, _middle_of_data(p)),
    "random bytes": lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
    "empty": lambda p: p.write_bytes(b""),
}


def _refused(argv: list[str], capsys) -> tuple[str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1, (argv, out, err)
    assert "Traceback" not in err
    return out, err


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", ckpt_module.HASHED_FILES)
def test_damaged_file_refused_everywhere(run_copy, name, damage, capsys):
    path = run_copy / STEP / name
    DAMAGE[damage](path)

    _, err = _refused(["sample", "--checkpoint", str(run_copy), "--max-new-tokens", "3"], capsys)
    assert err.startswith("handgrad sample: error: ") and str(path) in err
    assert len(err.strip().splitlines()) == 1

    argv = ["train", "--resume", str(run_copy), "--set", "train.max_steps=6", "--no-progress"]
    _, err = _refused(argv, capsys)
    assert err.startswith("handgrad train: error: ") and str(path) in err
    assert (run_copy / "latest").read_text().strip() == STEP  # nothing was trained or saved

    out, err = _refused(["verify", str(run_copy)], capsys)
    failed = [line for line in out.splitlines() if line.split()[0] == "FAILED"]
    assert len(failed) == 1 and name in failed[0], out
    assert f"checkpoint {run_copy / STEP}" in out
    assert "1 FAILED" in out and "has damaged or missing files" in err
    # the other checkpoint is fine and still says so
    assert out.count(" OK ") >= len(ckpt_module.HASHED_FILES) + 1


@pytest.mark.parametrize("damage", ["empty", "random bytes", "bit near the start"])
def test_damaged_manifest_refused(run_copy, damage, capsys):
    path = run_copy / STEP / MANIFEST_FILE
    DAMAGE[damage](path)
    for argv in (
        ["sample", "--checkpoint", str(run_copy), "--max-new-tokens", "3"],
        ["train", "--resume", str(run_copy), "--no-progress"],
        ["verify", str(run_copy / STEP)],
    ):
        out, err = _refused(argv, capsys)
        assert str(path) in out + err and "not valid JSON" in out + err


def test_verify_reports_each_file_of_a_good_run(good_run, capsys):
    assert main(["verify", str(good_run)]) == 0
    out = capsys.readouterr().out
    for step in ("step_0000002", "step_0000004"):
        assert f"checkpoint {good_run / 'checkpoints' / step}" in out
    sizes = {p.name: p.stat().st_size for p in (good_run / STEP).iterdir()}
    for name in ckpt_module.HASHED_FILES:
        assert any(
            line.split()[:2] == ["OK", name] and f"{sizes[name]:,} bytes" in line
            for line in out.splitlines()
        ), name
    (latest,) = [x.split() for x in out.splitlines() if x.split()[:2] == ["OK", "latest"]]
    assert latest[-2:] == ["->", STEP]
    assert out.strip().endswith("all OK")
    # one checkpoint directory works too, and --sizes-only does not read the files
    assert main(["verify", str(good_run / STEP), "--sizes-only"]) == 0
    assert "size only" in capsys.readouterr().out


def test_verify_latest_naming_nothing(run_copy, capsys):
    (run_copy / "latest").write_text("checkpoints/step_0000099\n")
    out, _ = _refused(["verify", str(run_copy)], capsys)
    assert "FAILED" in out and "step_0000099" in out


def test_verify_unknown_directory(tmp_path, capsys):
    _, err = _refused(["verify", str(tmp_path)], capsys)
    assert "not a run directory" in err and str(tmp_path) in err
    _, err = _refused(["verify", str(tmp_path / "nope")], capsys)
    assert "no such directory" in err


def test_checkpoint_without_manifest_loads_with_one_line_warning(run_copy, capsys):
    for ckpt in (run_copy / "checkpoints").iterdir():
        (ckpt / MANIFEST_FILE).unlink()
    argv = ["sample", "--checkpoint", str(run_copy), "--max-new-tokens", "3", "--seed", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(run_copy / STEP) in warnings[0]
    assert "no manifest.json" in warnings[0]
    assert main(["verify", str(run_copy)]) == 0  # structure checks pass; nothing is hashed
    out = capsys.readouterr().out
    assert "UNVERIFIED" in out and "without a recorded hash" in out
    # an older checkpoint still gets its structure checked
    _flip(run_copy / STEP / "config.json", 0)
    out, _ = _refused(["verify", str(run_copy / STEP)], capsys)
    assert any("FAILED" in x and "config.json" in x for x in out.splitlines())


def test_resume_verifies_and_new_checkpoint_gets_a_manifest(run_copy, capsys):
    argv = ["train", "--resume", str(run_copy), "--set", "train.max_steps=6", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    manifest = json.loads((run_copy / "checkpoints/step_0000006" / MANIFEST_FILE).read_text())
    assert sorted(e["name"] for e in manifest["files"]) == sorted(ckpt_module.HASHED_FILES)


def test_no_traceback_from_the_real_command(run_copy):
    """The same refusal seen from a shell: stderr is one line, no Python traceback."""
    _flip(run_copy / STEP / "optimizer.safetensors", 5000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HANDGRAD_DEBUG", None)
    for args in (
        ["sample", "--checkpoint", str(run_copy), "--max-new-tokens", "3"],
        ["verify", str(run_copy)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "handgrad.cli", *args], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "optimizer.safetensors" in proc.stdout + proc.stderr
