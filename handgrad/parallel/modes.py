"""Run modes: how one training step is spread over processes, chosen once per run.

The loop asks its mode for what it needs and never learns which mode it has:

    mode.first(fn), mode.agree(fn)     setup work: the writer first / all go on or all stop
    mode.setup(model, optimizer, ...)  gradients machinery; the optimizer to step
    mode.gradients(step, x, y)         each micro batch's loss, gradients in .grad
    mode.clip_and_step(...)            clip to the global norm, AdamW step
    mode.evaluate(tokens, ...)         the validation loss, the same bits in every mode
    mode.writes, mode.say(line)        only one rank writes files and prints
    mode.checkpoint(write)             gathers what a checkpoint needs, the writer writes

The modes (``choose_mode``):

    RunMode       one process, on the CPU or one GPU
    ForkedRanks   [train] processes = P on one machine: P forked processes, rank 0 steps
    MPIRanks      mpirun -n P: every rank steps; CPUs over MPI, GPUs over NCCL (one each);
                  with [train] zero = 1, AdamW's state sharded over the ranks (ZeRO-1)

In every mode each step's global batch of G = m x A x P windows (m = micro_batch_size,
A = grad_accum_steps, P = processes) is drawn whole and cut into A micro batches of m x P
rows; rank r computes rows r*m .. (r+1)*m - 1 of each, with its loss scaled by 1 / (A P), so
the summed gradient is the mean over the global batch whatever P is. A checkpoint records
P, and a run resumed under another mode keeps the same batches.

Under MPI every rank runs the same loop: same seed, same initial weights, same batches drawn,
same collectives in the same order. Refusals while building the run are agreed on by all
ranks (``agree``), so every rank stops with one message, printed by the lowest failing rank;
a non-finite loss or norm comes from reduced values, so every rank sees it. Any other error
on one rank ends the whole job through ``Transport.abort`` (MPI_Abort), naming the rank; the
writer publishes ``latest`` only after a checkpoint is complete, so it still names the last
complete one.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from handgrad.backend import cuda
from handgrad.backend.device import as_device
from handgrad.distributed import Transport
from handgrad.distributed.local import can_fork
from handgrad.distributed.watchdog import Watchdog, hosts
from handgrad.nn import Module
from handgrad.nn.utils import clip_grad_norm_
from handgrad.parallel import step as steps
from handgrad.parallel.ddp import DistributedDataParallel
from handgrad.parallel.evaluate import EvalResult, evaluate
from handgrad.parallel.step import BatchUploader, StepStats, TrainingDiverged, mean_on_device
from handgrad.parallel.zero import ZeroAdamW

__all__ = [
    "ForkedRanks",
    "MPIRanks",
    "ModeError",
    "RankStopped",
    "RunMode",
    "choose_mode",
    "rank_prefix",
]

T = TypeVar("T")


class ModeError(ValueError):
    """A run this launch cannot make (ZeRO-1 without MPI ranks, more processes than ranks)."""


class RankStopped(RuntimeError):
    """This rank stops because another rank failed and reported it (nothing to print here)."""


FAILED = "failed"  # in the run directory: the message of the watchdog that ended a job


class RunMode:
    """One process: the model on ``device`` (the CPU or one GPU). ``processes`` > 1 only
    where forking is impossible: the P shares of each micro batch then run here, as one
    micro batch of m x P rows (the same mean gradient)."""

    rank, world_size, writes = 0, 1, True
    group: Transport | None = None  # the ranks that evaluate together (None: this one)
    run_dir: Path | None = None  # the run's directory, which every rank sees

    def __init__(self, device: str = "cpu", processes: int = 1, say: Callable = print) -> None:
        self.device, self.processes, self._say = device, processes, say

    def say(self, line: str) -> None:
        """Print a status line, on the writing rank only."""
        if self.writes:
            self._say(line)

    def first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the writer, then on the others: for work whose result the writer
        leaves on disk for them (preparing the data)."""
        return fn()

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; all of them go on or all stop."""
        return fn()

    def setup(
        self,
        model: Module,
        optimizer: Any,
        micro_batch_size: int,
        grad_accum_steps: int,
        block_size: int,
        seed: int,
        matmul_precision: str = "highest",
        precision: str | None = None,
    ) -> Any:
        """Get ready to step ``model`` (already on this rank's device, weights restored)
        with ``optimizer`` (state restored); returns the optimizer the run steps and saves.
        ``precision`` "bf16": forward passes under bfloat16 autocast (None: without)."""
        self.model, self.optimizer = model, optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.block_size, self.seed, self.precision = block_size, seed, precision
        self.rows = micro_batch_size * self.processes  # one micro batch over all ranks
        self.global_batch = self.rows * grad_accum_steps
        self.upload = BatchUploader(model.device)
        if model.device.type == "cuda":
            cuda.set_matmul_precision(matmul_precision)
        return optimizer

    def gradients(self, step: int, x: np.ndarray, y: np.ndarray) -> list:
        """Forward and backward of the global batch ``x``, ``y`` (G, T) int64; returns each
        micro batch's loss (floats on the CPU, 0-d device arrays on a GPU)."""
        xd, yd = self.upload(x), self.upload(y)
        r = self.rows
        micro = [(xd[i : i + r], yd[i : i + r]) for i in range(0, len(x), r)]
        return steps.accumulate(self.model, micro, 1.0 / self.grad_accum_steps, self.precision)

    def _clip(self, max_norm: float) -> Any:
        """Clip the gradients to a global norm of ``max_norm``; the norm before clipping."""
        norm = clip_grad_norm_(self.params, max_norm)
        return norm.data if self.model.device.type != "cpu" else float(norm.item())

    def clip_and_step(self, step: int, losses: list, lr: float, grad_clip: float) -> StepStats:
        """The update of one step after ``gradients``:

            loss = sum(losses) / A                   the mean over the global batch
            norm = clip_grad_norm_(params, grad_clip)    grad_clip 0: no clipping
            AdamW step at ``lr``, gradients set to None

        On the CPU raises TrainingDiverged before the update when a loss or the norm is not
        finite (the parameters are left as they were); on a GPU nothing is read here, and
        ``PendingLosses`` finds it when it reads."""
        A = self.grad_accum_steps
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        on_host = isinstance(losses[0], float)
        if on_host:
            for i, value in enumerate(losses):
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"step {step + 1}: training loss is {value} (micro batch {i + 1} of "
                        f"{A}, lr {lr:.3g}); stopping."
                    )
        loss = sum(losses) / A if on_host else mean_on_device(losses, A)
        norm = self._clip(grad_clip if grad_clip > 0 else math.inf)
        if on_host and not math.isfinite(norm):
            raise TrainingDiverged(
                f"step {step + 1}: gradient norm is {norm} (training loss {loss:.4f}); "
                "stopping before the update."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss, norm)

    def evaluate(
        self, tokens: np.ndarray, batches: int, block_size: int, mask: np.ndarray | None = None
    ) -> EvalResult:
        """Validation loss on ``batches`` fixed batches of m x P windows (the same batches
        and the same bits in every mode); ``mask``: the split's loss mask, if it has one."""
        return evaluate(
            self.model, tokens, batches, self.rows, block_size, self.group, mask, self.precision
        )

    def checkpoint(self, write: Callable[[], Path]) -> Path | None:
        """``write()`` on the writer, once every rank has made ready what it needs."""
        return write() if self.writes else None

    def diverged(self, message: str) -> Exception:
        """The error to stop with when the run diverged (every rank sees it)."""
        return TrainingDiverged(message)

    def abort(self, err: BaseException) -> None:
        """An error raised on this rank alone: end the other ranks too (none here)."""

    def close(self) -> None:
        """Stop what ``setup`` started."""

    def describe(self) -> str | None:
        """A line saying how the work is spread, or None for one process."""
        if self.processes == 1:
            return None
        why = (
            "forked ranks share one machine's CPU cores"
            if self.device != "cpu"
            else "this platform cannot fork worker processes"
        )
        return (
            f"[train] processes = {self.processes} on {self.device}, but {why}: each micro "
            f"batch of {self.rows} windows runs in this one process (the same batches and mean "
            "gradient; one MPI rank per GPU splits them: mpirun -n P)"
        )


