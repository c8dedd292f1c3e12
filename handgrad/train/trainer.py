"""The training loop: data -> GPT-2 -> loss -> gradients -> AdamW -> checkpoints.

One optimizer step on a global batch of G = m x A x P windows (m = micro_batch_size,
A = grad_accum_steps, P = processes):

    lr    = warmup + cosine schedule at this step
    x, y  = G random windows of block_size + 1 tokens, drawn at once, so the data of a step
            does not depend on how it is split into micro batches and processes
    for each of the A micro batches of m x P windows:  (loss / A).backward()
    norm  = clip_grad_norm_(params, grad_clip)
    AdamW step (decay on 2-D weights only; fp32 master weights for bf16 parameters)

How the micro batches are spread over processes and devices is the run mode's
(``handgrad.parallel``), chosen once before the loop; the loop is the same in every mode.

Everything random comes from two generators: handgrad's global one (initialisation and
dropout, seeded with ``handgrad.manual_seed(seed)``) and one NumPy generator for the data
(``default_rng(seed)``). Both states go into every checkpoint, so a resumed run continues
bit for bit where the first one stopped.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import handgrad
from handgrad.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    check_same_model,
    latest_text,
    step_dir_name,
)
from handgrad.data import TokenShards, get_batch
from handgrad.data.cache import DataSpecError, prepared_data_dir
from handgrad.fileio import write_json_atomic
from handgrad.manifest import hash_file
from handgrad.models import build_model, config_from_dict
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.optim import AdamW, cosine_with_warmup, param_groups_for_weight_decay
from handgrad.parallel import (
    FAILED,
    EvalResult,
    ModeError,
    PendingLosses,
    RunMode,
    TrainingDiverged,
    choose_mode,
    unigram_loss,
)
from handgrad.random import get_rng_state, manual_seed, set_rng_state
from handgrad.train.checkpointing import Checkpoint, load_checkpoint, save_checkpoint
from handgrad.train.config import ConfigError, TrainConfig
from handgrad.train.finetune import load_init_weights, start_from
from handgrad.train.hardware import hardware_info
from handgrad.train.runlog import MetricsLog, NullMetrics
from handgrad.train.sampling import sample_text

__all__ = ["Run", "TrainResult", "TrainingDiverged", "build_run", "train"]


@dataclass
class TrainResult:
    out: Path
    step: int
    tokens_seen: int
    elapsed_s: float
    train_losses: dict[int, float] = field(default_factory=dict)  # step -> loss, every step
    final_eval: EvalResult | None = None
    unigram_loss: float | None = None
    checkpoint: Path | None = None
    writes: bool = True  # this process wrote the run (under MPI, only rank 0 reports)
    first_step: int = 0  # the step it started (or resumed) at: step - first_step steps ran


# ----------------------------------------------------------------------------------------
# building the run: data, model, optimizer, and the state of a run being resumed


@dataclass
class Run:
    """Everything a training run is made of, built (or restored from a checkpoint) before
    the first step; ``step``, ``tokens_seen`` and ``best_val`` move as it trains."""

    cfg: TrainConfig
    out: Path
    mode: RunMode
    data: TokenShards
    model: GPT2
    optimizer: Any  # AdamW, or ZeRO-1's sharded one: what the mode steps and saves
    rng: np.random.Generator  # the data's generator (handgrad's global one is the other)
    tokenizer: Any
    tokenizer_sha: str
    block_size: int
    resolved: dict[str, Any]  # the config as saved with every checkpoint
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds spent by the runs this one resumes
    best_val: float = math.inf
    resumed_from: Path | None = None


def build_run(
    cfg: TrainConfig,
    out: str | os.PathLike,
    mode: RunMode,
    resume: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> Run:
    """Prepare the data, check everything that can be refused (before any training work),
    build the model on the mode's device (with the weights of ``[train] init_from``, if it
    names a trained model) and the optimizer, restore them from ``resume`` (a checkpoint,
    a run directory or its ``latest`` file) and write ``<out>/config.json``. The writing
    rank prepares the data (and imports ``init_from``) before the others read it."""
    t = cfg.train
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        _check_same_data(cfg, ckpt)
    start = None  # a trained model to start from: its shape, tokenizer and weights
    if t.init_from is not None:
        start = mode.first(lambda: start_from(cfg, ckpt.path if ckpt is not None else None))
    try:
        spec = cfg.data if start is None else start.data
        data = TokenShards(mode.first(lambda: prepared_data_dir(spec, progress)))
    except DataSpecError as err:
        raise ConfigError(str(err)) from None
    model_cfg = cfg.model_for(data.vocab_size) if start is None else start.model
    block_size = t.block_size or model_cfg.block_size
    _check_data(cfg, data, model_cfg, block_size)
    tokenizer_sha = hash_file(data.tokenizer_path, "sha256")
    if ckpt is not None:
        _check_resumable(ckpt, model_cfg, data, tokenizer_sha)

    manual_seed(t.seed)
    # built (and initialised from the host generator) on the CPU, then moved: the same
    # seed gives the same weights on every device
    model = build_model(model_cfg)  # GPT-2 or Llama, as [model] arch says
    if start is not None and ckpt is None:
        load_init_weights(model, start.checkpoint)
        mode.say(f"starting from {start.checkpoint} (its weights; new optimizer and schedule)")
    model.to(mode.device)
    o = cfg.optim
    optimizer = AdamW(
        param_groups_for_weight_decay(model, o.weight_decay),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    resolved = cfg.resolved(model_cfg, block_size)
    run = Run(
        cfg, Path(out), mode, data, model, optimizer, np.random.default_rng(t.seed),
        data.load_tokenizer(), tokenizer_sha, block_size, resolved,
    )  # fmt: skip
    if ckpt is not None:
        _restore(run, ckpt)
        mode.say(f"resuming from {ckpt.path} at step {run.step} ({run.tokens_seen:,} tokens seen)")
    mode.run_dir = run.out  # where a multi-host job's watchdog records what ended it
    if mode.writes:
        run.out.mkdir(parents=True, exist_ok=True)
        if (failed := run.out / FAILED).exists():  # what ended the last job on this run
            mode.say(f"the last job on this run ended: {failed.read_text().strip()}")
            failed.unlink()
        write_json_atomic(run.out / "config.json", resolved)
    return run


def _check_data(cfg: TrainConfig, data: TokenShards, model: GPT2Config, block_size: int) -> None:
    """Refuse token ids beyond the model's vocabulary, or splits too short for a window."""
    if data.vocab_size > model.vocab_size:
        raise ConfigError(
            f"the data ({data.dir}) has {data.vocab_size} token ids but the model's vocab_size "
            f"is {model.vocab_size}; remove [model] vocab_size to take it from the data"
        )
    for name, split in (("train", data.train), ("val", data.val)):
        if name == "val" and cfg.eval.batches == 0:
            continue
        if len(split) < block_size + 1:
            raise ConfigError(
                f"{data.dir}: the {name} split has {len(split)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}"
            )


