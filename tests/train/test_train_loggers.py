"""``[train] loggers``: TensorBoard event files and W&B runs carry exactly what
metrics.jsonl holds, and the samples; read back with each tool's own reader."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from handgrad.train import ConfigError, train
from handgrad.train.config import from_dict, load_config
from handgrad.train.loggers import TAGS, make_loggers, scalar_values


def run(cfg_dict, out, resume=None):
    samples = []

    def log(msg):
        if msg.startswith("sample: "):
            samples.append(msg)

    res = train(from_dict(cfg_dict), out, resume=resume, progress=False, log=log)
    return res, samples


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def accumulator(run_dir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def test_tensorboard_events_equal_metrics_jsonl(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    res, _ = run(tiny(train={"loggers": ["tensorboard"]}), out)
    assert list(out.glob("events.out.tfevents.*")), "no event file beside metrics.jsonl"
    recs = records(out / "metrics.jsonl")
    acc = accumulator(out)
    tags = set(acc.Tags()["scalars"])
    # every metric the trainer logs, under its grouped name
    expected = {"loss/train", "loss/val", "val/perplexity", "val/bits_per_token", "optim/lr",
                "optim/grad_norm", "speed/tokens_per_s", "progress/tokens"}  # fmt: skip
    assert expected <= tags
    for key, tag in TAGS.items():
        want = [(r["step"], np.float32(r[key])) for r in recs if key in r]
        got = [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)]
        assert got == want, tag  # TensorBoard stores float32: equal after that rounding
    assert [e.step for e in acc.Scalars("loss/val")] == [3, 6]
    # the samples as text, at the evaluation steps, identical to the trainer's
    texts = acc.Tensors("samples")
    assert [t.step for t in texts] == [3, 6]
    assert all(t.tensor_proto.string_val[0].decode() for t in texts)
    assert acc.SummaryMetadata("samples").plugin_data.plugin_name == "text"
    assert res.step == 6


def test_tensorboard_sample_text_is_the_logged_sample(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    _, samples = run(tiny(train={"loggers": ["tensorboard"]}), out)
    texts = [t.tensor_proto.string_val[0].decode() for t in accumulator(out).Tensors("samples")]
    shown = ["sample: " + t.replace("\n", "\n        ") for t in texts]
    assert shown == samples


def test_tensorboard_resume_drops_steps_logged_after_the_checkpoint(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cfg = tiny(train={"loggers": ["tensorboard"], "checkpoint_interval": 3})
    run(cfg, out)
    # step 3's checkpoint is the one resumed from: steps 4..6 are logged a second time
    (out / "latest").write_text("checkpoints/step_0000003\n")
    run(cfg, out, resume=out)
    steps = [e.step for e in accumulator(out).Scalars("loss/train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    recs = records(out / "metrics.jsonl")
    got = [np.float32(e.value) for e in accumulator(out).Scalars("loss/train")]
    assert got == [np.float32(r["train_loss"]) for r in recs]


def test_default_writes_no_event_file(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny(train={"max_steps": 2, "sample_tokens": 0}), out)
    assert not list(out.glob("events.out.tfevents.*"))
    assert not (out / "wandb").exists()


def test_unknown_logger_is_an_error_naming_the_key(monkeypatch):
    # the parsing below names wandb, whose package the config check looks up with find_spec:
    # a stand-in module (with a spec) where the wandb package is not installed
    if importlib.util.find_spec("wandb") is None:
        stand_in = types.ModuleType("wandb")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        monkeypatch.setitem(sys.modules, "wandb", stand_in)
    with pytest.raises(ConfigError, match=r"\[train\] loggers: unknown logger 'tensorbord'"):
        load_config(None, ["train.loggers=tensorbord"])
    with pytest.raises(ConfigError, match=r"\[train\] loggers .*expected a list of a string"):
        load_config(None, ["train.loggers=3"])
    with pytest.raises(ConfigError, match="named twice"):
        load_config(None, ["train.loggers=wandb,wandb"])
    # --set with a bare comma-separated word list, or a TOML list
    assert load_config(None, ["train.loggers=tensorboard,wandb"]).train.loggers == [
        "tensorboard",
        "wandb",
    ]
    assert load_config(None).train.loggers == []


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    # a None entry in sys.modules makes `import wandb` raise ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"'wandb' package.*handgrad\[track\]"):
        make_loggers(["wandb"], tmp_path)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"'tensorboard' package.*handgrad\[track\]"):
        load_config(None, ["train.loggers=tensorboard"])


def test_scalar_values_keep_numbers_only():
    rec = {"step": 4, "train_loss": 2.5, "tokens": 64, "note": "x", "flag": True,
           "val_ppl": float("inf"), "custom": 1.5}  # fmt: skip
    assert scalar_values(rec) == {"loss/train": 2.5, "progress/tokens": 64.0, "custom": 1.5}


def test_wandb_offline_run(tiny, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (handgrad[track])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kw):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    out = tmp_path / "run"
    run(tiny(train={"loggers": ["wandb"]}), out)
    run_id = (out / "wandb-run-id").read_text().strip()
    assert run_id
    offline = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("run-*.wandb")), "no offline run files"
    recs = records(out / "metrics.jsonl")
    scalars = [(s, d) for s, d in logged if "loss/train" in d]
    assert [s for s, _ in scalars] == [r["step"] for r in recs]
    assert [d["loss/train"] for _, d in scalars] == [r["train_loss"] for r in recs]
    assert [d["loss/val"] for _, d in scalars if "loss/val" in d] == [
        r["val_loss"] for r in recs if "val_loss" in r
    ]
    assert [s for s, d in logged if "samples" in d] == [3, 6]


def test_wandb_without_a_login_says_how_to_log_in(tiny, tmp_path, monkeypatch):
    import types

    from handgrad.train import loggers

    class UsageError(Exception):
        pass

    def init(**kwargs):
        raise UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(loggers, "_require", lambda name: types.SimpleNamespace(init=init))
    with pytest.raises(RuntimeError) as err:
        loggers.WandbLogger(tmp_path / "run")
    message = str(err.value)
    assert "UsageError: No API key configured" in message
    assert "wandb login" in message and "WANDB_MODE=offline" in message
