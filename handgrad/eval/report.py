"""``handgrad report``: the model card of a run, written from the run's own files.

Every number in the card is read from a file (nothing is typed in):

    metrics.jsonl               training metrics (the last and first validation records)
    <checkpoint>/config.json    architecture and training configuration
    <checkpoint>/trainer_state.json   steps and tokens seen
    <checkpoint>/tokenizer.json      tokenizer facts (vocabulary, merges, special tokens)
    lm-eval results JSON        zero-shot table (``handgrad eval zero-shot --output``)
    loss.png                    the loss curve, copied next to the card and linked relatively
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from handgrad.checkpoint import read_config, read_json, resolve_checkpoint, run_dir_of
from handgrad.diskspace import disk_full_guard
from handgrad.fileio import atomic_path, write_text_atomic

# Task names as the GPT-2 paper's table prints them.
TASK_TITLES = {
    "lambada_openai": "LAMBADA (OpenAI)",
    "hg_cbt_cn": "CBT-CN",
    "hg_cbt_ne": "CBT-NE",
    "hg_wikitext2": "WikiText-2",
    "hg_wikitext103": "WikiText-103",
    "hg_ptb": "PTB",
    "hg_enwik8": "enwik8",
    "hg_text8": "text8",
    "hg_lm1b": "One Billion Word",
}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of records; a bad line is an error naming its number."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the run's metrics log)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return records


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        if abs(x) >= 1e6 or (x != 0 and abs(x) < 10**-digits):
            return f"{x:.{digits}g}"
        return f"{x:,.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def training_section(records: list[dict[str, Any]], config: dict, state: dict) -> str:
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        raise ValueError("metrics.jsonl has no validation record (val_loss); nothing to report")
    first, last = evals[0], evals[-1]
    steps = state.get("step", records[-1].get("step"))
    planned = config.get("train", {}).get("max_steps")
    tokens = state.get("tokens_seen", records[-1].get("tokens"))
    per_step = tokens / steps if steps and tokens is not None else None
    rows = [
        ["Validation loss (nats/token)", _num(last["val_loss"])],
        ["Validation perplexity", _num(last.get("val_ppl", math.exp(last["val_loss"])))],
        ["Bits per token", _num(last.get("val_bpt", last["val_loss"] / math.log(2)))],
        ["Steps trained", f"{_num(steps)} of {_num(planned)} planned"],
        ["Tokens seen", _num(tokens)],
        ["Tokens per step", _num(int(per_step) if per_step == int(per_step or 0) else per_step)],
        [
            "Validation loss, start -> end",
            f"{_num(first['val_loss'])} (step {first['step']}) -> "
            f"{_num(last['val_loss'])} (step {last['step']})",
        ],
    ]
    if "elapsed_s" in records[-1]:
        rows.append(["Training time", f"{records[-1]['elapsed_s'] / 3600:.2f} h"])
    return "## Training metrics\n\n" + _table(["Metric", "Value"], rows, "lr") + "\n"


def zero_shot_rows(results: dict[str, Any]) -> list[list[str]]:
    """(task, metric, direction, value, stderr) from lm-eval's results JSON."""
    rows = []
    higher = results.get("higher_is_better", {})
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            up = higher.get(task, {}).get(metric)
            direction = "↑" if up else "↓" if up is not None else ""
            rows.append([
                TASK_TITLES.get(task, task),
                metric,
                direction,
                _num(float(value)),
                _num(float(stderr)) if isinstance(stderr, int | float) else "n/a",
            ])  # fmt: skip
    return rows


def zero_shot_section(path: Path | None) -> str:
    if path is None:
        return (
            "## Zero-shot results\n\nNot evaluated (run `handgrad eval zero-shot --output "
            "FILE.json` and pass `--zero-shot FILE.json`).\n"
        )
    results = read_json(path)
    if not isinstance(results, dict) or "results" not in results:
        raise ValueError(f"{path}: not an lm-eval results file (no 'results' key)")
    rows = zero_shot_rows(results)
    limit = (results.get("config") or {}).get("limit")
    note = f" on at most {limit} documents per task (--limit)" if limit else ""
    text = "## Zero-shot results\n\n"
    text += f"lm-evaluation-harness, 0-shot{note}; from `{path.name}`.\n\n"
    return text + _table(["Task", "Metric", "", "Value", "Stderr"], rows, "lllrr") + "\n"