def _check_same_data(cfg: TrainConfig, ckpt: Checkpoint) -> None:
    """Refuse, before any preparation, to resume a run on other data than its own."""
    saved = ckpt.config.get("data", {})
    recorded = ckpt.trainer_state.get("data", {}).get("dir")

    def same(a: Any, b: Any) -> bool:
        if a == b:
            return True
        return isinstance(a, str) and isinstance(b, str) and _path(a) == _path(b)

    if recorded is not None and same(cfg.data.source, recorded):
        return  # the prepared directory the run read
    keys = ("source", "tokenizer", "val_fraction")
    diffs = [k for k in keys if not same(getattr(cfg.data, k), saved.get(k))]
    if diffs:
        was = ", ".join(f"{k} = {saved.get(k)!r}" for k in diffs)
        now = ", ".join(f"{k} = {getattr(cfg.data, k)!r}" for k in diffs)
        raise ConfigError(
            f"{ckpt.path}: the run was trained with [data] {was}; this config has {now}. A "
            "resumed run continues on its own data; to train the model on other data, start "
            f"a new run from it: --set train.init_from={ckpt.path}"
        )


def _path(text: str) -> Path:
    return Path(text).expanduser().resolve()


def _check_resumable(
    ckpt: Checkpoint, model_cfg: GPT2Config, data: TokenShards, tokenizer_sha: str
) -> None:
    """Refuse a checkpoint of another model shape, or trained on another tokenizer's ids."""
    try:
        saved = config_from_dict(ckpt.config["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: bad model section: {err}") from None
    check_same_model(saved.to_dict(), model_cfg.to_dict(), f"{ckpt.path} (refusing to resume)")
    saved_sha = ckpt.trainer_state.get("data", {}).get("tokenizer_sha256")
    if saved_sha is not None and saved_sha != tokenizer_sha:
        raise CheckpointError(
            f"{ckpt.path}: trained with another tokenizer (sha256 {saved_sha[:12]}...) than "
            f"the data's {data.tokenizer_path} ({tokenizer_sha[:12]}...); refusing to resume"
        )


def _restore(run: Run, ckpt: Checkpoint) -> None:
    """Weights, optimizer state, both RNG states and the counters of ``ckpt`` into ``run``."""
    try:
        run.model.load_state_dict(ckpt.model)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.path / 'model.safetensors'}: {err}") from None
    try:
        run.optimizer.load_state_dict(ckpt.optimizer)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.path / 'optimizer.safetensors'}: {err}") from None
    state = ckpt.trainer_state
    try:
        set_rng_state(state["rng_state"])
        run.rng.bit_generator.state = state["data_rng_state"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{ckpt.path / 'trainer_state.json'}: bad RNG state ({err})"
        ) from None
    run.step, run.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    run.elapsed_before = float(state.get("elapsed_s", 0.0))
    best = state.get("best_val_loss")
    run.best_val = math.inf if best is None else float(best)
    run.resumed_from = ckpt.path


