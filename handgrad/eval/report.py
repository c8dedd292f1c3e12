"""``handgrad report``: the model card of a run, written from the run's own files.

The card follows the sections of the original GPT-2 model card (Hugging Face's ``gpt2``):
Model description, Intended uses & limitations, Training data, Training procedure
(Preprocessing, Training), Evaluation results; then the loss curve and, as an appendix, the
full resolved configuration. Every number in it is read from a file (nothing is typed in):

    metrics.jsonl                     training metrics (first and last validation records)
    <checkpoint>/config.json          architecture and training configuration
    <checkpoint>/trainer_state.json   steps, tokens seen, time, the data directory, hardware
    <checkpoint>/tokenizer.json       tokenizer facts (vocabulary, merges, special tokens)
    <data dir>/meta.json              the dataset: source, documents and tokens per split
    lm-eval results JSON              zero-shot table (``handgrad eval zero-shot --output``)
    loss.png                          the loss curve, copied next to the card and linked
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from handgrad.checkpoint import (
    CheckpointError,
    read_config,
    read_json,
    resolve_checkpoint,
    run_dir_of,
)
from handgrad.diskspace import disk_full_guard
from handgrad.eval.card_text import (
    TASK_TITLES,
    duration,
    hardware_text,
    limitations,
    num,
    optimizer_text,
    schedule_text,
    short,
    table,
)
from handgrad.eval.hub_card import front_matter
from handgrad.fileio import atomic_path, write_text_atomic

__all__ = ["read_metrics", "write_report", "zero_shot_rows"]

# Metrics normalised by the bytes or words of the text, not by tokens: they compare across
# tokenizers (this model's vocabulary against GPT-2's 50,257 tokens).
TOKENIZER_INDEPENDENT = ("bits_per_byte", "byte_perplexity", "word_perplexity")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of records; a bad line is an error naming its number."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the run's metrics log)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


class RunFacts:
    """What the card needs, gathered once from the run's files."""

    def __init__(self, checkpoint: str | os.PathLike) -> None:
        self.ckpt = resolve_checkpoint(checkpoint)
        self.run = run_dir_of(self.ckpt)
        self.config = read_config(self.ckpt)
        state_path = self.ckpt / "trainer_state.json"
        self.state = read_json(state_path) if state_path.is_file() else {}
        self.records = read_metrics(self.run / "metrics.jsonl")
        step = self.state.get("step")
        if isinstance(step, int):
            # a card for an earlier checkpoint of a run that went on: its own steps only
            self.records = [r for r in self.records if r.get("step", 0) <= step]
        self.evals = [r for r in self.records if "val_loss" in r]
        if not self.evals:
            raise ValueError(
                f"{self.run / 'metrics.jsonl'}: no validation record (val_loss); nothing to "
                "report (train with [eval] batches > 0)"
            )
        self.model = self.config["model"]
        self.data = self.config.get("data") or {}
        self.optim = self.config.get("optim") or {}
        self.train = self.config.get("train") or {}
        self.eval = self.config.get("eval") or {}
        self.meta = self._data_meta()
        last = self.records[-1]
        self.steps = self.state.get("step", last.get("step"))
        self.tokens = self.state.get("tokens_seen", last.get("tokens"))
        self.elapsed = self.state.get("elapsed_s", last.get("elapsed_s"))
        self.block_size = self.train.get("block_size", self.model.get("block_size"))

    def _data_meta(self) -> dict[str, Any] | None:
        """meta.json of the data the run trained on, when that directory is still there."""
        where = (self.state.get("data") or {}).get("dir") or self.data.get("source")
        if not where or not (Path(where) / "meta.json").is_file():
            return None
        try:
            meta = read_json(Path(where) / "meta.json")
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    @property
    def processes(self) -> int:
        hardware = self.state.get("hardware") or {}
        return int(self.train.get("processes", hardware.get("processes", 1)))

    @property
    def global_batch(self) -> int | None:
        t = self.train
        if "micro_batch_size" not in t:
            return None
        return t["micro_batch_size"] * t.get("grad_accum_steps", 1) * self.processes


