"""Data parallelism on one machine: each step's batch split over P processes, one per core.

A small model leaves most of an op's time to fixed costs: one NumPy call per pass over the
data, each pass on one core. Sharing each op out over threads does not pay there: handing a
piece to another thread costs ~0.1 ms on this project's VM (``benchmarks/bench_threads.py``),
more than most ops of the shakespeare-char model take, and the GIL serialises the Python
between NumPy calls. Whole forward and backward passes side by side do pay. Threads could
run them too (a prototype was about as fast), but they would share the global dropout
generator and each parameter's ``.grad``, making results depend on thread timing; processes
keep every rank's work deterministic. So P processes each run their share of the batch, on
one core with single-threaded ops, as PyTorch's DistributedDataParallel does on one machine:

    micro batch of m*P windows:   rank r takes rows r*m .. (r+1)*m - 1
    every rank:                   (loss_r * scale).backward(),  scale = 1 / (P * accum)
    rank 0:                       grad = sum of the ranks' grads; clip, AdamW, as with P = 1

so the gradient is the mean over all m*P*accum windows, as in one process. The parameters
live in shared memory: rank 0's optimizer updates them in place and the workers read them
at their next step. Workers are forked from rank 0 once the model is built (or loaded), so
they start with its weights and code. Rank 0 draws every step's windows and alone
evaluates, samples and writes checkpoints, so the data and every saved RNG state are the
same for any P. Dropout in worker r draws from a generator seeded with (seed, step, r), so a
resumed run repeats it exactly.

Messages are a few bytes of JSON over a pipe; the windows and the gradients go through
shared memory (nothing is pickled). Needs the ``fork`` start method (Linux; macOS untested);
without it the trainer runs the P shares of each micro batch in one process (same batches,
same mean gradient) and says so.
"""

from __future__ import annotations

import json
import math
import mmap
import multiprocessing as mp
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.nn import Module
from handgrad.random import manual_seed
from handgrad.tensor import Tensor

_ALIGN = 64  # bytes: each shared array starts on a cache line


def can_fork() -> bool:
    """Whether this platform has the ``fork`` start method the workers need."""
    return "fork" in mp.get_all_start_methods()


def accumulate_gradients(
    model: Module, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], scale: float
) -> list[float]:
    """``(loss * scale).backward()`` for each ``(x, y)`` (B, T) micro batch, gradients adding
    up in ``.grad``; returns the unscaled losses. Stops after a loss that is not finite
    (nothing is backpropagated from it): the caller reports it."""
    losses = []
    for x, y in micro_batches:
        _, loss = model(Tensor._make(x), Tensor._make(y))
        value = float(loss.item())
        losses.append(value)
        if not math.isfinite(value):
            break
        (loss if scale == 1.0 else loss * scale).backward()
    return losses


