"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step) and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from handgrad.fileio import atomic_path, write_text_atomic
from handgrad.train.loggers import SAMPLE_TAG, make_loggers, scalar_values


class MetricsLog:
    """Appends records to ``metrics.jsonl``, flushed line by line so a crash loses nothing
    already logged. Records keep every step key they are given (train_loss, lr, ...)."""

    def __init__(
        self,
        path: str | os.PathLike,
        resume_step: int | None = None,
        loggers: Sequence[str] = (),
        config: dict[str, Any] | None = None,
    ) -> None:
        """``loggers``: more sinks for the same records (``[train] loggers``: "tensorboard",
        "wandb"; train/loggers.py), writing beside ``path``; ``config`` is the run's resolved
        config, which W&B stores with the run."""
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            # Steps after the checkpoint we resume from were logged by a run that did not
            # reach its next checkpoint; they will be logged again, so drop them.
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and rec.get("step", math.inf) <= resume_step:
                    kept.append(rec)
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept
        elif self.path.exists():
            self.path.unlink()
        self.sinks = make_loggers(loggers, self.path.parent, config, resume_step) if loggers else []
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.sinks and "step" in record:
            values = scalar_values(record)
            for sink in self.sinks:
                sink.scalars(record["step"], values)

    def log_text(self, step: int, text: str, tag: str = SAMPLE_TAG) -> None:
        """Text (a sample) for the loggers that show it; metrics.jsonl holds numbers only."""
        for sink in self.sinks:
            sink.text(step, tag, text)

    def plot(self, path: str | os.PathLike, title: str = "") -> None:
        """The loss curves of every record so far, as a PNG (``plot_losses``)."""
        plot_losses(self.records, path, title)

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()


class NullMetrics:
    """What a process that does not write the run logs to: nothing."""

    records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_text(self, step: int, text: str, tag: str = SAMPLE_TAG) -> None:
        pass

    def plot(self, path: str | os.PathLike, title: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Train and val loss against step (bottom axis) and tokens (top axis), written to a
    temporary file and renamed, so the PNG on disk is always a whole image.

    Drawn with matplotlib's object API on its Agg canvas (no pyplot: no global figure state,
    no display, safe in threads) and fixed margins: pyplot's import and tight_layout's
    extra draw cost more than the drawing itself, and the trainer redraws at every eval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.11, top=0.82 if title else 0.87)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="val", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    tokens_per_step = _tokens_per_step(records)
    if tokens_per_step:
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step)
        )
        top.set_xlabel("tokens")
    if title:
        fig.suptitle(title)
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:  # savefig picks the format by suffix
        fig.savefig(tmp, dpi=100)


def _tokens_per_step(records: list[dict[str, Any]]) -> float | None:
    for r in records:
        if r.get("step") and r.get("tokens"):
            return r["tokens"] / r["step"]
    return None