# ----------------------------------------------------------------------------------------
# sections, in the order of the original card


def header(f: RunFacts, title: str) -> str:
    from handgrad.models import config_from_dict, num_parameters

    n = num_parameters(config_from_dict(f.model))
    source = (f.meta or {}).get("source") or f.data.get("source", "an unrecorded source")
    ckpt = f.ckpt.resolve()
    rel = ckpt.relative_to(f.run) if ckpt.is_relative_to(f.run) else ckpt
    return (
        f"# Model card: {title}\n\n"
        f"A {_ARCH_NAMES.get(f.model.get('arch'), 'GPT-2')} language model of {num(n)} "
        f"parameters trained from scratch with handgrad on "
        f"{source}, with a causal language modelling objective (predict the next token).\n\n"
        f"Checkpoint `{rel}` of run `{shown_path(f.run)}`. Every number below is read from the "
        "run's "
        "files.\n"
    )


_ARCH_NAMES = {"llama": "Llama-style GPT"}  # a model section's arch, for the card's first line
_LLAMA_DESCRIPTION = (
    "## Model description\n\n"
    "Llama-style architecture: a decoder-only transformer (pre-RMSNorm blocks of causal "
    "self-attention with rotary position embeddings and grouped-query attention, and a SwiGLU "
    "MLP; no biases). Inputs are sequences of consecutive tokens and the targets are the same "
    "sequences shifted one token to the right. It was pre-trained on raw text only, with no "
    "labels.\n\n"
)


def model_description(f: RunFacts) -> str:
    from handgrad.models import config_from_dict, num_parameters

    cfg = config_from_dict(f.model)
    rows = [
        ["Parameters", num(num_parameters(cfg))],
        ["Layers (n_layer)", num(cfg.n_layer)],
        ["Heads (n_head)", num(cfg.n_head)],
        ["Embedding width (n_embd)", num(cfg.n_embd)],
        ["Context (block_size)", num(cfg.block_size)],
        ["Vocabulary (padded)", f"{num(cfg.vocab_size)} ({num(cfg.padded_vocab_size)})"],
        ["Dropout", num(cfg.dropout, 2)],
        ["Biases", num(getattr(cfg, "bias", False))],  # a Llama has none
        ["Parameter dtype", cfg.dtype],
    ]
    if cfg.arch == "llama":
        rows.insert(2, ["Key/value heads (n_kv_head)", num(cfg.n_kv_head)])
        return _LLAMA_DESCRIPTION + table(["", "Value"], rows, "lr") + "\n"
    text = (
        "## Model description\n\n"
        "GPT-2 architecture: a decoder-only transformer (pre-LayerNorm blocks of causal "
        "self-attention and a GELU (tanh) MLP, learnt position embeddings, input and output "
        "embeddings tied). Inputs are sequences of consecutive tokens and the targets are the "
        "same sequences shifted one token to the right; a causal mask makes the prediction for "
        "token i use only tokens 1 to i. It was pre-trained on raw text only, with no labels.\n\n"
    )
    return text + table(["", "Value"], rows, "lr") + "\n"


def shown_path(path: Path) -> str:
    """``path`` as the reader would type it: relative to the working directory when inside it."""
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def intended_uses(f: RunFacts) -> str:
    run = shown_path(f.run)
    items = "\n".join(f"- {line}" for line in limitations(f))
    return (
        "## Intended uses & limitations\n\n"
        "A small model for studying how a GPT-2 is trained and evaluated end to end: generating "
        "text in the style of its training data, and as a baseline to compare training changes "
        "against. It is not meant for any application where the text it produces matters.\n\n"
        "### How to use\n\n"
        "```bash\n"
        f'handgrad sample --checkpoint {run} --prompt "..." --max-new-tokens 100\n'
        f"handgrad export hf --checkpoint {run} --out hf-model   # transformers' GPT2LMHeadModel\n"
        "```\n\n"
        "### Limitations\n\n" + items + "\n"
    )