# ----------------------------------------------------------------------------------------
# evaluation and checkpoints


def run_evaluation(run: Run, at_step: int, train_loss: float | None, metrics: Any) -> EvalResult:
    """Validation loss on ``[eval] batches`` fixed batches (and a sample, if asked, which goes
    to ``metrics``' loggers as text), said on the writing rank."""
    ev_cfg, t, mode = run.cfg.eval, run.cfg.train, run.mode
    ev = mode.evaluate(run.data.val, ev_cfg.batches, run.block_size, run.data.mask("val"))
    if not math.isfinite(ev.loss):
        raise TrainingDiverged(f"step {at_step}: validation loss is {ev.loss}; stopping.")
    run.best_val = min(run.best_val, ev.loss)
    tl = f"train {train_loss:.4f}, " if train_loss is not None else ""
    mode.say(
        f"step {at_step}: {tl}val {ev.loss:.4f} nats (ppl {ev.perplexity:.2f}, "
        f"{ev.bits_per_token:.3f} bits/token)"
    )
    if t.sample_tokens > 0 and mode.writes:
        text = sample_text(
            run.model, run.tokenizer, ev_cfg.sample_prompt, t.sample_tokens,
            ev_cfg.sample_temperature, ev_cfg.sample_top_k, seed=t.seed + at_step,
        )  # fmt: skip
        mode.say("sample: " + text.replace("\n", "\n        "))
        metrics.log_text(at_step, text)
    return ev


def save_run_checkpoint(run: Run, elapsed_s: float) -> Path:
    """The checkpoint of ``run.step``, published as latest (older ones pruned), written by
    the writing rank once the mode has gathered what it needs."""
    trainer_state = {
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "rng_state": get_rng_state(),
        "data_rng_state": run.rng.bit_generator.state,
        "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
        "elapsed_s": elapsed_s,
        "data": {
            "dir": str(run.data.dir.resolve()),
            "vocab_size": run.data.vocab_size,
            "tokenizer_sha256": run.tokenizer_sha,
        },
        "handgrad_version": handgrad.__version__,
        "hardware": hardware_info(run.mode.processes, run.mode.device),
    }
    written = run.mode.checkpoint(
        lambda: save_checkpoint(
            run.out,
            run.step,
            run.model,
            run.optimizer,
            run.resolved,
            trainer_state,
            run.data.tokenizer_path,
            run.cfg.train.keep_checkpoints,
        )  # fmt: skip
    )
    return written or run.out / CHECKPOINTS / step_dir_name(run.step)


