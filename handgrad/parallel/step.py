"""The pieces of one training step that every run mode shares: the micro-batch loop,
batches sent to the model's device, and the step's loss and gradient norm read back.

A step's global batch of G windows is cut into micro batches; each one runs forward and
backward and its gradient is added into ``.grad``, scaled so that the sum is the mean over
the whole batch (``accumulate``):

    for each micro batch i:   loss_i = model(x_i, y_i);  (loss_i * scale).backward()

On the CPU each loss is read as a float when it is made, and a non-finite one stops the step
before anything is updated. A GPU runs the kernels the host queues and the host only waits
when it reads a device value, which drains the queue and idles the GPU while Python queues
the next kernels; so on a GPU a step reads nothing. Its losses and gradient norm stay on the
device, and ``PendingLosses`` fetches those of every step since the last read in one copy, at
``log_interval``, at an evaluation and at a checkpoint. A non-finite loss on a GPU is
therefore found there rather than in the step it appeared in.

Batches are drawn on the host (the data generator stays where a checkpoint records it) and
copied with ``BatchUploader``: from page-locked (pinned) host memory the copy is queued on
the stream like a kernel, so the host goes on queueing the forward pass instead of waiting
for the copy, which a copy from ordinary memory would make it do.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.amp import autocast
from handgrad.backend.device import as_device, device, to_device
from handgrad.nn import Module
from handgrad.tensor import Tensor

__all__ = [
    "BatchUploader",
    "PendingLosses",
    "StepStats",
    "TrainingDiverged",
    "accumulate",
    "autocast_region",
    "mean_on_device",
]

_RING = 3  # pinned buffers per shape: the host may run this many uploads ahead of the GPU


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped."""


@dataclass
class StepStats:
    """The mean training loss over the global batch and the global gradient norm before
    clipping: floats on the CPU, 0-d device arrays on a GPU (read later, in one copy)."""

    loss: Any
    grad_norm: Any


def autocast_region(model: Module, precision: str | None) -> Any:
    """The context a forward pass runs in: ``hg.autocast`` on the model's device type for
    ``precision`` "bf16", nothing for None (float32, or the parameters' own dtype)."""
    if precision is None:
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"autocast: expected 'bf16' or None, got {precision!r}")
    return autocast(model.device.type, B.bfloat16)


def accumulate(
    model: Module,
    micro_batches: Sequence[tuple[Any, Any]],
    scale: float,
    precision: str | None = None,
) -> list:
    """``(loss * scale).backward()`` for each ``(x, y)`` (B, T) micro batch (arrays on the
    model's device), gradients adding up in ``.grad``; each forward under autocast when
    ``precision`` is "bf16" (one region per micro batch, so a parameter's bfloat16 copy
    lives as long as its forward and backward). Returns each micro batch's unscaled
    loss: a float for host arrays, where a loss that is not finite ends the loop before its
    backward (the caller reports it); a 0-d device array otherwise, read nowhere here."""
    losses: list = []
    for x, y in micro_batches:
        with autocast_region(model, precision):
            _, loss = model(Tensor._make(x), Tensor._make(y))
        if B.is_numpy(B.get_array_module(loss.data)):
            value = float(loss.item())
            losses.append(value)
            if not math.isfinite(value):
                break
        else:
            losses.append(loss.data)
        (loss if scale == 1.0 else loss * scale).backward()
    return losses


def mean_on_device(values: Sequence[Any], count: int) -> Any:
    """sum(values) / count, computed where the values live (no host read)."""
    total = values[0].astype(B.float32)
    for v in values[1:]:
        total = total + v
    return total / count


