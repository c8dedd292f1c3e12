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

Drawing the whole global batch at once makes the data of a step independent of how it is
split into micro batches, so micro 4 x accum 2 trains on exactly what micro 8 x accum 1 does.

Everything random comes from two generators: handgrad's global one (initialisation and
dropout, seeded with ``handgrad.manual_seed(seed)``) and one NumPy generator for the data
(``default_rng(seed)``). Both states go into every checkpoint, so a resumed run continues
bit for bit where the first one stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import handgrad
from handgrad.data import TokenShards, get_batch, prepare
from handgrad.data.sources import BUILTIN_SOURCES, cache_dir, sha256_file
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import AdamW, cosine_with_warmup, param_groups_for_weight_decay
from handgrad.tensor import get_rng_state, manual_seed, set_rng_state
from handgrad.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from handgrad.train.config import ConfigError, DataSection, TrainConfig, resolve_model_config
from handgrad.train.evaluate import EvalResult, evaluate, unigram_loss
from handgrad.train.metrics import MetricsLog, plot_losses
from handgrad.train.parallel import DistributedDataParallel, accumulate_gradients, can_fork

# GPT2Config fields that fix the shapes (and storage) of the weights: a checkpoint can only
# be resumed by a model that agrees on all of them. dropout may change between runs.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "padded_vocab_size",
                "bias", "dtype")  # fmt: skip


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


# ----------------------------------------------------------------------------------------
# data: a prepared directory, or a raw source prepared once into the cache


def _source_identity(source: str) -> dict[str, Any]:
    if source in BUILTIN_SOURCES:
        ident: dict[str, Any] = {"builtin": source}
        if source == "pydocs":  # the corpus is this Python's documentation
            ident["python"] = list(sys.version_info[:2])
        return ident
    path = Path(source).expanduser()
    ident = {"path": str(path.resolve())}
    if path.is_file():  # a changed file gets a new cache entry
        st = path.stat()
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return ident


def data_cache_key(data: DataSection) -> str:
    """The cache entry name of a raw source: readable prefix + hash of what determines it."""
    tok = data.tokenizer or ""
    tok_ident = sha256_file(tok) if tok.endswith(".json") and Path(tok).is_file() else tok
    ident = {
        "source": _source_identity(data.source),
        "tokenizer": tok_ident,
        "val_fraction": data.val_fraction,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(data.source).stem or data.source).strip("-")
    tok_slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(tok).stem if tok.endswith(".json") else tok)
    return f"{stem[:40]}-{tok_slug.strip('-')[:24]}-{digest}"


def prepared_data_dir(data: DataSection, progress: bool | None = None) -> Path:
    """The prepared directory for ``[data]``: ``source`` itself when it already holds
    meta.json, else a cache entry, prepared on first use (``data prepare`` writes meta.json
    last, so an interrupted preparation is simply redone)."""
    source = Path(data.source).expanduser()
    if (source / "meta.json").is_file():
        if data.tokenizer is not None:
            raise ConfigError(
                f"[data] tokenizer = {data.tokenizer!r}, but source {data.source} is already "
                "prepared with its own tokenizer.json; remove [data] tokenizer"
            )
        return source
    if data.tokenizer is None:
        raise ConfigError(
            f"[data] tokenizer is required to prepare source {data.source!r} "
            "('char', 'train:N' or a tokenizer .json file)"
        )
    root = Path(data.cache_dir).expanduser() if data.cache_dir else cache_dir() / "prepared"
    out = root / data_cache_key(data)
    if not (out / "meta.json").is_file():
        print(
            f"preparing {data.source} with tokenizer {data.tokenizer} into {out}", file=sys.stderr
        )
        prepare(
            data.source,
            data.tokenizer,
            out,
            val_fraction=data.val_fraction,
            workers=data.workers,
            progress=progress is not False,
        )
    return out


# ----------------------------------------------------------------------------------------
# model config


def check_same_model(saved: GPT2Config, wanted: GPT2Config, where: Path) -> None:
    diffs = [
        f"{k}: {getattr(saved, k)!r} in the checkpoint, {getattr(wanted, k)!r} in the config"
        for k in SHAPE_FIELDS
        if getattr(saved, k) != getattr(wanted, k)
    ]
    if diffs:
        raise CheckpointError(
            f"{where}: the checkpoint's model does not match the config's, refusing to resume:\n  "
            + "\n  ".join(diffs)
        )


def build_optimizer(model: GPT2, cfg: TrainConfig) -> AdamW:
    o = cfg.optim
    return AdamW(
        param_groups_for_weight_decay(model, o.weight_decay),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )


# ----------------------------------------------------------------------------------------
# sampling text for the log


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from end-of-text (a document boundary) or,
    for tokenizers without one, from a newline (or id 0 if even that is not encodable)."""
    if prompt:
        return tokenizer.encode(prompt)
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    try:
        ids = tokenizer.encode("\n")
    except (KeyError, ValueError):
        ids = []
    return ids or [0]


def sample_text(
    model: GPT2,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> str:
    ids = prompt_ids(tokenizer, prompt)
    out = model.generate(
        np.asarray([ids], dtype=np.int64),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,  # its own generator: sampling never moves the training RNG
    )
    new = [int(t) for t in out[0, len(ids) :]]
    return prompt + tokenizer.decode(new)


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
    ``out``. ``resume`` is a checkpoint or run directory. ``progress`` None shows the bar on
    a terminal only. ``log`` is where status lines go (default: stderr via tqdm.write).
    Raises ConfigError, CheckpointError (before training starts) or TrainingDiverged."""
    started = time.perf_counter()
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    out = Path(out)
    t, o, e = cfg.train, cfg.optim, cfg.eval

    # ---- everything that can be refused is checked before any training work
    data = TokenShards(prepared_data_dir(cfg.data, progress))
    model_cfg = resolve_model_config(cfg.model, data.vocab_size)
    if data.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"the data ({data.dir}) has {data.vocab_size} token ids but [model] vocab_size is "
            f"{model_cfg.vocab_size}; remove vocab_size to take it from the data"
        )
    block_size = t.block_size or model_cfg.block_size
    if block_size > model_cfg.block_size:
        raise ConfigError(
            f"[train] block_size = {block_size} is above the model's block_size = "
            f"{model_cfg.block_size}"
        )
    for name, split in (("train", data.train), ("val", data.val)):
        if name == "val" and e.batches == 0:
            continue
        if len(split) < block_size + 1:
            raise ConfigError(
                f"{data.dir}: the {name} split has {len(split)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}"
            )
    tokenizer_sha = sha256_file(data.tokenizer_path)
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        try:
            saved_cfg = GPT2Config.from_dict(ckpt.config["model"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{ckpt.path / 'config.json'}: bad model section: {err}"
            ) from None
        check_same_model(saved_cfg, model_cfg, ckpt.path)
        saved_sha = ckpt.trainer_state.get("data", {}).get("tokenizer_sha256")
        if saved_sha is not None and saved_sha != tokenizer_sha:
            raise CheckpointError(
                f"{ckpt.path}: trained with another tokenizer (sha256 {saved_sha[:12]}...) than "
                f"the data's {data.tokenizer_path} ({tokenizer_sha[:12]}...); refusing to resume"
            )

    # ---- build
    manual_seed(t.seed)
    model = GPT2(model_cfg)
    optimizer = build_optimizer(model, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    rng = np.random.default_rng(t.seed)
    step, tokens_seen, elapsed_before, best_val = 0, 0, 0.0, math.inf
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt.model)
        except RuntimeError as err:
            raise CheckpointError(f"{ckpt.path / 'model.safetensors'}: {err}") from None
        try:
            optimizer.load_state_dict(ckpt.optimizer)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.path / 'optimizer.safetensors'}: {err}") from None
        state = ckpt.trainer_state
        try:
            set_rng_state(state["rng_state"])
            rng.bit_generator.state = state["data_rng_state"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{ckpt.path / 'trainer_state.json'}: bad RNG state ({err})"
            ) from None
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        best = state.get("best_val_loss")
        best_val = math.inf if best is None else float(best)
        say(f"resuming from {ckpt.path} at step {step} ({tokens_seen:,} tokens seen)")

    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_dict()
    resolved["model"] = model_cfg.to_dict()
    resolved["train"]["block_size"] = block_size
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if ckpt is not None else None)
    tokenizer = data.load_tokenizer()
    global_batch = cfg.global_batch_size
    tokens_per_step = global_batch * block_size
    decay_steps = o.decay_steps if o.decay_steps is not None else t.max_steps
    n_params = model.num_parameters()
    say(
        f"{n_params:,} parameters ({model_cfg.dtype}), data {data.dir} "
        f"(train {len(data.train):,} / val {len(data.val):,} tokens, vocab {data.vocab_size}); "
        f"global batch {global_batch} x {block_size} = {tokens_per_step:,} tokens/step"
    )

    result = TrainResult(out, step, tokens_seen, elapsed_before)

    def checkpoint(at_step: int) -> Path:
        trainer_state = {
            "step": at_step,
            "tokens_seen": tokens_seen,
            "rng_state": get_rng_state(),
            "data_rng_state": rng.bit_generator.state,
            "best_val_loss": None if math.isinf(best_val) else best_val,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
            "data": {
                "dir": str(data.dir.resolve()),
                "vocab_size": data.vocab_size,
                "tokenizer_sha256": tokenizer_sha,
            },
            "handgrad_version": handgrad.__version__,
        }
        path = save_checkpoint(
            out, at_step, model, optimizer, resolved, trainer_state, data.tokenizer_path,
            t.keep_checkpoints,
        )  # fmt: skip
        result.checkpoint = path
        return path

    def run_eval(at_step: int, train_loss: float | None) -> EvalResult:
        nonlocal best_val
        ev = evaluate(model, data.val, e.batches, rows, block_size)
        if not math.isfinite(ev.loss):
            raise TrainingDiverged(
                f"step {at_step}: validation loss is {ev.loss}; stopping (latest checkpoint "
                f"left as it was: {_latest_text(out)})"
            )
        best_val = min(best_val, ev.loss)
        tl = f"train {train_loss:.4f}, " if train_loss is not None else ""
        say(
            f"step {at_step}: {tl}val {ev.loss:.4f} nats (ppl {ev.perplexity:.2f}, "
            f"{ev.bits_per_token:.3f} bits/token)"
        )
        if t.sample_tokens > 0:
            text = sample_text(
                model, tokenizer, e.sample_prompt, t.sample_tokens, e.sample_temperature,
                e.sample_top_k, seed=t.seed + at_step,
            )  # fmt: skip
            say("sample: " + text.replace("\n", "\n        "))
        return ev

    # Rows of one micro batch over all processes; evaluation uses batches of this size too,
    # so its numbers do not depend on how the batch is split.
    rows = t.micro_batch_size * t.processes
    dp = None
    if t.processes > 1 and can_fork():
        dp = DistributedDataParallel(model, t.processes, global_batch, block_size, t.seed)
        say(
            f"data parallel: {t.processes} processes x {t.micro_batch_size} windows per micro batch"
        )
    elif t.processes > 1:
        say(
            f"[train] processes = {t.processes}, but this platform cannot fork worker processes: "
            f"each micro batch of {rows} windows runs in this one process (same batches, same "
            "mean gradient, slower)"
        )
    bar = tqdm(
        total=t.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=False if progress else None if progress is None else True,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    interval_time, interval_tokens = 0.0, 0
    try:
        while step < t.max_steps:
            step_start = time.perf_counter()
            lr = cosine_with_warmup(
                step, max_lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
                decay_steps=decay_steps,
            )  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            x_all, y_all = get_batch(data.train, global_batch, block_size, rng)
            # The mean over the global batch = the mean of the micro-batch means.
            scale = 1.0 / (t.grad_accum_steps * (1 if dp is None else dp.processes))
            if dp is None:
                micro = [
                    (x_all[i : i + rows], y_all[i : i + rows]) for i in range(0, global_batch, rows)
                ]
                losses = accumulate_gradients(model, micro, scale)
            else:
                losses = dp.forward_backward(step, x_all, y_all, t.micro_batch_size, scale)
            for i, value in enumerate(losses):
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"step {step + 1}: training loss is {value} (micro batch {i + 1} of "
                        f"{t.grad_accum_steps}, lr {lr:.3g}); stopping. The latest checkpoint "
                        f"is left as it was: {_latest_text(out)}"
                    )
            train_loss = sum(losses) / t.grad_accum_steps
            clip = o.grad_clip if o.grad_clip > 0 else math.inf
            grad_norm = float(clip_grad_norm_(params, clip).item())
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(
                    f"step {step + 1}: gradient norm is {grad_norm} (training loss "
                    f"{train_loss:.4f}); stopping before the update. The latest checkpoint is "
                    f"left as it was: {_latest_text(out)}"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            result.train_losses[step] = train_loss
            interval_time += time.perf_counter() - step_start
            interval_tokens += tokens_per_step
            tok_s = interval_tokens / interval_time if interval_time > 0 else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")

            last = step == t.max_steps
            evaluating = e.batches > 0 and (last or (e.interval > 0 and step % e.interval == 0))
            if step % t.log_interval == 0 or last or evaluating:
                record = {
                    "step": step,
                    "tokens": tokens_seen,
                    "train_loss": train_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tok_s,
                    "elapsed_s": elapsed_before + time.perf_counter() - started,
                }
                if evaluating:
                    ev = run_eval(step, train_loss)
                    result.final_eval = ev
                    record.update(ev.as_dict())
                    record["elapsed_s"] = elapsed_before + time.perf_counter() - started
                metrics.log(record)
                if bar.disable and not evaluating:
                    say(
                        f"step {step}/{t.max_steps}: loss {train_loss:.4f}, lr {lr:.2e}, "
                        f"grad norm {grad_norm:.3f}, {tok_s:,.0f} tok/s"
                    )
                if evaluating:
                    plot_losses(metrics.records, out / "loss.png", title=f"{cfg.name}: {out}")
                interval_time, interval_tokens = 0.0, 0
            if last or (t.checkpoint_interval > 0 and step % t.checkpoint_interval == 0):
                checkpoint(step)
    finally:
        bar.close()
        metrics.close()
        if dp is not None:
            dp.close()
    result.step, result.tokens_seen = step, tokens_seen
    result.elapsed_s = elapsed_before + time.perf_counter() - started
    if result.checkpoint is None and ckpt is not None:
        result.checkpoint = ckpt.path
    if e.batches > 0 and len(data.val):
        result.unigram_loss = unigram_loss(data.train, data.val, data.vocab_size)
    return result


def _latest_text(out: Path) -> str:
    latest = out / "latest"
    if latest.is_file():
        return str(out / latest.read_text(encoding="utf-8").strip())
    return "none saved yet"