def architecture_section(model: dict[str, Any]) -> str:
    from handgrad.models.gpt2 import GPT2Config, num_parameters

    cfg = GPT2Config.from_dict(model)
    rows = [
        ["Parameters", _num(num_parameters(cfg))],
        ["Layers (n_layer)", _num(cfg.n_layer)],
        ["Heads (n_head)", _num(cfg.n_head)],
        ["Embedding width (n_embd)", _num(cfg.n_embd)],
        ["Context (block_size)", _num(cfg.block_size)],
        ["Vocabulary (padded)", f"{_num(cfg.vocab_size)} ({_num(cfg.padded_vocab_size)})"],
        ["Dropout", _num(cfg.dropout, 2)],
        ["Biases", _num(cfg.bias)],
        ["Parameter dtype", cfg.dtype],
    ]
    text = "## Architecture\n\nGPT-2 (pre-LayerNorm decoder, GELU (tanh), tied input/output "
    text += "embeddings).\n\n"
    return text + _table(["", "Value"], rows, "lr") + "\n"


def tokenizer_section(ckpt: Path, model: dict[str, Any]) -> str:
    from handgrad.tokenizer import load_tokenizer

    path = ckpt / "tokenizer.json"
    tok = load_tokenizer(path)
    merges = getattr(tok, "merges", None)
    padding = model.get("padded_vocab_size", model["vocab_size"]) - model["vocab_size"]
    rows = [
        ["Type", type(tok).__name__],
        ["Vocabulary", _num(tok.vocab_size)],
        ["Merges", _num(len(merges)) if merges is not None else "n/a (character level)"],
        ["Special tokens", ", ".join(f"`{s}` = {i}" for s, i in tok.special_tokens.items())
         or "none"],
        ["Embedding padding rows", f"{_num(padding)} (never predicted)"],
    ]  # fmt: skip
    return "## Tokenizer\n\n" + _table(["", "Value"], rows, "lr") + "\n"


def configuration_section(config: dict[str, Any]) -> str:
    rows = []
    for section in ("data", "optim", "train", "eval"):
        for key, value in (config.get(section) or {}).items():
            shown = value if isinstance(value, str) else json.dumps(value)
            rows.append([f"{section}.{key}", shown])
    return "## Training configuration\n\n" + _table(["Setting", "Value"], rows, "ll") + "\n"


def write_report(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    zero_shot: str | os.PathLike | None = None,
    title: str | None = None,
) -> Path:
    """Write the model card for ``checkpoint`` (a run or checkpoint directory) to ``out``."""
    ckpt = resolve_checkpoint(checkpoint)
    run = run_dir_of(ckpt)
    config = read_config(ckpt)
    state_path = ckpt / "trainer_state.json"
    state = read_json(state_path) if state_path.is_file() else {}
    records = read_metrics(run / "metrics.jsonl")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    title = title or run.name
    parts = [
        f"# Model card: {title}\n",
        f"Checkpoint `{ckpt.relative_to(run) if ckpt.is_relative_to(run) else ckpt}` of run "
        f"`{run}`. Every number below is read from the run's files.\n",
        training_section(records, config, state),
        zero_shot_section(Path(zero_shot) if zero_shot else None),
        architecture_section(config["model"]),
        tokenizer_section(ckpt, config["model"]),
        configuration_section(config),
    ]
    curves = sorted(run.glob("*.png"))
    with disk_full_guard(f"the model card {out}", out.parent, note="no file was half written"):
        if curves:
            image = out.parent / f"{out.stem}_{curves[0].name}"
            with atomic_path(image) as tmp:  # a full disk leaves no half image behind
                shutil.copyfile(curves[0], tmp)
            parts.append(f"## Loss curve\n\n![training and validation loss]({image.name})\n")
        write_text_atomic(out, "\n".join(parts))
    return out