def training_data(f: RunFacts) -> str:
    meta = f.meta
    if meta is None:
        return (
            "## Training data\n\n"
            f"`{f.data.get('source', 'unrecorded')}` (its prepared directory, with the "
            "document and token counts, is no longer at the recorded path).\n"
        )
    splits = meta.get("splits") or {}
    rows = [
        [name, num(s.get("documents")), num(s.get("tokens")), num(s.get("bytes"))]
        for name, s in splits.items()
    ]
    fraction = meta.get("val_fraction")
    mode = meta.get("split_mode")
    how = f"a fraction {short(fraction)}" if fraction is not None else "a share"
    how += f", split by {mode}" if mode else ""
    text = (
        "## Training data\n\n"
        f"{meta.get('source', 'unrecorded source')}. Held out for validation: {how} "
        f"(seed {meta.get('seed', 'n/a')}), never trained on.\n\n"
    )
    table_ = table(["Split", "Documents", "Tokens", "Bytes (token ids on disk)"], rows, "lrrr")
    return text + table_ + "\n"


def preprocessing(f: RunFacts) -> str:
    from handgrad.tokenizer import load_tokenizer

    tok = load_tokenizer(f.ckpt / "tokenizer.json")
    merges = getattr(tok, "merges", None)
    special = ", ".join(f"`{s}` = {i}" for s, i in tok.special_tokens.items()) or "none"
    spec = ((f.meta or {}).get("tokenizer") or {}).get("spec", f.data.get("tokenizer"))
    source = (f.meta or {}).get("source") or f.data.get("source", "the training data")
    if merges is not None:
        kind = (
            f"a byte-level BPE of {num(tok.vocab_size)} tokens: 256 byte tokens, "
            f"{num(len(merges))} merges and {num(len(tok.special_tokens))} special token(s)"
        )
    else:
        kind = f"a character-level tokenizer of {num(tok.vocab_size)} characters"
    if isinstance(spec, str) and spec.startswith("train:"):
        origin = f"learnt (`{spec}`) on the training split of {source}"
    elif isinstance(spec, str) and spec.endswith(".json"):
        origin = f"read from `{spec}` (trained elsewhere; its own corpus is not recorded here)"
    elif spec == "char":
        origin = f"the characters of the training split of {source}"
    else:
        origin = "from an unrecorded origin"
    padding = f.model.get("padded_vocab_size", f.model["vocab_size"]) - f.model["vocab_size"]
    rows = [
        ["Type", type(tok).__name__],
        ["Vocabulary", num(tok.vocab_size)],
        ["Merges", num(len(merges)) if merges is not None else "n/a (character level)"],
        ["Special tokens", special],
        ["Embedding padding rows", f"{num(padding)} (never predicted)"],
    ]
    eot = tok.eot_token
    sep = (
        f"Documents are separated by the end-of-text token (id {eot}). "
        if eot is not None
        else "Documents are concatenated without a separator. "
    )
    text = (
        "### Preprocessing\n\n"
        f"The texts are tokenized with {kind}, {origin}. {sep}The inputs are windows of "
        f"{num(f.block_size)} consecutive tokens drawn at random from the training tokens.\n\n"
    )
    return text + table(["Tokenizer", "Value"], rows, "lr") + "\n"


