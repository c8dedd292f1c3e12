"""Data parallelism: each step's batch split over P processes (forked ranks or MPI ranks).

A small model leaves most of an op's time to fixed costs: one NumPy call per pass over the
data, each pass on one core. Sharing each op out over threads does not pay there: handing a
piece to another thread costs ~0.1 ms on this project's VM (``benchmarks/bench_threads.py``),
more than most ops of the shakespeare-char model take, and the GIL serialises the Python
between NumPy calls. Whole forward and backward passes side by side do pay. Threads could
run them about as fast (``benchmarks/README.md``), but they would share the global dropout
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

Every rank runs the same few collectives of the ``local`` transport
(``handgrad.distributed.local``: forked processes, shared memory) per step:

    broadcast  [step, m, scale, x, y]         from rank 0
    reduce     [losses..., has-grad flags]    to rank 0 (float64, sums in rank order)
    reduce     the gradients, bucketed        to rank 0 (``distributed.reducer``)

Each parameter's ``.grad`` is a view of its slice of the reducer's flat bucket (PyTorch
DDP's ``gradient_as_bucket_view``): backward's hooks move each first gradient of a step
there and later micro batches add into it, so the reduction runs in place and no second copy
of the gradients exists; clipping and the optimizer read the views. ``zero_grad()`` still
sets ``.grad = None``; a parameter no rank reached keeps it.

Nothing is pickled. A worker that raises, or dies, makes rank 0's next collective fail
with a message naming it; a worker ends as soon as rank 0 does (see ``local.py``). Needs
the ``fork`` start method (Linux; macOS untested); without it the trainer runs the P shares
of each micro batch in one process (same batches, same mean gradient) and says so.

Given a ``group`` whose every rank runs the training loop (MPI under mpirun), the same
class skips the broadcast (each rank draws the same batch from the same generator) and
all-reduces instead of reducing to rank 0, so every rank holds the summed gradient and
steps its own optimizer to the same weights. There the reduction overlaps the last micro
batch's backward, as PyTorch's DDP does (``overlap``, on by default): each bucket's
non-blocking all-reduce starts as soon as backward has finished its gradients, and the step
waits for the outstanding buckets after backward (``distributed.reducer``). Earlier micro
batches only accumulate (DDP's ``no_sync``). The forked ranks reduce to rank 0 after
backward: their transport has no non-blocking collective to overlap with.

With a model on a GPU (one MPI rank per GPU, ``nccl`` transport) each rank uploads its
rows and keeps its losses on the device: the gradients and losses are all-reduced there by
NCCL, the has-gradient flags over MPI, and no step reads the GPU back.
That path reduces after backward: NCCL's collectives queue on the compute stream, so
starting them inside backward would not overlap anything until they get a stream of their
own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.distributed import ProcessGroupError, Transport
from handgrad.distributed.local import LocalTransport, SharedArrays, can_fork
from handgrad.distributed.reducer import GradientReducer
from handgrad.nn import Module
from handgrad.parallel import step as steps
from handgrad.random import manual_seed

__all__ = ["DistributedDataParallel"]

_HEAD = 4  # int64 words before x and y in the step message: command, step, m, scale bits
_STEP, _STOP = 1, 0


class DistributedDataParallel:
    """Forward and backward of each step's batch over ``processes`` processes, for ``model``
    trained on windows of shape ``(rows, block_size)``.

    Without ``group`` (``[train] processes = P``): this process is rank 0 and alone calls
    ``forward_backward``; the parameters move into shared memory (same values), the workers
    are forked and read them, and the summed gradient arrives on rank 0 only. Build the
    optimizer's state before or after, but do not replace a parameter's array afterwards
    (``forward_backward`` checks). Call ``close()`` when done (or use ``with``).

    With ``group`` (a transport every rank of which runs the same training loop, e.g. MPI's
    under mpirun): every rank calls ``forward_backward`` with the same ``x``, ``y`` and gets
    the summed gradient, so each can step its own optimizer to the same weights; with
    ``reduce_gradients=False`` each rank keeps its own gradient (ZeRO-1 reduce-scatters
    them: zero.py). ``overlap`` (with a group): reduce the gradient buckets during the
    last micro batch's backward rather than after it; the same sums either way.
    ``upload`` (a group only): the model is on this rank's GPU and ``upload`` copies a host
    batch there (``step.BatchUploader``); the losses then come back as 0-d device
    arrays, read later.
    """

    def __init__(
        self,
        model: Module,
        processes: int,
        rows: int,
        block_size: int,
        seed: int,
        group: Transport | None = None,
        reduce_gradients: bool = True,
        upload: Callable[[np.ndarray], Any] | None = None,
        overlap: bool = True,
        precision: str | None = None,
    ):
        name = type(self).__name__
        if processes < 2:
            raise ValueError(f"{name}: processes must be >= 2, got {processes}")
        if rows % processes:
            raise ValueError(f"{name}: {rows} rows do not split over {processes} processes")
        if group is not None and group.world_size != processes:
            raise ValueError(
                f"{name}: processes = {processes}, but the group has {group.world_size} ranks"
            )
        if group is None and upload is not None:
            raise ValueError(f"{name}: a model on a GPU needs a group (one MPI rank per GPU)")
        if group is None and not reduce_gradients:
            raise ValueError(f"{name}: reduce_gradients=False needs a group (ZeRO-1 under MPI)")
        if group is None and not can_fork():
            raise RuntimeError(
                "data-parallel training (processes > 1) forks its workers, and this platform "
                "has no fork start method; set [train] processes = 1"
            )
        self.model, self.processes, self.seed = model, processes, seed
        self.precision = precision  # "bf16": each rank's forward passes under autocast
        self.upload = upload  # host batch -> the model's device (None: the model is on the CPU)
        self.reduce_gradients = reduce_gradients  # False: each rank keeps its own (ZeRO-1)
        self.rows, self.block_size = rows, block_size
        self.params = list(model.parameters())
        self._message = np.zeros(_HEAD + 2 * rows * block_size, dtype=np.int64)
        self._x = self._message[_HEAD : _HEAD + rows * block_size].reshape(rows, block_size)
        self._y = self._message[_HEAD + rows * block_size :].reshape(rows, block_size)
        self._forked = group is None
        self._param_arrays: list[np.ndarray] = []
        if self._forked:
            shared = SharedArrays([(tuple(p.shape), p.dtype) for p in self.params])
            for p, a in zip(self.params, shared.arrays):
                a[...] = p.data
                p.data = a
            self._shared, self._param_arrays = shared, shared.arrays
            group = LocalTransport(processes)
        self.group = group
        # the gradients live in the reducer's buckets (its hooks move each one there as
        # backward produces it); ZeRO-1 reduce-scatters them from the parameters instead
        self.reducer = GradientReducer(self.params, group) if reduce_gradients else None
        if self.reducer is not None:
            self.reducer.attach()
        # only where every rank all-reduces: the forked ranks reduce to rank 0, over a
        # transport whose collectives block (nothing to overlap with)
        self.overlap = overlap and reduce_gradients and not self._forked and upload is None
        if self._forked:
            group.start(self._serve, name="handgrad-rank")

    @property
    def workers(self) -> list[Any]:
        """The forked worker processes (``multiprocessing.Process``), rank r at index r - 1."""
        return getattr(self.group, "processes", [])

    # ---- rank 0 (every rank with a group)
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
                    f"{type(self).__name__}: parameter {i} (shape {tuple(p.shape)}) was given "
                    "a new array after the workers started; they would train on stale weights"
                )
        if x.shape != self._x.shape or y.shape != self._y.shape:
            raise ValueError(
                f"{type(self).__name__}: batch shapes {x.shape} and {y.shape}, expected "
                f"{self._x.shape}"
            )
        scale_bits = np.array(scale, dtype=np.float64).view(np.int64)
        self._message[:_HEAD] = _STEP, step, micro_batch_size, scale_bits
        self._x[...], self._y[...] = x, y
        try:
            return self._step()
        except ProcessGroupError as err:
            raise self._worker_error(err) from None

    def _worker_error(self, err: ProcessGroupError) -> RuntimeError:
        if err.exitcode is None:
            return RuntimeError(f"data-parallel worker {err.rank} failed:\n{err.detail}")
        return RuntimeError(
            f"data-parallel worker {err.rank} stopped without replying (exit code "
            f"{err.exitcode}; killed, e.g. for lack of memory?)"
        )

    def _step(self) -> list[Any]:
        """One step on any rank, from the broadcast of rank 0's message on (forked workers;
        with a group every rank has the message already).

        On the CPU the micro-batch losses come back as floats, summed over ranks with the
        has-gradient flags in one float64 collective. On a GPU this rank's rows of every
        micro batch are uploaded once and the losses stay on the device, summed over ranks
        there, so nothing is read back; the has-gradient flags are host values and go over
        the host wire (MPI). Returns each micro batch's loss, the mean over ranks."""
        group, rank = self.group, self.group.rank
        dst = 0 if self._forked else None  # forked: only rank 0 steps the optimizer
        if self._forked:
            group.broadcast(self._message, src=0)
        if self._message[0] == _STOP:
            return []
        step, m = int(self._message[1]), int(self._message[2])
        scale = float(self._message[3:4].view(np.float64)[0])
        if rank > 0:  # this rank's dropout at this step
            seed = np.random.SeedSequence([self.seed, step, rank]).generate_state(1)
            manual_seed(int(seed[0]))
        shards = self._shard(rank, m)
        if self.upload is not None:  # one upload of this rank's rows, cut on the device
            x = self.upload(np.concatenate([xs for xs, _ in shards]))
            y = self.upload(np.concatenate([ys for _, ys in shards]))
            shards = [(x[i : i + m], y[i : i + m]) for i in range(0, len(x), m)]
        if self.overlap:  # a parameter's bucket may go once its last micro batch's backward is done
            self.reducer.arm("sum", backwards=len(shards))
        with B.num_threads(1):  # one core per rank
            losses = steps.accumulate(self.model, shards, scale, self.precision)
        if self.overlap:  # the buckets backward left, before the stats' collective on any rank
            self.reducer.flush()
        n = len(shards)
        has_grad = [p.grad is not None for p in self.params]
        if self.upload is not None:
            xp = B.get_array_module(*losses)
            total = xp.stack([v.astype(B.float64) for v in losses])  # (micro batches,)
            flags = np.array(has_grad, dtype=np.float64)
            group.all_reduce(total)
            group.all_reduce(flags)
        else:  # losses (nan where this rank stopped) then has-grad flags, summed over ranks
            total = np.full(n + len(self.params), math.nan)
            total[: len(losses)] = losses
            total[n:] = has_grad
            if dst is None:
                group.all_reduce(total)
            else:
                group.reduce(total, dst=dst)
            total, flags = [float(v) for v in total[:n]], total[n:]
        if self.reduce_gradients:
            has_grad = [bool(f) for f in flags]
            if self.overlap:
                self.reducer.wait(has_grad)
            else:
                self.reducer.reduce("sum", dst=dst, has_grad=has_grad)
        if self._forked and rank > 0:
            for p in self.params:
                p.grad = None
        return [total[i] / self.processes for i in range(n)]

    def _shard(self, rank: int, m: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rank ``rank``'s rows of every micro batch in x, y."""
        per_step = m * self.processes
        return [
            (self._x[s + rank * m : s + (rank + 1) * m], self._y[s + rank * m : s + (rank + 1) * m])
            for s in range(0, len(self._x), per_step)
        ]

    def close(self) -> None:
        """Stop the forked workers (they also stop by themselves when this process exits);
        a given group is left to its owner."""
        if self.reducer is not None:
            self.reducer.detach()
        if not self._forked:
            return
        if self.group.failure() is None and not self.group._closed:
            self._message[0] = _STOP
            try:
                self.group.broadcast(self._message, src=0)
            except ProcessGroupError:
                pass  # close() also ends workers that can no longer hear
        self.group.close()

    def __enter__(self) -> DistributedDataParallel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- ranks 1..P-1 (in the forked child)
    def _serve(self, group: LocalTransport) -> None:
        B.set_num_threads(1)
        while True:
            self._step()
            if self._message[0] == _STOP:
                return
