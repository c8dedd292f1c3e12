"""The training loop: data -> GPT-2 -> loss -> gradients -> AdamW -> checkpoints.

One optimizer step, with G = micro_batch_size x grad_accum_steps x processes windows (the
global batch):

    lr    = warmup + cosine schedule at this step
    x, y  = G random windows of block_size + 1 tokens, cut into grad_accum_steps micro batches
    for each micro batch:  (loss / grad_accum_steps).backward()    # grads sum to the mean
                           (with processes = P > 1, each micro batch is split over P
                           processes, loss / (grad_accum_steps P) each: train/parallel.py)
    norm  = clip_grad_norm_(params, grad_clip)
    AdamW step (decay on 2-D weights only; fp32 master weights for bf16 parameters)

Building the run (``build_run``), one step (``train_step``) and evaluation / checkpoints
(``run_evaluation``, ``save_run_checkpoint``) are each one function; ``train`` is the loop
around them. The data cache (raw source -> prepared shards) is ``handgrad.data.cache``.

Drawing the whole global batch at once makes the data of a step independent of how it is
split into micro batches, so micro 4 x accum 2 trains on exactly what micro 8 x accum 1 does.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import handgrad
from handgrad.backend import cuda
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
from handgrad.manifest import hash_file as sha256_file
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import AdamW, cosine_with_warmup, param_groups_for_weight_decay
from handgrad.random import get_rng_state, manual_seed, set_rng_state
from handgrad.train import ranks
from handgrad.train.checkpointing import Checkpoint, load_checkpoint, save_checkpoint
from handgrad.train.config import ConfigError, TrainConfig, resolve_model_config
from handgrad.train.evaluate import EvalResult, evaluate, unigram_loss
from handgrad.train.gradients import GradientFn, gradient_function
from handgrad.train.hardware import hardware_info
from handgrad.train.on_device import (
    NonFiniteLoss,
    PendingLosses,
    mean_on_device,
)
from handgrad.train.parallel import DistributedDataParallel
from handgrad.train.ranks import RankStopped
from handgrad.train.runlog import MetricsLog, plot_losses
from handgrad.train.sampling import sample_text
from handgrad.train.zero import ZeroAdamW

__all__ = [
    "Run",
    "StepResult",
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "build_run",
    "run_evaluation",
    "save_run_checkpoint",
    "train",
    "train_step",
]


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped."""


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
    rank: int = 0  # this process's rank under MPI (only rank 0 reports)


# ----------------------------------------------------------------------------------------
# building the run: data, model, optimizer, and the state of a run being resumed


@dataclass
class Run:
    """Everything a training run is made of, built (or restored from a checkpoint) before
    the first step; ``step``, ``tokens_seen`` and ``best_val`` move as it trains."""

    cfg: TrainConfig
    out: Path
    data: TokenShards
    model_cfg: GPT2Config
    model: GPT2
    optimizer: AdamW
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
    group: Any = None  # the MPI process group (train/ranks.py); None in one process

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank

    @property
    def rows(self) -> int:
        """Rows of one micro batch over all processes; evaluation uses batches of this size
        too, so its numbers do not depend on how the batch is split."""
        return self.cfg.train.micro_batch_size * self.cfg.train.processes


def build_optimizer(model: GPT2, cfg: TrainConfig) -> AdamW:
    o = cfg.optim
    return AdamW(
        param_groups_for_weight_decay(model, o.weight_decay),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )


def build_run(
    cfg: TrainConfig,
    out: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    progress: bool | None = None,
    say: Callable[[str], None] = print,
    group: Any = None,
) -> Run:
    """Prepare the data, check everything that can be refused (before any training work),
    build the model and optimizer, restore them from ``resume`` (a checkpoint, a run
    directory or its ``latest`` file) and write ``<out>/config.json``. With an MPI
    ``group``, rank 0 prepares the data before the others read it and alone writes."""
    t = cfg.train
    try:
        data = TokenShards(ranks.rank0_first(group, lambda: prepared_data_dir(cfg.data, progress)))
    except DataSpecError as err:
        raise ConfigError(str(err)) from None
    model_cfg, block_size = _check_model_and_data(cfg, data)
    tokenizer_sha = sha256_file(data.tokenizer_path)
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        _check_resumable(ckpt, model_cfg, data, tokenizer_sha)

    manual_seed(t.seed)
    # built (and initialised from the host generator) on the CPU, then moved: the same
    # seed gives the same weights on every device
    model = GPT2(model_cfg).to(ranks.rank_device(t.device, group))
    if model.device.type == "cuda":
        cuda.set_matmul_precision(t.matmul_precision)
    optimizer = build_optimizer(model, cfg)
    if t.zero and group is not None:
        optimizer = ZeroAdamW(optimizer, group)  # type: ignore[assignment]
    resolved = cfg.to_dict()
    resolved["model"] = model_cfg.to_dict()
    resolved["train"]["block_size"] = block_size
    run = Run(
        cfg, Path(out), data, model_cfg, model, optimizer, np.random.default_rng(t.seed),
        data.load_tokenizer(), tokenizer_sha, block_size, resolved, group=group,
    )  # fmt: skip
    if ckpt is not None:
        _restore(run, ckpt)
        say(f"resuming from {ckpt.path} at step {run.step} ({run.tokens_seen:,} tokens seen)")
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.out / "config.json", resolved)
    return run