def training(f: RunFacts) -> str:
    o, t = f.optim, f.train
    clip = o.get("grad_clip", 0)
    clip_text = f"global gradient norm clipped to {short(clip)}" if clip else "none"
    rows = [["Optimizer", optimizer_text(o)]]
    rows.append(["Learning-rate schedule", schedule_text(o, t.get("max_steps"))])
    rows.append(["Gradient clipping", clip_text])
    gb = f.global_batch
    if gb is not None:
        per_step = gb * f.block_size if f.block_size else None
        rows.append([
            "Global batch",
            f"{num(gb)} sequences = {num(t['micro_batch_size'])} (micro batch) x "
            f"{num(t.get('grad_accum_steps', 1))} (accumulation) x {num(f.processes)} "
            f"(processes) of {num(f.block_size)} tokens = {num(per_step)} tokens per step",
        ])  # fmt: skip
    planned = t.get("max_steps")
    rows.append(["Steps", f"{num(f.steps)} of {num(planned)} planned"])
    rows.append(["Tokens seen", num(f.tokens)])
    if f.steps and f.tokens is not None:
        per = f.tokens / f.steps
        rows.append(["Tokens per step", num(int(per) if per == int(per) else per)])
    rows.append(["Precision", f"{f.model.get('dtype', 'float32')} parameters"])
    rows.append(["Seed", str(t.get("seed", "n/a"))])
    hardware = f.state.get("hardware")
    rows.append(["Hardware", hardware_text(hardware) if hardware else "not recorded"])
    if f.elapsed is not None:
        speed = f" ({num(round(f.tokens / f.elapsed))} tokens/s)" if f.tokens and f.elapsed else ""
        rows.append(["Training time", duration(f.elapsed) + speed])
    first, last = f.evals[0], f.evals[-1]
    train_losses = [r for r in f.records if "train_loss" in r]
    if train_losses:
        rows.append(["Final training loss", f"{num(train_losses[-1]['train_loss'])} nats/token "
                     f"(step {train_losses[-1]['step']})"])  # fmt: skip
    rows.append([
        "Validation loss, start -> end",
        f"{num(first['val_loss'])} (step {first['step']}) -> "
        f"{num(last['val_loss'])} (step {last['step']})",
    ])  # fmt: skip
    return "### Training\n\n" + table(["", "Value"], rows, "ll") + "\n"


def evaluation_results(f: RunFacts, zero_shot: Path | None) -> str:
    last = f.evals[-1]
    batches = f.eval.get("batches")
    rows_per_batch = (f.train.get("micro_batch_size") or 0) * f.processes
    scored = batches * rows_per_batch * f.block_size if batches and rows_per_batch else None
    how = (
        f"Eval: mean val loss over {num(batches)} batches of {num(rows_per_batch)} windows of "
        f"{num(f.block_size)} tokens ({num(scored)} tokens) of the validation split, the same "
        f"fixed windows at every evaluation; step {last['step']}."
    )
    rows = [
        ["Validation loss (nats/token)", num(last["val_loss"])],
        ["Validation perplexity", num(last.get("val_ppl", _exp(last["val_loss"])))],
        ["Bits per token", num(last.get("val_bpt", last["val_loss"] / math.log(2)))],
    ]
    best = f.state.get("best_val_loss")
    if best is not None:
        rows.append(["Best validation loss", num(best)])
    text = "## Evaluation results\n\n" + how + "\n\n" + table(["Metric", "Value"], rows, "lr")
    text += "\n\n" + zero_shot_section(zero_shot, f.ckpt) + "\n"
    text += (
        "bits_per_byte, byte_perplexity and word_perplexity are normalised by the bytes or "
        "words of the text, so they are tokenizer-independent and compare with other models "
        "(GPT-2's 50,257-token BPE included); the token-level perplexity above is not: a "
        "tokenizer with longer tokens has fewer, harder tokens to predict, so it compares only "
        "between models that share this tokenizer.\n"
    )
    return text


def zero_shot_rows(results: dict[str, Any]) -> list[list[str]]:
    """(task, metric, direction, value, stderr) from lm-eval's results JSON; direction is
    ↑ (higher is better) or ↓ (lower is better) as lm-eval's ``higher_is_better`` says."""
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
                num(float(value)),
                num(float(stderr)) if isinstance(stderr, int | float) else "n/a",
            ])  # fmt: skip
    return rows


def _results_checkpoint(results: dict[str, Any]) -> str | None:
    """The checkpoint lm-eval's ``config.model_args`` names (a dict or "k=v,k=v"), if any."""
    args = (results.get("config") or {}).get("model_args")
    if isinstance(args, str):
        args = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    return args.get("checkpoint") if isinstance(args, dict) else None