# ----------------------------------------------------------------------------------------
# the loop


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: Any = None,
) -> TrainResult:
    """Run (or resume) training as ``cfg`` says, writing metrics, plots and checkpoints to
    ``out``. ``resume`` is a checkpoint or run directory (or its ``latest`` file).
    ``progress`` None shows the bar on a terminal only. ``log`` is where status lines go
    (default: stderr via tqdm.write). Raises ConfigError, CheckpointError (before training
    starts) or TrainingDiverged. Under an MPI launcher every rank calls this and trains its
    share of each batch; the others raise RankStopped when one rank refuses to start."""
    started = time.perf_counter()
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    try:
        t = cfg.train
        mode = choose_mode(t.device, t.processes, bool(t.zero), say, t.collective_timeout)
    except ModeError as err:
        raise ConfigError(str(err)) from None
    cfg = mode.agree(lambda: cfg.with_processes(mode.processes))
    writes = mode.writes
    run = mode.agree(lambda: build_run(cfg, out, mode, resume, progress if writes else False))
    t, o, ev_cfg = cfg.train, cfg.optim, cfg.eval
    resumed = run.resumed_from is not None
    metrics = (
        MetricsLog(
            run.out / "metrics.jsonl", run.step if resumed else None, t.loggers, run.resolved
        )
        if writes
        else NullMetrics()
    )
    tokens_per_step = cfg.global_batch_size * run.block_size
    mode.say(
        f"{run.model.num_parameters():,} parameters ({run.model.config.dtype}), data "
        f"{run.data.dir} (train {len(run.data.train):,} / val {len(run.data.val):,} tokens, "
        f"vocab {run.data.vocab_size}); global batch {cfg.global_batch_size} x "
        f"{run.block_size} = {tokens_per_step:,} tokens/step; lr {o.lr:g} -> {o.min_lr:g}: "
        f"warmup {o.warmup_steps} steps, cosine to step {cfg.decay_steps} of {t.max_steps}"
    )
    result = TrainResult(
        run.out, run.step, run.tokens_seen, run.elapsed_before, writes=writes, first_step=run.step
    )

    def elapsed() -> float:
        return run.elapsed_before + time.perf_counter() - started

    bar = tqdm(
        total=t.max_steps, initial=run.step, desc="train", unit="step", file=sys.stderr,
        disable=True if not writes or progress is False else None if progress is None else False,
        dynamic_ncols=True,
    )  # fmt: skip
    interval_time, interval_tokens = 0.0, 0
    train_mask = run.data.mask("train")  # chat data: targets outside assistant turns are -1
    pending = PendingLosses()  # on a GPU: read at a log line, an evaluation or a checkpoint
    pending.losses = result.train_losses
    try:
        run.optimizer = mode.setup(
            run.model, run.optimizer, t.micro_batch_size, t.grad_accum_steps, run.block_size,
            t.seed, t.matmul_precision, t.autocast_precision(),
        )  # fmt: skip
        if (line := mode.describe()) is not None:
            mode.say(line)
        while run.step < t.max_steps:
            step_start = time.perf_counter()
            lr = cosine_with_warmup(
                run.step, max_lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
                decay_steps=cfg.decay_steps,
            )  # fmt: skip
            x, y = get_batch(
                run.data.train, cfg.global_batch_size, run.block_size, run.rng, train_mask
            )
            losses = mode.gradients(run.step, x, y)
            stats = mode.clip_and_step(run.step, losses, lr, o.grad_clip)
            run.step += 1
            run.tokens_seen += tokens_per_step
            step, last = run.step, run.step == t.max_steps
            evaluating = ev_cfg.batches > 0 and (
                last or (ev_cfg.interval > 0 and step % ev_cfg.interval == 0)
            )
            logging = step % t.log_interval == 0 or last or evaluating
            saving = last or (t.checkpoint_interval > 0 and step % t.checkpoint_interval == 0)
            read = pending.add(step, stats, read=logging or saving)  # None: still on the GPU
            interval_time += time.perf_counter() - step_start
            interval_tokens += tokens_per_step
            tok_s = interval_tokens / interval_time if interval_time > 0 else 0.0
            bar.update(1)
            if read is not None:
                bar.set_postfix(loss=f"{read.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")

            if logging:
                record = {"step": step, "tokens": run.tokens_seen, "train_loss": read.loss,
                          "lr": lr, "grad_norm": read.grad_norm, "tokens_per_s": tok_s,
                          "elapsed_s": 0.0}  # fmt: skip
                if evaluating:
                    result.final_eval = run_evaluation(run, step, read.loss, metrics)
                    record.update(result.final_eval.as_dict())
                record["elapsed_s"] = elapsed()
                metrics.log(record)
                if evaluating:
                    metrics.plot(run.out / "loss.png", title=f"{cfg.name}: {run.out}")
                elif bar.disable:
                    mode.say(
                        f"step {step}/{t.max_steps}: loss {read.loss:.4f}, lr {lr:.2e}, "
                        f"grad norm {read.grad_norm:.3f}, {tok_s:,.0f} tok/s"
                    )
                interval_time, interval_tokens = 0.0, 0
            if saving:
                result.checkpoint = save_run_checkpoint(run, elapsed())
    except TrainingDiverged as err:  # every rank sees the same reduced losses and norms
        latest = latest_text(run.out)
        raise mode.diverged(f"{err} The latest checkpoint is left as it was: {latest}") from None
    except BaseException as err:
        mode.abort(err)  # under MPI: end every rank, naming this one
        raise
    finally:
        bar.close()
        metrics.close()
        mode.close()
    result.step, result.tokens_seen, result.elapsed_s = run.step, run.tokens_seen, elapsed()
    if result.checkpoint is None and resumed:
        result.checkpoint = run.resumed_from
    if ev_cfg.batches > 0 and len(run.data.val) and train_mask is None:
        result.unigram_loss = unigram_loss(run.data.train, run.data.val, run.data.vocab_size)
    return result