def _check_model_and_data(cfg: TrainConfig, data: TokenShards) -> tuple[GPT2Config, int]:
    """The model config for this data, and the training block size; refuse a vocabulary
    smaller than the data's, a block size above the model's, or splits too short."""
    model_cfg = resolve_model_config(cfg.model, data.vocab_size)
    if data.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"the data ({data.dir}) has {data.vocab_size} token ids but [model] vocab_size is "
            f"{model_cfg.vocab_size}; remove vocab_size to take it from the data"
        )
    block_size = cfg.train.block_size or model_cfg.block_size
    if block_size > model_cfg.block_size:
        raise ConfigError(
            f"[train] block_size = {block_size} is above the model's block_size = "
            f"{model_cfg.block_size}"
        )
    for name, split in (("train", data.train), ("val", data.val)):
        if name == "val" and cfg.eval.batches == 0:
            continue
        if len(split) < block_size + 1:
            raise ConfigError(
                f"{data.dir}: the {name} split has {len(split)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}"
            )
    return model_cfg, block_size


def _check_resumable(
    ckpt: Checkpoint, model_cfg: GPT2Config, data: TokenShards, tokenizer_sha: str
) -> None:
    """Refuse a checkpoint of another model shape, or trained on another tokenizer's ids."""
    try:
        saved = GPT2Config.from_dict(ckpt.config["model"])
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
# one training step


@dataclass
class StepResult:
    # mean training loss over the global batch and global gradient norm before clipping:
    # floats on the CPU; 0-d device arrays on a GPU, read later (see train/on_device.py)
    loss: Any
    grad_norm: Any


def _gradient_fn(
    run: Run, say: Callable[[str], None]
) -> tuple[DistributedDataParallel | None, GradientFn]:
    """How this run's gradients are made (``train.gradients.gradient_function``)."""
    return gradient_function(
        run.model, run.cfg.train, run.cfg.global_batch_size, run.rows, run.block_size,
        run.group, isinstance(run.optimizer, ZeroAdamW), say,
    )  # fmt: skip