class BatchUploader:
    """Copies host batches to ``target``, asynchronously from pinned memory on CUDA.

    Each upload takes the next of ``_RING`` pinned buffers of that shape, copies the batch
    into it, and queues ``device_array.set(pinned, stream)`` on the current stream (ordered
    before the kernels that read it). Before a buffer is overwritten, the event recorded
    after its previous copy is waited for, which returns at once unless the host is
    ``_RING`` uploads ahead of the GPU. Without pinned memory or streams (another array
    library, the test stand-in) it makes plain copies."""

    def __init__(self, target: str | device) -> None:
        self.device = as_device(target)
        self._cp: Any = None
        self._pinned: dict[tuple[tuple[int, ...], str], list[list[Any]]] = {}
        self._turn: dict[tuple[tuple[int, ...], str], int] = {}
        if self.device.type == "cuda":
            from handgrad.backend import cuda  # noqa: PLC0415  (only for CUDA targets)

            cp = cuda.require(self.device.index)
            if hasattr(cp.cuda, "get_current_stream") and hasattr(cp.cuda, "Event"):
                try:
                    self._cupyx = importlib.import_module("cupyx")
                    self._cp = cp
                except ImportError:
                    self._cp = None

    def __call__(self, array: np.ndarray) -> Any:
        """``array`` (host) on the target device."""
        if self.device.type == "cpu":
            return array
        if self._cp is None:
            return to_device(array, self.device)
        return self._upload(np.ascontiguousarray(array))

    def _upload(self, array: np.ndarray) -> Any:  # pragma: no cover  (needs a GPU)
        cp = self._cp
        key = (array.shape, array.dtype.str)
        ring = self._pinned.setdefault(key, [])
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        if len(ring) < _RING:
            ring.append([self._cupyx.empty_pinned(array.shape, array.dtype), None])
        slot = ring[turn % len(ring)]
        if slot[1] is not None:
            slot[1].synchronize()  # that buffer's previous copy has finished reading it
        slot[0][...] = array
        with cp.cuda.Device(0 if self.device.index is None else self.device.index):
            stream = cp.cuda.get_current_stream()
            out = cp.empty(array.shape, dtype=array.dtype)
            out.set(slot[0], stream=stream)
            slot[1] = stream.record()
        return out


class PendingLosses:
    """Each step's (loss, gradient norm), kept where they were computed until they are read
    in one host copy. Host floats cost nothing to read, so ``add`` hands them straight back;
    device values wait for a ``read``."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._values: list[Any] = []
        self.losses: dict[int, float] = {}  # step -> training loss, of every step read

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, stats: StepStats, read: bool = False) -> StepStats | None:
        """Keep ``step``'s values; returns the host values of the last step when they were
        read now (always for host floats; with ``read`` for device values), else None."""
        self._steps.append(step)
        self._values.extend((stats.loss, stats.grad_norm))
        if read or isinstance(stats.loss, float):
            return self.read_all(step)
        return None

    def read(self) -> list[tuple[int, float, float]]:
        """(step, loss, grad norm) of every pending step, in order, with one host copy (one
        synchronisation); the pending list is emptied."""
        if not self._steps:
            return []
        xp = B.get_array_module(*self._values)
        host = B.to_numpy(xp.stack([xp.asarray(v, dtype=B.float64) for v in self._values]))
        out = [
            (step, float(host[2 * i]), float(host[2 * i + 1])) for i, step in enumerate(self._steps)
        ]
        self._steps, self._values = [], []
        return out

    def read_all(self, now: int) -> StepStats:
        """``read()`` into ``losses``; returns the last step's values. Raises
        TrainingDiverged naming the first step whose loss or norm is not finite."""
        loss = norm = math.nan
        for at, loss, norm in self.read():
            if not (math.isfinite(loss) and math.isfinite(norm)):
                what = (
                    f"training loss is {loss}"
                    if not math.isfinite(loss)
                    else f"gradient norm is {norm}"
                )
                raise TrainingDiverged(
                    f"step {at}: {what} (read at step {now}: on a GPU losses are read every "
                    "log_interval steps); stopping."
                )
            self.losses[at] = loss
        return StepStats(loss, norm)
