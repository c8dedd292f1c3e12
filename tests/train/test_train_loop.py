"""The training loop end to end on a tiny model: exact resume, checkpoints, NaN stop,
metrics, gradient accumulation."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from handgrad.manifest import write_manifest
from handgrad.models.gpt2 import GPT2
from handgrad.serialization import load_file, save_file
from handgrad.train import CheckpointError, TrainingDiverged, load_checkpoint, train
from handgrad.train import checkpointing as ckpt_module
from handgrad.train.config import ConfigError, from_dict


def run(cfg_dict, out, resume=None):
    return train(from_dict(cfg_dict), out, resume=resume, progress=False, log=lambda m: None)


def bits(losses):
    """float64 bit patterns, for exact comparison (NaN-safe, -0.0 != 0.0)."""
    return {k: np.float64(v).view(np.int64) for k, v in losses.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_is_bit_exact(tiny, tmp_path, dtype):
    # dropout > 0 so that the handgrad RNG state matters as much as the data RNG's.
    model = {"dropout": 0.1, "dtype": dtype}
    full = run(tiny(model=model), tmp_path / "full")
    assert sorted(full.train_losses) == [1, 2, 3, 4, 5, 6]

    first = run(tiny(model=model, train={"max_steps": 3}), tmp_path / "split")
    # the second half continues from the run directory's latest checkpoint (step 3)
    second = run(tiny(model=model), tmp_path / "split", resume=tmp_path / "split")
    assert sorted(second.train_losses) == [4, 5, 6]
    assert bits({**first.train_losses, **second.train_losses}) == bits(full.train_losses)
    assert second.final_eval.loss == full.final_eval.loss

    # metrics.jsonl of the resumed run = the single run's, step for step (timings aside)
    def losses(path):
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["step"], r["tokens"], r["train_loss"], r.get("val_loss")) for r in recs]

    assert losses(tmp_path / "split" / "metrics.jsonl") == losses(
        tmp_path / "full" / "metrics.jsonl"
    )
    # weights of the final checkpoints are identical, bit for bit
    a = load_file(tmp_path / "full" / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (
            a[k].dtype == np.dtype(dtype) if dtype == "float32" else str(a[k].dtype) == "bfloat16"
        )
        assert a[k].tobytes() == b[k].tobytes(), k


def test_checkpoint_layout_latest_and_keep(tiny, tmp_path):
    out = tmp_path / "run"
    res = run(tiny(train={"checkpoint_interval": 2, "keep_checkpoints": 2}), out)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_0000004", "step_0000006"]  # step 2 was pruned (keep 2)
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000006"
    assert res.checkpoint == out / "checkpoints" / "step_0000006"
    ck = out / "checkpoints" / "step_0000006"
    assert sorted(p.name for p in ck.iterdir()) == sorted(ckpt_module.FILES)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 16
    assert state["format_version"] == ckpt_module.FORMAT_VERSION
    assert {"rng_state", "data_rng_state", "best_val_loss"} <= state.keys()
    assert state["best_val_loss"] == pytest.approx(
        res.final_eval.loss
    )  # 6 is the best so far here or not
    config = json.loads((ck / "config.json").read_text())
    assert set(config) == {"model", "data", "optim", "train", "eval"}
    assert config["model"]["n_embd"] == 32 and config["model"]["vocab_size"] > 0
    # the model's own loader follows `latest` and reads the config's model section
    model = GPT2.from_checkpoint(out)
    assert model.config.n_layer == 1
    # optimizer.safetensors holds the moments of every parameter
    opt = load_file(ck / "optimizer.safetensors")
    n_params = len(list(model.parameters()))
    assert sum(k.endswith(".exp_avg") for k in opt) == n_params
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_failed_save_leaves_latest_on_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_copy = shutil.copyfile
    calls = {"n": 0}

    def disk_full_on_second_save(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(ckpt_module.shutil, "copyfile", disk_full_on_second_save)
    with pytest.raises(OSError, match="No space left"):
        run(tiny(train={"checkpoint_interval": 2}), out)
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000002"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]  # no half dir
    load_checkpoint(out)  # and what latest names is complete


def test_corrupt_or_mismatched_checkpoints_refused(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny(train={"max_steps": 2}), out)
    ck = out / "checkpoints" / "step_0000002"

    # a model with another shape
    with pytest.raises(CheckpointError, match=r"n_embd: 32 in the checkpoint, 64 in the config"):
        run(tiny(model={"n_embd": 64}), out, resume=out)

    # a weight of the wrong shape inside model.safetensors
    bad = tmp_path / "bad_shape"
    shutil.copytree(out, bad)
    weights = load_file(bad / "checkpoints" / "step_0000002" / "model.safetensors")
    weights["transformer.ln_f.weight"] = np.ones(7, dtype=np.float32)
    save_file(weights, bad / "checkpoints" / "step_0000002" / "model.safetensors")
    # recorded as written, so the shape check (not the hash check) is what refuses it
    write_manifest(bad / "checkpoints" / "step_0000002", ckpt_module.HASHED_FILES)
    with pytest.raises(
        CheckpointError, match=r"(?s)model.safetensors.*transformer.ln_f.weight.*\(7,\)"
    ):
        run(tiny(), bad, resume=bad)

    # a truncated file
    cut = tmp_path / "truncated"
    shutil.copytree(out, cut)
    path = cut / "checkpoints" / "step_0000002" / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors.*truncated or corrupt"):
        run(tiny(), cut, resume=cut)

    # a missing file
    (ck / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="missing trainer_state.json"):
        run(tiny(), out, resume=out)

    # latest naming nothing
    (out / "latest").write_text("checkpoints/step_0000099\n")
    with pytest.raises(CheckpointError, match="step_0000099"):
        run(tiny(), out, resume=out)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow is the point here
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    # An absurd learning rate blows the weights up at the first update.
    cfg = tiny(
        optim={"lr": 1e30, "min_lr": 0.0, "warmup_steps": 0},
        train={"checkpoint_interval": 1, "max_steps": 10},
    )
    with pytest.raises(TrainingDiverged) as e:
        run(cfg, out)
    msg = str(e.value)
    assert "training loss is" in msg and ("nan" in msg or "inf" in msg)
    bad_step = int(msg.split()[1].rstrip(":"))
    latest = (out / "latest").read_text().strip()
    assert latest == f"checkpoints/step_{bad_step - 1:07d}"
    assert latest in msg
    state = json.loads((out / latest / "trainer_state.json").read_text())
    assert state["step"] == bad_step - 1
    weights = load_file(out / latest / "model.safetensors")
    assert all(np.isfinite(w).all() for w in weights.values())


def test_metrics_jsonl_and_plot(tiny, tmp_path):
    out = tmp_path / "run"
    res = run(tiny(), out)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    keys = {"step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    for r in recs:
        assert keys <= r.keys()
        assert r["tokens"] == r["step"] * 4 * 16
    evaluated = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    for r in evaluated:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["val_bpt"] == pytest.approx(r["val_loss"] / math.log(2))
    assert res.final_eval.loss == evaluated[-1]["val_loss"]
    # the schedule: warmup 2 steps to 3e-3, then cosine towards 3e-4 at step 8
    assert recs[0]["lr"] == pytest.approx(1.5e-3) and recs[1]["lr"] == pytest.approx(3e-3)
    assert recs[5]["lr"] < recs[2]["lr"]
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # training learnt something: the final val loss is below the unigram baseline
    assert res.final_eval.loss < res.unigram_loss + 0.5  # 6 steps: at least near it


def test_grad_accumulation_matches_a_big_micro_batch(tiny, tmp_path):
    a = run(
        tiny(train={"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 4}), tmp_path / "a"
    )
    b = run(
        tiny(train={"micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 4}), tmp_path / "b"
    )
    assert sorted(a.train_losses) == [1, 2, 3, 4]
    for step in a.train_losses:
        assert abs(a.train_losses[step] - b.train_losses[step]) <= 1e-6, step
    # evaluated on the same batches, the two final models agree too
    from handgrad.data import TokenShards
    from handgrad.train import evaluate

    val = TokenShards(tiny()["data"]["source"]).val
    ev = [evaluate(GPT2.from_checkpoint(tmp_path / r), val, 2, 4, 16).loss for r in "ab"]
    assert abs(ev[0] - ev[1]) <= 1e-5


def test_training_with_recompute_is_the_same_run(tiny, tmp_path):
    def run(recompute: bool):
        cfg = tiny(model={"recompute": recompute, "dropout": 0.1})
        return train(from_dict(cfg), tmp_path / str(recompute), progress=False, log=lambda m: None)

    plain, again = run(False), run(True)
    assert plain.train_losses == again.train_losses
    assert plain.final_eval.loss == again.final_eval.loss


def test_resume_on_other_data_is_refused_before_any_preparation(tiny, tmp_path):
    run = train(from_dict(tiny(train={"max_steps": 2})), tmp_path / "run", progress=False,
                log=lambda m: None)  # fmt: skip
    other = tmp_path / "other.txt"
    other.write_text("something else entirely " * 200, encoding="utf-8")
    cfg = tiny(train={"max_steps": 4}, data={"source": str(other), "tokenizer": "train:300",
                                             "cache_dir": str(tmp_path / "cache")})  # fmt: skip
    with pytest.raises(ConfigError) as err:
        train(from_dict(cfg), tmp_path / "run", resume=run.checkpoint, progress=False,
              log=lambda m: None)  # fmt: skip
    message = str(err.value)
    assert "the run was trained with [data] source = " in message
    assert f"--set train.init_from={run.checkpoint}" in message
    assert not (tmp_path / "cache").exists()  # nothing was prepared