def train_step(
    optimizer: AdamW,
    gradients: GradientFn,
    step: int,
    x: np.ndarray,
    y: np.ndarray,
    lr: float,
    grad_accum_steps: int,
    grad_clip: float,
) -> StepResult:
    """One optimizer step on the global batch ``x``, ``y`` (G, T) int64 (targets = inputs
    shifted by one token):

        lr of every param group = ``lr``
        losses = gradients(step, x, y)      # grad = sum_i scale * dloss_i, scale = 1 / (A P)
        loss   = sum(losses) / A            # A = grad_accum_steps micro batches
        norm   = clip_grad_norm_(params, grad_clip)    # grad_clip 0: no clipping
        optimizer step, gradients set to None

    Raises TrainingDiverged before the update when a loss or the gradient norm is not finite
    (the parameters are left as they were)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = gradients(step, x, y)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if losses and not isinstance(losses[0], float):  # device values: nothing read back
        max_norm = grad_clip if grad_clip > 0 else math.inf
        if isinstance(optimizer, ZeroAdamW):  # a 0-d device array, as below
            norm = optimizer.reduce_and_clip(max_norm)
        else:
            norm = clip_grad_norm_(params, max_norm).data
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(mean_on_device(losses, grad_accum_steps), norm)
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"step {step + 1}: training loss is {value} (micro batch {i + 1} of "
                f"{grad_accum_steps}, lr {lr:.3g}); stopping."
            )
    loss = sum(losses) / grad_accum_steps
    max_norm = grad_clip if grad_clip > 0 else math.inf
    if isinstance(optimizer, ZeroAdamW):  # reduce-scatter; the norm over every rank's slice
        grad_norm = optimizer.reduce_and_clip(max_norm)
    else:
        grad_norm = float(clip_grad_norm_(params, max_norm).item())
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"step {step + 1}: gradient norm is {grad_norm} (training loss {loss:.4f}); "
            "stopping before the update."
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm)


# ----------------------------------------------------------------------------------------
# evaluation and checkpoints


def run_evaluation(
    run: Run,
    at_step: int,
    train_loss: float | None,
    say: Callable[[str], None],
    metrics: MetricsLog | None = None,
) -> EvalResult:
    """Validation loss on ``[eval] batches`` fixed batches (and a sample, if asked, which goes
    to ``metrics``' loggers as text), logged."""
    ev_cfg, t = run.cfg.eval, run.cfg.train
    if run.group is None:
        ev = evaluate(run.model, run.data.val, ev_cfg.batches, run.rows, run.block_size)
    else:
        ev = ranks.evaluate_split(
            run.model, run.data.val, ev_cfg.batches, run.rows, run.block_size, run.group
        )
    if not math.isfinite(ev.loss):
        raise TrainingDiverged(
            f"step {at_step}: validation loss is {ev.loss}; stopping (latest checkpoint "
            f"left as it was: {latest_text(run.out)})"
        )
    run.best_val = min(run.best_val, ev.loss)
    tl = f"train {train_loss:.4f}, " if train_loss is not None else ""
    say(
        f"step {at_step}: {tl}val {ev.loss:.4f} nats (ppl {ev.perplexity:.2f}, "
        f"{ev.bits_per_token:.3f} bits/token)"
    )
    if t.sample_tokens > 0 and run.rank == 0:
        text = sample_text(
            run.model, run.tokenizer, ev_cfg.sample_prompt, t.sample_tokens,
            ev_cfg.sample_temperature, ev_cfg.sample_top_k, seed=t.seed + at_step,
        )  # fmt: skip
        say("sample: " + text.replace("\n", "\n        "))
        if metrics is not None:
            metrics.log_text(at_step, text)
    return ev


def save_run_checkpoint(run: Run, elapsed_s: float) -> Path:
    """The checkpoint of ``run.step`` (published as latest; older ones pruned); under MPI
    rank 0 writes it while the others wait at a barrier."""
    path = run.out / CHECKPOINTS / step_dir_name(run.step)
    if isinstance(run.optimizer, ZeroAdamW):
        run.optimizer.gather_state(dst=0)  # every rank: AdamW's state, to rank 0
    if run.rank == 0:
        path = _save_checkpoint_files(run, elapsed_s)
    if run.group is not None:
        run.group.barrier()
    return path


def _save_checkpoint_files(run: Run, elapsed_s: float) -> Path:
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
        "hardware": hardware_info(run.cfg.train.processes, run.cfg.train.device),
    }
    return save_checkpoint(
        run.out, run.step, run.model, run.optimizer, run.resolved, trainer_state,
        run.data.tokenizer_path, run.cfg.train.keep_checkpoints,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# sampling text for the log


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
    starts) or TrainingDiverged. Under an MPI launcher every rank calls this and trains
    its share of each batch (train/ranks.py); the others raise RankStopped when one rank
    refuses to start."""
    started = time.perf_counter()
    group, cfg = ranks.join_mpi_group(cfg)
    rank0 = group is None or group.rank == 0
    say = (log or (lambda msg: tqdm.write(msg, file=sys.stderr))) if rank0 else (lambda msg: None)
    run = ranks.agree(
        group, lambda: build_run(cfg, out, resume, progress if rank0 else False, say, group)
    )
    t, o, ev_cfg = cfg.train, cfg.optim, cfg.eval
    resumed = run.resumed_from is not None
    metrics = (
        MetricsLog(
            run.out / "metrics.jsonl",
            resume_step=run.step if resumed else None,
            loggers=t.loggers,
            config=run.resolved,
        )
        if rank0
        else ranks.NullMetrics()
    )
    tokens_per_step = cfg.global_batch_size * run.block_size
    decay_steps = o.decay_steps if o.decay_steps is not None else t.max_steps
    say(
        f"{run.model.num_parameters():,} parameters ({run.model_cfg.dtype}), data "
        f"{run.data.dir} (train {len(run.data.train):,} / val {len(run.data.val):,} tokens, "
        f"vocab {run.data.vocab_size}); global batch {cfg.global_batch_size} x "
        f"{run.block_size} = {tokens_per_step:,} tokens/step"
    )
    result = TrainResult(run.out, run.step, run.tokens_seen, run.elapsed_before, rank=run.rank)

    def elapsed() -> float:
        return run.elapsed_before + time.perf_counter() - started

    dp, gradients = _gradient_fn(run, say)
    bar = tqdm(
        total=t.max_steps,
        initial=run.step,
        desc="train",
        unit="step",
        disable=True if not rank0 or progress is False else None if progress is None else False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    interval_time, interval_tokens = 0.0, 0
    # on a GPU, losses stay on the device until a log line, an evaluation or a checkpoint
    pending = PendingLosses() if run.model.device.type != "cpu" else None
    try:
        while run.step < t.max_steps:
            step_start = time.perf_counter()
            lr = cosine_with_warmup(
                run.step, max_lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
                decay_steps=decay_steps,
            )  # fmt: skip
            # The whole global batch is drawn at once, so the data of a step does not depend
            # on how it is split into micro batches and processes.
            x, y = get_batch(run.data.train, cfg.global_batch_size, run.block_size, run.rng)
            try:
                stepped = train_step(
                    run.optimizer, gradients, run.step, x, y, lr, t.grad_accum_steps, o.grad_clip
                )
            except TrainingDiverged as err:
                raise TrainingDiverged(
                    f"{err} The latest checkpoint is left as it was: {latest_text(run.out)}"
                ) from None
            run.step += 1
            run.tokens_seen += tokens_per_step
            step, last = run.step, run.step == t.max_steps
            evaluating = ev_cfg.batches > 0 and (
                last or (ev_cfg.interval > 0 and step % ev_cfg.interval == 0)
            )
            logging = step % t.log_interval == 0 or last or evaluating
            saving = last or (t.checkpoint_interval > 0 and step % t.checkpoint_interval == 0)
            if pending is None:
                result.train_losses[step] = stepped.loss
            else:
                pending.add(step, stepped.loss, stepped.grad_norm)
            if pending is not None and (logging or saving):
                try:
                    stepped = StepResult(*pending.read_into(result.train_losses, step))
                except NonFiniteLoss as err:
                    latest = latest_text(run.out)
                    raise TrainingDiverged(
                        f"{err} The latest checkpoint is left as it was: {latest}"
                    ) from None
            interval_time += time.perf_counter() - step_start
            interval_tokens += tokens_per_step
            tok_s = interval_tokens / interval_time if interval_time > 0 else 0.0
            bar.update(1)
            if isinstance(stepped.loss, float):
                bar.set_postfix(loss=f"{stepped.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")

            if logging:
                record = {
                    "step": step,
                    "tokens": run.tokens_seen,
                    "train_loss": stepped.loss,
                    "lr": lr,
                    "grad_norm": stepped.grad_norm,
                    "tokens_per_s": tok_s,
                    "elapsed_s": elapsed(),
                }
                if evaluating:
                    result.final_eval = run_evaluation(run, step, stepped.loss, say, metrics)
                    record.update(result.final_eval.as_dict())
                    record["elapsed_s"] = elapsed()
                metrics.log(record)
                if bar.disable and not evaluating:
                    say(
                        f"step {step}/{t.max_steps}: loss {stepped.loss:.4f}, lr {lr:.2e}, "
                        f"grad norm {stepped.grad_norm:.3f}, {tok_s:,.0f} tok/s"
                    )
                if evaluating and rank0:
                    plot_losses(
                        metrics.records, run.out / "loss.png", title=f"{cfg.name}: {run.out}"
                    )
                interval_time, interval_tokens = 0.0, 0
            if saving:
                result.checkpoint = save_run_checkpoint(run, elapsed())
    except TrainingDiverged:  # every rank sees the same reduced losses and norms
        if not rank0:
            raise RankStopped("training diverged (rank 0 reports it)") from None
        raise
    except BaseException as err:
        ranks.abort_job(group, err)  # under MPI: end every rank, naming this one
        raise
    finally:
        bar.close()
        metrics.close()
        if dp is not None:
            dp.close()
    result.step, result.tokens_seen, result.elapsed_s = run.step, run.tokens_seen, elapsed()
    if result.checkpoint is None and resumed:
        result.checkpoint = run.resumed_from
    if ev_cfg.batches > 0 and len(run.data.val):
        result.unigram_loss = unigram_loss(run.data.train, run.data.val, run.data.vocab_size)
    return result
