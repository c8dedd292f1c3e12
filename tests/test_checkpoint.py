"""handgrad.checkpoint: every form --checkpoint accepts, the run of a checkpoint, ``latest``,
the model-shape check, and the errors for what is not a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handgrad.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    check_same_model,
    latest_text,
    list_checkpoints,
    read_config,
    read_latest,
    resolve_checkpoint,
    run_dir_of,
    write_latest,
)
from handgrad.cli import main
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.serialization import save_file
from handgrad.tokenizer import CharTokenizer

CONFIG = GPT2Config(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=12)


def _run(tmp_path, steps=(1, 2)):
    """A run directory laid out as the trainer writes it, latest -> the last step."""
    run = tmp_path / "run"
    for step in steps:
        ckpt = run / "checkpoints" / f"step_{step:07d}"
        ckpt.mkdir(parents=True)
        model = GPT2(CONFIG)
        save_file(model.state_dict(), ckpt / "model.safetensors")
        (ckpt / "config.json").write_text(json.dumps({"model": CONFIG.to_dict()}))
        CharTokenizer.train("abcdefghijk\n").save(ckpt / "tokenizer.json")  # 12 ids
    write_latest(run, f"checkpoints/step_{steps[-1]:07d}")
    return run, run / "checkpoints" / f"step_{steps[-1]:07d}"


def test_every_accepted_form_resolves_to_the_same_checkpoint(tmp_path):
    run, last = _run(tmp_path)
    assert resolve_checkpoint(run) == last  # a run directory follows latest
    assert resolve_checkpoint(run / "latest") == last  # the latest file itself
    assert resolve_checkpoint(last) == last  # a checkpoint directory
    older = run / "checkpoints" / "step_0000001"
    assert resolve_checkpoint(older) == older  # not latest: taken as named
    assert resolve_checkpoint(str(run)) == last  # str paths too


def test_latest_is_written_atomically_and_read_back(tmp_path):
    run, last = _run(tmp_path)
    assert (run / "latest").read_text() == "checkpoints/step_0000002\n"
    assert read_latest(run) == last
    write_latest(run, "checkpoints/step_0000001")
    assert read_latest(run) == run / "checkpoints" / "step_0000001"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "latest"]  # no temp file
    assert read_latest(tmp_path) is None  # no latest file: not a run
    assert latest_text(run) == str(run / "checkpoints" / "step_0000001")
    assert latest_text(tmp_path) == "none saved yet"
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]


def test_run_dir_of_every_form(tmp_path):
    run, last = _run(tmp_path)
    assert run_dir_of(run) == run.resolve()
    assert run_dir_of(run / "latest") == run.resolve()
    assert run_dir_of(last) == run.resolve()
    alone = tmp_path / "alone"  # a checkpoint that belongs to no run is its own
    alone.mkdir()
    assert run_dir_of(alone) == alone.resolve()


def test_missing_directory_is_refused_by_name(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nope: no such directory"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for callers that catch that
        resolve_checkpoint(tmp_path / "nope")


def test_latest_naming_nothing_is_refused(tmp_path):
    run, _ = _run(tmp_path)
    (run / "latest").write_text("checkpoints/step_0000099\n")
    for form in (run, run / "latest"):
        with pytest.raises(
            CheckpointNotFoundError, match=r"latest names 'checkpoints/step_0000099'"
        ):
            resolve_checkpoint(form)
    (run / "latest").write_text("\n")
    with pytest.raises(CheckpointError, match="latest names ''"):
        resolve_checkpoint(run)


def test_a_directory_that_is_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a checkpoint .*model\.safetensors.* nor a run"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"notes\.txt is a file"):
        resolve_checkpoint(tmp_path / "notes.txt")


def test_read_config_refuses_bad_json_and_a_missing_model_section(tmp_path):
    _, last = _run(tmp_path)
    assert read_config(last)["model"]["n_embd"] == 8
    (last / "config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_config(last)
    (last / "config.json").write_text(json.dumps({"train": {}}))
    with pytest.raises(CheckpointError, match=r'config\.json: has no "model" section'):
        read_config(last)


def test_model_shape_check_names_every_difference():
    wanted = CONFIG.to_dict()
    check_same_model(dict(wanted, dropout=0.3), wanted, "ck")  # dropout may change
    saved = dict(wanted, n_embd=16, dtype="bfloat16")
    with pytest.raises(CheckpointError) as err:
        check_same_model(saved, wanted, "runs/x")
    msg = str(err.value)
    assert msg.startswith("runs/x:")
    assert "n_embd: 16 in the checkpoint, 8 in the config" in msg
    assert "dtype: 'bfloat16' in the checkpoint, 'float32' in the config" in msg
    assert "n_layer" not in msg


def test_model_loader_takes_every_form(tmp_path):
    run, last = _run(tmp_path)
    idx = np.array([[1, 2, 3]])
    expected = GPT2.from_checkpoint(last)(idx).data
    for form in (run, run / "latest"):
        assert np.array_equal(GPT2.from_checkpoint(form)(idx).data, expected)


def test_sample_command_takes_the_latest_file(tmp_path, capsys):
    run, _ = _run(tmp_path)
    args = ["--prompt", "ab", "--max-new-tokens", "3", "--seed", "1"]
    assert main(["sample", "--checkpoint", str(run / "latest"), *args]) == 0
    by_latest = capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(run), *args]) == 0
    assert capsys.readouterr().out == by_latest
    assert by_latest.startswith("ab")
    (run / "latest").write_text("checkpoints/gone\n")
    assert main(["sample", "--checkpoint", str(run / "latest"), *args]) == 1
    assert "names 'checkpoints/gone'" in capsys.readouterr().err
