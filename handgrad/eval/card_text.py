"""The model card's wording: numbers, durations, Markdown table cells, the optimizer and
schedule in words, the hardware line and the limitations, each from the run's values."""

from __future__ import annotations

import math
from typing import Any

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

# Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models": for a compute
# budget, loss is lowest with about 20 training tokens per parameter.
CHINCHILLA_TOKENS_PER_PARAMETER = 20


def num(x: Any, digits: int = 4) -> str:
    """A number for a table: integers with thousands separators, floats with ``digits``
    decimals (or ``digits`` significant digits when very large or small)."""
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


def short(x: Any) -> str:
    """A hyperparameter as people write it: 6e-4, 0.95, 0.1, 1e-8, 1,000."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x == int(x) and abs(x) >= 1:
        return f"{x:,.1f}"
    if x == 0:
        return "0"
    if abs(x) < 1e-2:
        mantissa, exponent = f"{x:.3e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.4g}"


def duration(seconds: float) -> str:
    """12.3 s, 4 min 5 s, 2 h 7 min: the unit that keeps the number readable."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s} s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min"


def cell(text: Any) -> str:
    """A value safe inside a Markdown table cell: ``|`` escaped, line breaks as ``<br>``."""
    s = str(text).replace("\r\n", "\n").replace("\r", "\n")
    return s.replace("|", "\\|").replace("\n", "<br>")


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def optimizer_text(o: dict[str, Any]) -> str:
    """ "AdamW (lr 6e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices)"."""
    betas = o.get("betas", [0.9, 0.95])
    parts = [
        f"lr {short(o.get('lr', 6e-4))}",
        f"betas ({', '.join(short(b) for b in betas)})",
        f"eps {short(o.get('eps', 1e-8))}",
    ]
    wd = o.get("weight_decay", 0.1)
    parts.append(
        f"weight decay {short(wd)} on weight matrices and embeddings, none on biases and LayerNorm"
        if wd
        else "no weight decay"
    )
    return f"AdamW ({', '.join(parts)})"


def schedule_text(o: dict[str, Any], max_steps: int | None) -> str:
    """ "cosine with 1,000 warm-up steps, min lr 1e-4, decay over 600,000 steps"."""
    warmup = o.get("warmup_steps", 0)
    decay = o.get("decay_steps") or max_steps
    lr, min_lr = o.get("lr"), o.get("min_lr")
    if lr is not None and min_lr == lr:
        head = f"constant lr {short(lr)}"
        return head + (f" after {short(warmup)} warm-up steps" if warmup else "")
    warm = f"{short(warmup)} warm-up steps" if warmup else "no warm-up"
    return f"cosine with {warm}, min lr {short(min_lr)}, decay over {short(decay)} steps"


def hardware_text(h: dict[str, Any]) -> str:
    """ "AMD EPYC 7763, 2 logical cores (2 available); 2 training processes x 1 thread; CPU
    (NumPy); Linux-6.1, Python 3.11.7"."""
    cpu = h.get("cpu", "unknown CPU")
    cores = f"{num(h.get('logical_cores'))} logical cores"
    if h.get("available_cores") not in (None, h.get("logical_cores")):
        cores += f" ({num(h['available_cores'])} available to the run)"
    procs = h.get("processes", 1)
    threads = h.get("threads_per_process")
    work = f"{num(procs)} training process{'es' if procs != 1 else ''}"
    if threads:
        work += f" x {num(threads)} thread{'s' if threads != 1 else ''}"
    device = h.get("device", "cpu")
    module = {"numpy": "NumPy", "cupy": "CuPy"}.get(h.get("array_module"), h.get("array_module"))
    where = f"{device.upper() if device == 'cpu' else device} ({module})"
    system = ", ".join(str(h[k]) for k in ("platform", "python") if h.get(k))
    if h.get("python"):
        system = system.replace(str(h["python"]), f"Python {h['python']}")
    return f"{cpu}, {cores}; {work}; {where}" + (f"; {system}" if system else "")


def limitations(f: Any) -> list[str]:
    """What a reader should know before trusting the model, from the run's own numbers.
    ``f`` is a ``report.RunFacts``."""
    from handgrad.models import config_from_dict, num_parameters

    out = []
    planned = f.train.get("max_steps")
    decay = f.optim.get("decay_steps") or planned
    if f.steps is not None and planned and f.steps < planned:
        out.append(
            f"Undertrained relative to its own schedule: {num(f.steps)} of {num(planned)} "
            "steps (stopped early; the run can be resumed)."
        )
    elif f.steps is not None and decay and f.steps < decay:
        out.append(
            f"Undertrained relative to its own schedule: the cosine decay spans {num(decay)} "
            f"steps, training ran {num(f.steps)}, so the learning rate never reached its floor."
        )
    n_params = num_parameters(config_from_dict(f.model))
    if f.tokens:
        ratio = f.tokens / n_params
        out.append(
            f"Small training budget: {num(f.tokens)} tokens for {num(n_params)} parameters, "
            f"{ratio:.2g} tokens per parameter (compute-optimal training uses about "
            f"{CHINCHILLA_TOKENS_PER_PARAMETER}; Hoffmann et al., 2022)."
        )
    train_tokens = (((f.meta or {}).get("splits") or {}).get("train") or {}).get("tokens")
    if f.tokens and train_tokens:
        epochs = f.tokens / train_tokens
        if epochs > 1:
            out.append(
                f"Repeated data: the {num(train_tokens)}-token training split was seen "
                f"{epochs:.1f} times over, so the model can memorise passages of it."
            )
    last = f.evals[-1]
    if "train_loss" in last:
        gap = last["val_loss"] - last["train_loss"]
        out.append(
            f"Generalisation gap at step {last['step']}: validation loss {num(last['val_loss'])} "
            f"against training loss {num(last['train_loss'])} ({gap:+.4f} nats/token)."
        )
    source = (f.meta or {}).get("source") or f.data.get("source", "its training data")
    out.append(
        f"It knows only the text it was trained on ({source}); on other text its predictions "
        f"are poor. It sees at most {num(f.model.get('block_size'))} tokens of context."
    )
    out.append(
        "Its samples are not factual and are not filtered: like any language model trained on "
        "unfiltered text it can reproduce the errors and biases of that text."
    )
    return out
