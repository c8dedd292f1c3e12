"""Where a training step's gradients are made: in this process, over forked processes or MPI
ranks (``train/parallel.py``), on a GPU (``train/on_device.py``), or on one GPU per MPI rank
(both; NCCL reduces the gradients, never run on a GPU). Each way is a ``GradientFn``:
(step, x, y) -> the loss of each micro batch, with scale x its gradient added to ``.grad``, so
the training step does not depend on which is used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from handgrad.distributed.local import can_fork
from handgrad.models.gpt2 import GPT2
from handgrad.train.config import TrainSection
from handgrad.train.on_device import BatchUploader, device_gradients
from handgrad.train.parallel import DistributedDataParallel, accumulate_gradients

# (step, x, y) -> the loss of each micro batch, with scale x its gradient added to .grad
GradientFn = Callable[[int, np.ndarray, np.ndarray], list[float]]


def local_gradients(model: GPT2, rows: int, scale: float) -> GradientFn:
    """Gradients in this process: the global batch cut into micro batches of ``rows``."""

    def gradients(step: int, x: np.ndarray, y: np.ndarray) -> list[float]:
        micro = [(x[i : i + rows], y[i : i + rows]) for i in range(0, len(x), rows)]
        return accumulate_gradients(model, micro, scale)

    return gradients


def gradient_function(
    model: GPT2,
    t: TrainSection,
    global_batch: int,
    rows: int,
    block_size: int,
    group: Any,
    zero: bool,
    say: Callable[[str], None],
) -> tuple[DistributedDataParallel | None, GradientFn]:
    """The gradients of a run: on its GPU; data parallel over the MPI ``group`` (on a GPU
    per rank when the model is on one) or over ``[train] processes`` forked processes where
    the platform can fork; else in this process.
    ``rows`` windows make one micro batch over all processes; ``zero``: ZeRO-1 reduces the
    gradients itself (reduce-scatter), so data parallel leaves them unreduced."""
    on_gpu = model.device.type != "cpu"
    if on_gpu and group is None:
        upload = BatchUploader(model.device)
        return None, device_gradients(model, rows, 1.0 / t.grad_accum_steps, upload)
    if t.processes > 1 and (group is not None or can_fork()):
        # on GPUs (one MPI rank each, nccl transport): batches uploaded, nothing read back
        dp = DistributedDataParallel(
            model, t.processes, global_batch, block_size, t.seed, group,
            reduce_gradients=not zero, upload=BatchUploader(model.device) if on_gpu else None,
        )  # fmt: skip
        where = f" on {model.device} (one GPU per rank, NCCL)" if on_gpu else ""
        say(
            f"data parallel: {t.processes} processes x {t.micro_batch_size} windows per micro "
            f"batch{where}"
        )
        # the mean over the global batch = the mean of the micro-batch means over all ranks
        scale = 1.0 / (t.grad_accum_steps * dp.processes)
        return dp, lambda step, x, y: dp.forward_backward(step, x, y, t.micro_batch_size, scale)
    if t.processes > 1:
        say(
            f"[train] processes = {t.processes}, but this platform cannot fork worker processes: "
            f"each micro batch of {rows} windows runs in this one process (same batches, same "
            "mean gradient, slower)"
        )
    return None, local_gradients(model, rows, 1.0 / t.grad_accum_steps)