class ForkedRanks(RunMode):
    """``[train] processes = P`` on one machine: each micro batch split over P forked
    processes that share the parameters' memory; their gradients are reduced to this
    process (rank 0), which alone steps, evaluates and writes (``ddp.py``)."""

    def setup(self, model: Module, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        optimizer = super().setup(model, optimizer, *args, **kwargs)
        self.dp = DistributedDataParallel(
            model, self.processes, self.global_batch, self.block_size, self.seed,
            precision=self.precision,
        )  # fmt: skip
        return optimizer

    def gradients(self, step: int, x: np.ndarray, y: np.ndarray) -> list:
        scale = 1.0 / (self.grad_accum_steps * self.processes)
        return self.dp.forward_backward(step, x, y, self.micro_batch_size, scale)

    def close(self) -> None:
        if hasattr(self, "dp"):
            self.dp.close()

    def describe(self) -> str:
        return (
            f"data parallel: {self.processes} processes x {self.micro_batch_size} windows per "
            "micro batch"
        )


class MPIRanks(RunMode):
    """Every rank of an MPI job runs the loop (``mpirun -n P``): each computes its share of
    every micro batch, the gradients are all-reduced (MPI on CPUs, NCCL with one GPU per
    rank) and each rank steps its own optimizer to the same weights. With ``zero`` the
    gradients are reduce-scattered instead and each rank steps its slice of AdamW's state
    (``zero.py``). Rank 0 alone writes and prints; evaluation batches are dealt out over the
    ranks."""

    def __init__(
        self,
        group: Transport,
        device: str,
        zero: bool,
        say: Callable = print,
        collective_timeout: float = 10.0,
    ) -> None:
        super().__init__(device, group.world_size, say)
        self.group, self.zero, self.collective_timeout = group, zero, collective_timeout
        self.rank, self.world_size, self.writes = group.rank, group.world_size, group.rank == 0
        self.hosts = hosts(group)  # every rank's host name, for the start line and failures
        self.watchdog: Watchdog | None = None

    def first(self, fn: Callable[[], T]) -> T:
        failed = np.zeros(1)
        if self.rank == 0:
            try:
                value = fn()
            except BaseException:
                failed[0] = 1
                self.group.broadcast(failed, src=0)
                raise
        self.group.broadcast(failed, src=0)
        if failed[0]:
            raise RankStopped("rank 0 failed")
        return value if self.rank == 0 else fn()

    def agree(self, fn: Callable[[], T]) -> T:
        """The lowest rank whose ``fn`` raised re-raises its error; the others raise
        RankStopped. One collective either way."""
        error: Exception | None = None
        try:
            value = fn()
        except RankStopped as err:
            error, code = err, 1.0  # failed because another rank did: that one reports
        except Exception as err:  # noqa: BLE001 - re-raised below, on one rank
            error, code = err, 2.0
        else:
            code = 0.0
        flags = np.zeros(self.world_size)
        flags[self.rank] = code
        self.group.all_reduce(flags)
        reporters = [r for r in range(self.world_size) if flags[r] == 2]
        if error is not None and reporters and reporters[0] == self.rank:
            raise error
        if flags.any():
            raise RankStopped(f"rank {reporters[0] if reporters else 0} failed")
        return value

    def setup(self, model: Module, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        super().setup(model, optimizer, *args, **kwargs)
        if self.zero:  # takes over the restored state, keeping this rank's slice
            self.optimizer = ZeroAdamW(optimizer, self.group)
        on_gpu = model.device.type != "cpu"
        self.dp = DistributedDataParallel(
            model, self.processes, self.global_batch, self.block_size, self.seed, self.group,
            reduce_gradients=not self.zero, upload=self.upload if on_gpu else None,
            precision=self.precision,
        )  # fmt: skip
        # MPI collectives have no timeout: a lost, cut-off or stalled rank ends the job
        self.watchdog = Watchdog(
            self.group, self.collective_timeout, self._end_job, self.hosts,
            record=self._record_failure,
        )  # fmt: skip
        self.watchdog.catch_sigterm()  # a launcher that lost a host ends this rank
        return self.optimizer

    def _end_job(self, message: str) -> None:
        """The watchdog's end: where a peer's process ended, its launcher may be ending the
        job already, so the message goes where the launcher prints (``end_job(direct)``)."""
        saw_end = self.watchdog is not None and self.watchdog.saw_end
        self.group.end_job(message, direct=saw_end)

    def _record_failure(self, message: str) -> None:
        """``run_dir/failed`` <- the watchdog's message, by the first rank to end the job: a
        launcher that lost a host may end the job before a surviving rank's output reaches
        it, but not before this file is written (the next start on the run prints it)."""
        if self.run_dir is None:
            return
        with contextlib.suppress(OSError), open(self.run_dir / FAILED, "x") as f:
            f.write(message + "\n")

    def gradients(self, step: int, x: np.ndarray, y: np.ndarray) -> list:
        self._progress()
        scale = 1.0 / (self.grad_accum_steps * self.processes)
        return self.dp.forward_backward(step, x, y, self.micro_batch_size, scale)

    def clip_and_step(self, step: int, losses: list, lr: float, grad_clip: float) -> StepStats:
        stats = super().clip_and_step(step, losses, lr, grad_clip)
        self._progress()
        return stats

    def _progress(self) -> None:
        if self.watchdog is not None:
            self.watchdog.progress()

    def _paused(self) -> Any:
        return self.watchdog.paused() if self.watchdog is not None else contextlib.nullcontext()

    def evaluate(
        self, tokens: np.ndarray, batches: int, block_size: int, mask: np.ndarray | None = None
    ) -> EvalResult:
        with self._paused():
            return super().evaluate(tokens, batches, block_size, mask)

    def _clip(self, max_norm: float) -> Any:
        if self.zero:  # reduce-scatter; the norm over every rank's slice
            return self.optimizer.reduce_and_clip(max_norm)
        return super()._clip(max_norm)

    def checkpoint(self, write: Callable[[], Path]) -> Path | None:
        with self._paused():  # rank 0 writes while the others wait: no usual length
            if self.zero:
                self.optimizer.gather_state(dst=0)  # every rank: AdamW's state, to rank 0
            path = write() if self.writes else None
            self.group.barrier()
        return path

    def diverged(self, message: str) -> Exception:
        return TrainingDiverged(message) if self.writes else RankStopped("training diverged")

    def abort(self, err: BaseException) -> None:
        """MPI prints ``rank r of P failed: <traceback>`` and calls MPI_Abort, so no rank
        waits on in a collective."""
        if self.watchdog is not None:
            self.watchdog.close()  # the peers' watchdogs leave the report to this one
        self.group.abort("".join(traceback.format_exception(type(err), err, err.__traceback__)))

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        if hasattr(self, "dp"):
            self.dp.close()

    def describe(self) -> str:
        where = f" on {self.device} (one GPU per rank, NCCL)" if self.device != "cpu" else ""
        zero = ", AdamW state sharded (ZeRO-1)" if self.zero else ""
        timeout = self.collective_timeout
        return (
            f"data parallel: {self.processes} MPI ranks x {self.micro_batch_size} windows per "
            f"micro batch{where}{zero}; {host_line(self.hosts)}; transport "
            f"{transport_line(self.group)}; collective timeout "
            f"{f'{timeout:g} s' if timeout > 0 else 'off'}"
        )


# ----------------------------------------------------------------------------------------
# choosing the mode


def host_line(hosts: list[str], most: int = 8) -> str:
    """``"2 hosts: a (rank 0), b (rank 1)"`` from every rank's host name (rank order);
    consecutive ranks as ranges, at most ``most`` hosts named."""
    ranks: dict[str, list[int]] = {}
    for rank, name in enumerate(hosts):
        ranks.setdefault(name, []).append(rank)

    def spans(rs: list[int]) -> str:
        out, start = [], rs[0]
        for i, r in enumerate(rs):
            if i + 1 == len(rs) or rs[i + 1] != r + 1:  # a run of consecutive ranks ends
                out.append(str(r) if r == start else f"{start}-{r}")
                start = rs[i + 1] if i + 1 < len(rs) else r
        return f"rank{'s' if len(rs) > 1 else ''} {', '.join(out)}"

    named = [f"{h} ({spans(rs)})" for h, rs in list(ranks.items())[:most]]
    more = f", {len(ranks) - most} more" if len(ranks) > most else ""
    return f"{len(ranks)} host{'s' if len(ranks) > 1 else ''}: {', '.join(named)}{more}"


def transport_line(group: Transport) -> str:
    """What moves the gradients: the transport's own account (MPI library, BTLs, interface)."""
    describe = getattr(group, "describe", None)
    return describe() if callable(describe) else group.name


def choose_mode(
    device: str,
    processes: int,
    zero: bool,
    say: Callable = print,
    collective_timeout: float = 10.0,
) -> RunMode:
    """The mode of a run on ``device`` ('cpu', 'cuda', 'cuda:N') with ``[train] processes``
    and ``zero``, for the way this process was launched (by MPI or not).

    Raises ModeError for a run that cannot be made: ``processes`` other than 1 or the world
    size under MPI (forking more inside each rank would multiply the batch); ZeRO-1 outside
    an MPI job of 2 or more ranks (the forked ranks of ``processes = P`` only compute
    gradients and rank 0 steps the whole optimizer, so it would silently train as plain
    data parallel). Without MPI, ``processes`` > 1 forks CPU ranks where the platform can;
    on a GPU (or without fork) the P shares of each micro batch run in one process, as one
    micro batch of m x P windows: the same batches and mean gradient.
    ``collective_timeout``: the watchdog's seconds of no progress beyond a step's usual time
    before it ends an MPI job. Under MPI a refusal is the same on every rank:
    ModeError on rank 0, RankStopped on the others."""
    from handgrad.distributed.mpi import launched_by_mpi

    if launched_by_mpi():
        return _mpi_mode(device, processes, zero, say, collective_timeout)
    if zero:
        raise ModeError(_zero_needs_mpi(processes, None))
    if processes > 1 and can_fork() and as_device(device).type == "cpu":
        return ForkedRanks(device, processes, say)
    return RunMode(device, processes, say)  # on one GPU the P shares are one micro batch


def _mpi_mode(
    device: str, processes: int, zero: bool, say: Callable, collective_timeout: float
) -> RunMode:
    from handgrad import distributed as dist

    group = dist.group() if dist.is_initialized() else _init_group(dist, device)
    world = group.world_size
    error = None
    if zero and world < 2:
        error = _zero_needs_mpi(processes, world)
    elif processes not in (1, world):
        error = (
            f"[train] processes = {processes}, but this run was started by MPI with {world} "
            "ranks: under mpirun the ranks are the data-parallel processes; set [train] "
            f"processes = 1 (global batch = micro_batch_size x grad_accum_steps x {world} ranks)"
        )
    if error is not None:  # the same on every rank: rank 0 says it
        raise ModeError(error) if group.rank == 0 else RankStopped(error)
    index = getattr(group, "device_index", None)  # the GPU the nccl group gave this rank
    here = device if index is None else f"cuda:{index}"
    if world == 1:
        return RunMode(here, 1, say)
    return MPIRanks(group, here, zero, say, collective_timeout)


def _init_group(dist: Any, device: str) -> Transport:
    """The default group for a run on ``device``: ``nccl`` (one GPU per rank, the config's
    index if it names one) for CUDA, ``mpi`` otherwise. A rank that cannot get a GPU of its
    own makes every rank refuse alike."""
    target = as_device(device)
    if target.type != "cuda":
        return dist.init_process_group("mpi")
    from handgrad.distributed.nccl import NCCLSetupError

    try:
        return dist.init_process_group("nccl", device_id=target.index)
    except NCCLSetupError as err:
        raise (ModeError if err.rank == 0 else RankStopped)(str(err)) from None


def _zero_needs_mpi(processes: int, world: int | None) -> str:
    """Why ``[train] zero = 1`` is refused: ``world`` MPI ranks (None: not under MPI)."""
    if world is not None:
        where = f"this run has {world} MPI rank"
    elif processes > 1:
        where = (
            f"this run was not started by MPI, and its [train] processes = {processes} forked "
            "ranks only compute gradients (rank 0 steps the whole optimizer)"
        )
    else:
        where = "this run was not started by MPI"
    return (
        "[train] zero = 1 needs MPI ranks (mpirun -n P handgrad train CONFIG, P >= 2): ZeRO-1 "
        f"shards AdamW's state over ranks that each step their own slice, but {where}; run it "
        "under mpirun or set [train] zero = 0"
    )


def rank_prefix() -> str:
    """``"rank r of P: "`` for an error printed by a rank other than 0 of an MPI job (rank
    0's errors are the usual case), else ``""``."""
    from handgrad import distributed as dist

    if dist.is_initialized() and dist.get_rank() > 0:
        return f"rank {dist.get_rank()} of {dist.get_world_size()}: "
    return ""
