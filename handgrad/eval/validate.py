"""``handgrad eval``: validation metrics of a checkpoint on prepared token shards.

The numbers are the trainer's own (``handgrad.parallel.evaluate``, the same fixed, evenly spaced
windows of ``iter_batches_sequential``), so ``handgrad eval`` on the checkpoint and data of a
run reproduces the run's last ``val_loss`` exactly:

    loss            mean next-token cross entropy, nats per token
    perplexity      exp(loss)
    bits_per_token  loss / ln 2
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from handgrad.checkpoint import read_config, read_json, resolve_checkpoint
from handgrad.eval.load import load_model
from handgrad.manifest import hash_file


def validation_metrics(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    split: str = "val",
    batches: int | None = None,
    batch_size: int | None = None,
    block_size: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the ``split`` of the prepared directory ``data`` (by default
    the data the run trained on, as its trainer_state.json records it), with the model on
    ``device`` (the CPU when None).

    ``batches``, ``batch_size`` and ``block_size`` default to the run's own, so the numbers
    are the trainer's: [eval] batches, micro_batch_size x processes windows per batch (the
    trainer evaluates whole micro batches over all its processes) and the training
    block_size, from the checkpoint's config.json."""
    from handgrad.data import TokenShards
    from handgrad.parallel import evaluate

    ckpt = resolve_checkpoint(checkpoint)
    config = read_config(ckpt)
    train_cfg, eval_cfg = config.get("train", {}), config.get("eval", {})
    model = load_model(ckpt, device)
    batches = int(batches if batches is not None else eval_cfg.get("batches", 20))
    if batch_size is None:
        batch_size = int(train_cfg.get("micro_batch_size", 8)) * int(train_cfg.get("processes", 1))
    block_size = int(
        block_size
        if block_size is not None
        else train_cfg.get("block_size") or model.config.block_size
    )
    if block_size > model.config.block_size:
        raise ValueError(
            f"eval: block_size {block_size} exceeds the model's block_size "
            f"{model.config.block_size}"
        )
    if data is None:
        data = _run_data(ckpt)
    shards = TokenShards(data)
    if shards.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"eval: {data} has {shards.vocab_size} token ids but the model's vocabulary is "
            f"{model.config.vocab_size}: the data was made with another tokenizer"
        )
    _check_same_tokenizer(ckpt, shards.tokenizer_path)
    result = evaluate(
        model, shards.split(split), batches, batch_size, block_size, mask=shards.mask(split)
    )
    return {
        "checkpoint": str(ckpt),
        "data": str(Path(data)),
        "split": split,
        "batches": batches,
        "batch_size": batch_size,
        "block_size": block_size,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "bits_per_token": result.bits_per_token,
        "tokens": result.tokens,
    }


def _run_data(ckpt: Path) -> Path:
    """The prepared directory the run of ``ckpt`` trained on (its trainer_state.json)."""
    try:
        recorded = read_json(ckpt / "trainer_state.json")["data"]["dir"]
    except (FileNotFoundError, KeyError, TypeError):
        raise ValueError(
            f"eval: {ckpt} does not record the data it was trained on (no trainer_state.json "
            "with a data directory, as an `import hf` output): give --data DIR"
        ) from None
    if not (Path(recorded) / "meta.json").is_file():
        raise ValueError(
            f"eval: {ckpt} was trained on {recorded}, which holds no prepared data any more "
            "(moved, or a cache cleared?): give --data DIR"
        )
    return Path(recorded)


def _check_same_tokenizer(ckpt: Path, data_tokenizer: Path) -> None:
    """Refuse data made with another tokenizer than the checkpoint's (compared by sha256)."""
    state_path = ckpt / "trainer_state.json"
    expected = None
    if state_path.is_file():
        expected = (read_json(state_path).get("data") or {}).get("tokenizer_sha256")
    if expected is None and (ckpt / "tokenizer.json").is_file():
        expected = hash_file(ckpt / "tokenizer.json", "sha256")
    if expected is not None and data_tokenizer.is_file():
        actual = hash_file(data_tokenizer, "sha256")
        if actual != expected:
            raise ValueError(
                f"eval: {data_tokenizer} (sha256 {actual[:12]}...) is not the tokenizer the "
                f"checkpoint {ckpt} was trained with ({expected[:12]}...)"
            )


def format_metrics(m: dict[str, Any]) -> str:
    return (
        f"{m['split']} loss {m['loss']:.4f} nats | perplexity {m['perplexity']:.3f} | "
        f"{m['bits_per_token']:.4f} bits/token | {m['tokens']:,} tokens "
        f"({m['batches']} batches x {m['batch_size']} x {m['block_size']})"
    )