def _check_same_checkpoint(path: Path, results: dict[str, Any], ckpt: Path) -> None:
    """Refuse zero-shot results of another checkpoint than the card's."""
    named = _results_checkpoint(results)
    if named is None:
        raise ValueError(
            f"{path}: the results do not name the checkpoint they evaluated (no checkpoint in "
            "config.model_args); evaluate it with handgrad eval zero-shot --checkpoint "
            f"{ckpt} --output FILE.json"
        )
    try:
        theirs = resolve_checkpoint(named).resolve()
    except (CheckpointError, OSError):
        theirs = None
    if theirs != ckpt.resolve():
        raise ValueError(
            f"{path}: these zero-shot results are of checkpoint {named}"
            f"{f' ({theirs})' if theirs else ''}, not of {ckpt}: every number in a card must be "
            f"its checkpoint's; evaluate it with handgrad eval zero-shot --checkpoint {ckpt}"
        )


def zero_shot_section(path: Path | None, ckpt: Path | None = None) -> str:
    if path is None:
        return (
            "### Zero-shot results\n\nNot evaluated (run `handgrad eval zero-shot --output "
            "FILE.json` and pass `--zero-shot FILE.json`).\n"
        )
    results = read_json(path)
    if not isinstance(results, dict) or "results" not in results:
        raise ValueError(f"{path}: not an lm-eval results file (no 'results' key)")
    if ckpt is not None:
        _check_same_checkpoint(path, results, ckpt)
    rows = zero_shot_rows(results)
    limit = (results.get("config") or {}).get("limit")
    note = f" on at most {limit} documents per task (--limit)" if limit else ""
    text = "### Zero-shot results\n\n"
    text += f"lm-evaluation-harness, 0-shot{note}; from `{path.name}`. Better: ↑ higher is "
    text += "better, ↓ lower is better; Stderr: the standard error of the value.\n\n"
    return text + table(["Task", "Metric", "Better", "Value", "Stderr"], rows, "lllrr") + "\n"


def configuration_appendix(config: dict[str, Any]) -> str:
    """Every key of the resolved config; values as JSON literals, so an empty string or a
    newline (``eval.sample_prompt = "\\n"``) shows as ``""`` / ``"\\n"`` in one table cell."""
    rows = []
    for section in ("model", "data", "optim", "train", "eval"):
        for key, value in (config.get(section) or {}).items():
            rows.append([f"{section}.{key}", f"`{json.dumps(value, ensure_ascii=False)}`"])
    return (
        "## Appendix: full resolved configuration\n\n"
        "As the trainer wrote it to the checkpoint's `config.json` (the model section with the "
        "preset and the data's vocabulary resolved).\n\n"
        + table(["Setting", "Value"], rows, "ll")
        + "\n"
    )


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def write_report(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    zero_shot: str | os.PathLike | None = None,
    title: str | None = None,
) -> Path:
    """Write the model card for ``checkpoint`` (a run or checkpoint directory) to ``out``."""
    f = RunFacts(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    zs_results = read_json(Path(zero_shot)) if zero_shot else None
    parts = [
        front_matter(
            title or f.run.name,
            (f.meta or {}).get("source") or f.data.get("source"),
            (f.meta or {}).get("format"),
            f.evals[-1]["val_loss"],
            zs_results if isinstance(zs_results, dict) else None,
        ),  # fmt: skip
        header(f, title or f.run.name),
        model_description(f),
        intended_uses(f),
        training_data(f),
        "## Training procedure\n",
        preprocessing(f),
        training(f),
        evaluation_results(f, Path(zero_shot) if zero_shot else None),
    ]
    curves = sorted(f.run.glob("*.png"))
    with disk_full_guard(f"the model card {out}", out.parent, note="no file was half written"):
        if curves:
            image = out.parent / f"{out.stem}_{curves[0].name}"
            with atomic_path(image) as tmp:  # a full disk leaves no half image behind
                shutil.copyfile(curves[0], tmp)
            parts.append(f"## Loss curve\n\n![training and validation loss]({image.name})\n")
        parts.append(configuration_appendix(f.config))
        write_text_atomic(out, "\n".join(parts))
    return out
