"""Training on a GPU (``[train] device = "cuda"``): batches uploaded ahead of use, gradients
without host synchronisation, and losses read back in one copy per ``log_interval``.

A GPU runs the kernels the host queues; the host only waits when it reads a device value
(``.item()``, ``float()``, a host copy). Each such read drains the queue and idles the GPU
while Python queues the next kernels, so a step reads nothing: the micro-batch losses and
the gradient norm stay on the device, and ``PendingLosses`` fetches those of every step
since the last read in one copy, at ``log_interval``, at an evaluation and at a checkpoint.
A non-finite loss is therefore detected there rather than in the step it appeared in.

Batches are drawn on the host (the data generator stays where a checkpoint records it) and
copied with ``BatchUploader``: from page-locked (pinned) host memory the copy is queued on
the stream like a kernel, so the host goes on queueing the forward pass instead of waiting
for the copy, which a copy from ordinary memory would make it do. (The CUDA paths are
untested on a GPU: the machines this was written on have none.)
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.backend.device import as_device, device, to_device
from handgrad.nn import Module
from handgrad.tensor import Tensor

_RING = 3  # pinned buffers per shape: the host may run this many uploads ahead of the GPU


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


class NonFiniteLoss(ArithmeticError):
    """A loss or gradient norm read back from the device is NaN or infinite."""


class PendingLosses:
    """Per-step device values (loss, gradient norm) kept until read in one host copy."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._values: list[Any] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, loss: Any, grad_norm: Any) -> None:
        self._steps.append(step)
        self._values.extend((loss, grad_norm))

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

    def read_into(self, losses: dict[int, float], now: int) -> tuple[float, float]:
        """``read()`` into ``losses`` (step -> loss); returns the last (loss, grad norm).
        Raises NonFiniteLoss naming the first step whose loss or norm is not finite."""
        loss = norm = math.nan
        for at, loss, norm in self.read():
            if not (math.isfinite(loss) and math.isfinite(norm)):
                what = (
                    f"training loss is {loss}"
                    if not math.isfinite(loss)
                    else f"gradient norm is {norm}"
                )
                raise NonFiniteLoss(
                    f"step {at}: {what} (read at step {now}: on a GPU losses are read every "
                    "log_interval steps); stopping."
                )
            losses[at] = loss
        return loss, norm


def device_gradients(model: Module, rows: int, scale: float, upload: BatchUploader) -> Any:
    """A gradient function (as the trainer's ``GradientFn``) for a model on a device: the
    global batch is uploaded once, cut into micro batches of ``rows`` on the device, and
    ``(loss * scale).backward()`` runs for each. Returns the micro-batch losses as device
    0-d arrays (nothing is read back)."""

    def gradients(step: int, x: np.ndarray, y: np.ndarray) -> list[Any]:
        xd, yd = upload(x), upload(y)
        losses = []
        for i in range(0, len(x), rows):
            _, loss = model(Tensor._make(xd[i : i + rows]), Tensor._make(yd[i : i + rows]))
            losses.append(loss.data)
            (loss if scale == 1.0 else loss * scale).backward()
        return losses

    return gradients


def mean_on_device(values: Sequence[Any], count: int) -> Any:
    """sum(values) / count, computed where the values live (no host read)."""
    total = values[0].astype(B.float32)
    for v in values[1:]:
        total = total + v
    return total / count
