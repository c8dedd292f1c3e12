"""``[train] autocast``: its values and errors, and a shakespeare-char run under bf16
autocast that follows the float32 run's loss curve."""

from __future__ import annotations

import pytest

from handgrad.train import train
from handgrad.train.config import ConfigError, load_config


def test_autocast_setting_resolves_per_device(tiny):
    cfg = load_config(tiny(train={"autocast": "auto"}))  # the default
    assert cfg.train.autocast == "auto" and cfg.train.autocast_precision() is None  # the CPU
    cfg.train.device = "cuda"
    assert cfg.train.autocast_precision() == "bf16"
    cfg.train.autocast = "none"
    assert cfg.train.autocast_precision() is None
    assert load_config(tiny(train={"autocast": "bf16"})).train.autocast_precision() == "bf16"
    with pytest.raises(ConfigError, match=r"\[train\] autocast = 'fp16': must be"):
        load_config(tiny(train={"autocast": "fp16"}))


def test_shakespeare_char_under_autocast_tracks_float32(shakespeare_path, tmp_path):
    """120 steps of the shipped recipe, once in float32 and once under bf16 autocast (the
    CPU's reference path): bfloat16 products move each loss by a few thousandths, so the
    curves stay within 0.05 of each other while both fall from ln 65 = 4.17 to below 2.7."""
    curves = {}
    for precision in ("none", "bf16"):
        cfg = load_config(
            "shakespeare-char",
            [f"data.source={shakespeare_path}", "train.max_steps=120", "train.processes=1",
             "train.micro_batch_size=12", "train.checkpoint_interval=0", "eval.interval=120",
             "eval.batches=4", "train.sample_tokens=0", "optim.warmup_steps=20",
             f"train.autocast={precision}"],
        )  # fmt: skip
        result = train(cfg, tmp_path / precision, progress=False, log=lambda m: None)
        curves[precision] = (result.train_losses, result.final_eval.loss)
    (fp32, val32), (bf16, val16) = curves["none"], curves["bf16"]
    assert fp32[1] > 4.0 and val32 < 2.7 and val16 < 2.7
    # mean of each 20-step window (single steps are noisy in both runs alike)
    for start in range(1, 120, 20):
        a = sum(fp32[s] for s in range(start, start + 20)) / 20
        b = sum(bf16[s] for s in range(start, start + 20)) / 20
        assert abs(a - b) < 0.05, (start, a, b)
    assert abs(val32 - val16) < 0.03
    assert fp32 != bf16  # the autocast run did round