class _SharedArrays:
    """Arrays of given shapes and dtypes laid out in one anonymous shared mapping, which
    processes forked afterwards see (and write) as the same memory."""

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> None:
        offsets, end = [], 0
        for shape, dtype in specs:
            end = -(-end // _ALIGN) * _ALIGN
            offsets.append(end)
            end += math.prod(shape) * np.dtype(dtype).itemsize
        self._map = mmap.mmap(-1, max(end, 1))  # anonymous + MAP_SHARED: shared with children
        raw = np.frombuffer(self._map, dtype=np.uint8)
        self.arrays = [
            raw[o : o + math.prod(shape) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
            for o, (shape, dtype) in zip(offsets, specs)
        ]


class DataParallel:
    """Forward and backward of each step's batch over ``processes`` processes (rank 0 is
    this one), for ``model`` trained on windows of shape ``(rows, block_size)``.

    Moves the model's parameters into shared memory (same values) and forks the workers;
    build the optimizer's state before or after, but do not replace a parameter's array
    afterwards (``forward_backward`` checks). Call ``close()`` when done (or use ``with``).
    """

    def __init__(self, model: Module, processes: int, rows: int, block_size: int, seed: int):
        if processes < 2:
            raise ValueError(f"DataParallel: processes must be >= 2, got {processes}")
        if rows % processes:
            raise ValueError(f"DataParallel: {rows} rows do not split over {processes} processes")
        if not can_fork():
            raise RuntimeError(
                "data-parallel training (processes > 1) forks its workers, and this platform "
                "has no fork start method; set [train] processes = 1"
            )
        self.model, self.processes, self.seed = model, processes, seed
        self.params = list(model.parameters())
        workers = processes - 1
        specs = [(tuple(p.shape), p.dtype) for p in self.params]
        specs += [((rows, block_size), np.dtype(np.int64))] * 2  # the step's x and y
        # gradients come in the compute dtype (float32 for bfloat16 parameters)
        specs += [
            (tuple(p.shape), B.compute_dtype(p.dtype)) for _ in range(workers) for p in self.params
        ]
        shared = _SharedArrays(specs)
        n = len(self.params)
        self._param_arrays = shared.arrays[:n]
        self._x, self._y = shared.arrays[n : n + 2]
        self._grads = [shared.arrays[n + 2 + w * n : n + 2 + (w + 1) * n] for w in range(workers)]
        for p, a in zip(self.params, self._param_arrays):
            a[...] = p.data
            p.data = a
        self._shared = shared
        ctx = mp.get_context("fork")
        self._conns, self._procs = [], []
        for rank in range(1, processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=self._serve, args=(rank, child), daemon=True, name=f"handgrad-rank{rank}"
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    # ---- rank 0
    def forward_backward(
        self, step: int, x: np.ndarray, y: np.ndarray, micro_batch_size: int, scale: float
    ) -> list[float]:
        """Accumulate into ``.grad`` the gradients of ``scale`` x the loss of each micro batch
        of ``x``, ``y`` (rows, T): micro batch i is rows i*m*P .. (i+1)*m*P - 1 with
        m = ``micro_batch_size``, split over the ranks. Returns the loss of each micro batch
        (the mean over its ranks; nan after a rank stopped at a non-finite loss)."""
        for i, (p, a) in enumerate(zip(self.params, self._param_arrays)):
            if p.data is not a:
                raise RuntimeError(
                    f"DataParallel: parameter {i} (shape {tuple(p.shape)}) was given a new array "
                    "after the workers started; they would train on stale weights"
                )
        if x.shape != self._x.shape or y.shape != self._y.shape:
            raise ValueError(
                f"DataParallel: batch shapes {x.shape} and {y.shape}, expected {self._x.shape}"
            )
        self._x[...], self._y[...] = x, y
        message = json.dumps({"step": step, "micro": micro_batch_size, "scale": scale}).encode()
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(message)
            except OSError:
                raise RuntimeError(
                    f"data-parallel worker {rank} has stopped (exit code "
                    f"{self._procs[rank - 1].exitcode})"
                ) from None
        with B.num_threads(1):  # this process's share of the cores, as each worker's
            per_rank = [accumulate_gradients(self.model, self._shard(0, micro_batch_size), scale)]
        for rank, conn in enumerate(self._conns, start=1):
            try:
                reply = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                self._procs[rank - 1].join(timeout=1)
                raise RuntimeError(
                    f"data-parallel worker {rank} stopped without replying (exit code "
                    f"{self._procs[rank - 1].exitcode}; killed, e.g. for lack of memory?)"
                ) from None
            if "error" in reply:
                raise RuntimeError(f"data-parallel worker {rank} failed:\n{reply['error']}")
            per_rank.append(reply["losses"])
            for p, g, has in zip(self.params, self._grads[rank - 1], reply["has_grad"]):
                if not has:
                    continue
                if p.grad is None:
                    p.grad = Tensor._make(g.copy())
                else:
                    p.grad.data += g
        steps = len(x) // (micro_batch_size * self.processes)
        padded = [losses + [math.nan] * (steps - len(losses)) for losses in per_rank]
        return [sum(values) / self.processes for values in zip(*padded)]

    def _shard(self, rank: int, m: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rank ``rank``'s rows of every micro batch in the shared x, y."""
        per_step = m * self.processes
        return [
            (self._x[s + rank * m : s + (rank + 1) * m], self._y[s + rank * m : s + (rank + 1) * m])
            for s in range(0, len(self._x), per_step)
        ]

    def close(self) -> None:
        """Stop the workers (they also stop by themselves when this process exits)."""
        for conn in self._conns:
            try:
                conn.send_bytes(b"null")
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- ranks 1..P-1 (in the forked child)
    def _serve(self, rank: int, conn: Any) -> None:
        B.set_num_threads(1)
        for conn_of_other in self._conns:  # pipes of earlier workers, inherited by the fork
            conn_of_other.close()
        grads = self._grads[rank - 1]
        try:
            while True:
                msg = json.loads(conn.recv_bytes())
                if msg is None:
                    return
                seed = np.random.SeedSequence([self.seed, msg["step"], rank]).generate_state(1)
                manual_seed(int(seed[0]))  # this rank's dropout at this step
                losses = accumulate_gradients(
                    self.model, self._shard(rank, msg["micro"]), msg["scale"]
                )
                has_grad = []
                for p, g in zip(self.params, grads):
                    has_grad.append(p.grad is not None)
                    if p.grad is not None:
                        np.copyto(g, p.grad.data)
                        p.grad = None
                conn.send_bytes(json.dumps({"losses": losses, "has_grad": has_grad}).encode())
        except (EOFError, KeyboardInterrupt):  # rank 0 has gone (or the user stopped the run)
            return
        except BaseException:  # noqa: BLE001 - whatever it is, rank 0 must hear of it
            conn.send_bytes(json.dumps({"error": traceback.format_exc()}).encode())
