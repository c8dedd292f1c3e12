"""Metrics sent where people already look: TensorBoard event files and Weights & Biases.

``metrics.jsonl`` is always written (train/runlog.py); ``[train] loggers`` adds more sinks.
Each sink receives the records the trainer logs, unchanged in value, under grouped names:

    metrics.jsonl key   TensorBoard tag / W&B key
    train_loss          loss/train
    val_loss            loss/val
    val_ppl             val/perplexity
    val_bpt             val/bits_per_token
    lr                  optim/lr
    grad_norm           optim/grad_norm
    tokens_per_s        speed/tokens_per_s
    tokens, elapsed_s   progress/tokens, progress/elapsed_s
    (any other number)  its own key

and the samples printed at each evaluation as text (tag ``samples``).

Both sinks are optional extras (``pip install 'handgrad[track]'``); naming one that is not
installed is a ConfigError that names the package and the extra. Neither imports torch: the
TensorBoard writer is the ``tensorboard`` package's own event-file writer and protobufs.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from handgrad.fileio import write_text_atomic
from handgrad.train.config import LOGGERS, ConfigError

TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "val_ppl": "val/perplexity",
    "val_bpt": "val/bits_per_token",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "speed/tokens_per_s",
    "tokens": "progress/tokens",
    "elapsed_s": "progress/elapsed_s",
}
SAMPLE_TAG = "samples"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> module it needs


class Logger(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def text(self, step: int, tag: str, text: str) -> None: ...
    def close(self) -> None: ...


def scalar_values(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers under their logger names (``step`` is the x axis, not a value;
    strings, booleans and non-finite values are left out)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue
        out[TAGS.get(key, key)] = float(value)
    return out


def _require(name: str) -> Any:
    module = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"[train] loggers = [{name!r}] needs the {module!r} package, which is not "
            f"installed: pip install 'handgrad[track]' (or pip install {module})"
        ) from None


# ----------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardLogger:
    """Event files (``events.out.tfevents.*``) in ``log_dir``, written by TensorBoard's own
    ``EventFileWriter``; ``tensorboard --logdir runs`` shows every run by its directory.

    Scalars are ``simple_value`` (float32, as TensorBoard stores them); text is a string
    tensor tagged for TensorBoard's text plugin. On resume a ``SessionLog.START`` event at
    ``resume_step + 1`` tells TensorBoard to drop what the interrupted run logged after the
    checkpoint (those steps are logged again), as metrics.jsonl does."""

    def __init__(self, log_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        _require("tensorboard")
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.log_dir = Path(log_dir)
        self._writer = EventFileWriter(str(self.log_dir), flush_secs=10)
        if resume_step is not None:
            self._writer.add_event(
                event_pb2.Event(
                    wall_time=time.time(),
                    step=resume_step + 1,
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                )
            )

    def _add(self, step: int, values: list[Any]) -> None:
        summary = self._summary_pb2.Summary(value=values)
        self._writer.add_event(
            self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        Value = self._summary_pb2.Summary.Value
        self._add(step, [Value(tag=tag, simple_value=v) for tag, v in values.items()])

    def text(self, step: int, tag: str, text: str) -> None:
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

        s = self._summary_pb2
        metadata = s.SummaryMetadata(plugin_data=s.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
            ),
        )
        self._add(step, [s.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])
        self._writer.flush()  # samples are rare and worth seeing at once

    def close(self) -> None:
        self._writer.close()


# ----------------------------------------------------------------------------------------
# Weights & Biases


class WandbLogger:
    """One W&B run per training run directory. ``WANDB_MODE=offline`` works without a
    network (``wandb sync`` uploads later); the project is ``$WANDB_PROJECT`` or "handgrad".
    The W&B run id is kept in ``<run>/wandb-run-id`` so a resumed training run continues the
    same W&B run (W&B ignores steps it has already seen)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        wandb = _require("wandb")
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb-run-id"
        run_id = None
        if resume_step is not None and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "handgrad"),
                name=run_dir.name,
                dir=str(run_dir),
                config=config or {},
                id=run_id,
                resume="allow" if run_id else None,
                reinit="create_new",
            )
        except Exception as err:  # noqa: BLE001  (wandb's UsageError, CommError, ...)
            first = (str(err).strip().splitlines() or [""])[0]
            raise RuntimeError(
                f"[train] loggers: Weights & Biases could not start a run ({type(err).__name__}: "
                f"{first}); log in "
                "with `wandb login` (or set WANDB_API_KEY), or log offline with "
                "WANDB_MODE=offline (`wandb sync` uploads later)"
            ) from None
        write_text_atomic(id_file, self.run.id + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=int(step))

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: text}, step=int(step))

    def close(self) -> None:
        self.run.finish()


# ----------------------------------------------------------------------------------------


def make_loggers(
    names: Sequence[str],
    run_dir: str | os.PathLike,
    config: dict[str, Any] | None = None,
    resume_step: int | None = None,
) -> list[Logger]:
    """The loggers ``names`` (from ``[train] loggers``) writing into ``run_dir``.
    Raises ConfigError for an unknown name or a package that is not installed."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"[train] loggers: unknown logger(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(LOGGERS)}"
        )
    for name in names:  # all missing packages are reported before any sink is opened
        _require(name)
    loggers: list[Logger] = []
    for name in names:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, resume_step))
        else:
            loggers.append(WandbLogger(run_dir, config, resume_step))
    return loggers
