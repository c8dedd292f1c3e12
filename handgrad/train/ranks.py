"""Training on every rank of an MPI job: ``mpirun -n P handgrad train CONFIG``.

Under an MPI launcher (``handgrad.distributed.mpi.launched_by_mpi``) the trainer joins the
default process group and every rank runs the same loop:

    every rank:  manual_seed(seed); GPT2(cfg)        same initial weights
                 default_rng(seed) draws each step's   same global batch on every rank
                 global batch of G windows
                 rows r*m .. (r+1)*m - 1 of each       its share (m = micro_batch_size)
                 micro batch of m*P rows
                 (loss_r / (A P)).backward()           A = grad_accum_steps
                 all-reduce of the gradients (sum,     every rank holds the mean gradient
                 bucketed) and of the losses
                 clip, AdamW step                      same weights on every rank

so the world size P plays the role of ``[train] processes``: G = m x A x P, the same global
batch as ``processes = P`` on one machine (forked ranks) or one process with m x P windows per
micro batch. The resolved config records ``processes = P``, so a checkpoint resumed without
MPI forks P ranks (or runs their shares in one process) and sees the same batches.

With ``[train] device = "cuda"`` each rank trains on its own GPU (``cuda:<local rank>``)
and the gradients are reduced by NCCL (``distributed/nccl.py``, never run on a GPU); the
small host messages (losses, flags) still go over MPI.

Rank 0 alone writes config.json, metrics, plots, samples and checkpoints and prints; the
other ranks wait at a barrier after each checkpoint. Evaluation batches are dealt out over
the ranks (batch b to rank b mod P) and each batch's loss summed over ranks into its own
slot, so the mean is added up in the same order, to the same bits, as in one process.

Errors: refusals while building the run (a bad config, a missing checkpoint) are agreed on
by all ranks (one collective), so every rank returns with one message, printed by the
lowest failing rank. A non-finite loss or gradient norm is seen by every rank (it comes
from reduced values) and stops them all as ``TrainingDiverged``. Any other error on one
rank during training ends the whole job through ``Transport.abort`` (MPI_Abort), with
``rank r of P failed: <traceback>``; rank 0 writes ``latest`` only after a checkpoint is
complete, so it still names the last complete one.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from handgrad import backend as B
from handgrad.backend.device import as_device, to_device
from handgrad.data import iter_batches_sequential
from handgrad.distributed import Transport
from handgrad.grad_mode import no_grad
from handgrad.tensor import Tensor
from handgrad.train.config import ConfigError, TrainConfig, validate
from handgrad.train.evaluate import EvalResult

__all__ = [
    "NullMetrics",
    "RankStopped",
    "abort_job",
    "agree",
    "evaluate_split",
    "join_mpi_group",
    "rank0_first",
    "rank_device",
]

T = TypeVar("T")


class RankStopped(RuntimeError):
    """This rank stops because another rank failed and reported it (nothing to print here)."""


def join_mpi_group(cfg: TrainConfig) -> tuple[Transport | None, TrainConfig]:
    """The process group when an MPI launcher started this process (None otherwise, or for
    one rank), and ``cfg`` with ``[train] processes`` = the world size. The group's transport
    is ``nccl`` when ``[train] device`` is CUDA (one GPU per rank; never run on a GPU), else
    ``mpi``.

    Raises ConfigError for ``processes`` other than 1 or the world size: under MPI the ranks
    are the processes, and forking more inside each rank would multiply the batch. Raises
    ConfigError for ``[train] zero = 1`` outside an MPI job of 2 or more ranks: ZeRO-1 needs
    every rank to step its own slice of AdamW's state, and the forked ranks of
    ``processes = P`` only compute gradients (rank 0 alone steps the whole optimizer), so it
    would silently train as plain data parallel."""
    from handgrad import distributed as dist
    from handgrad.distributed.mpi import launched_by_mpi

    if not launched_by_mpi():
        if cfg.train.zero:
            raise ConfigError(_zero_needs_mpi(cfg.train.processes, None))
        return None, cfg
    t = cfg.train
    if dist.is_initialized():
        group = dist.group()
    else:
        group = _init_group(dist, t.device)
    world = group.world_size
    error = None
    if t.zero and world < 2:
        error = _zero_needs_mpi(t.processes, world)
    elif t.processes not in (1, world):
        error = (
            f"[train] processes = {t.processes}, but this run was started by MPI with "
            f"{world} ranks: under mpirun the ranks are the data-parallel processes; set "
            f"[train] processes = 1 (global batch = micro_batch_size x grad_accum_steps x "
            f"{world} ranks)"
        )
    elif world > 1:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, processes=world))
        try:
            validate(cfg, cfg.name)
        except ConfigError as err:
            error = f"{err} (under MPI, processes is the world size, {world})"
    if error is not None:  # the same on every rank: rank 0 says it
        raise ConfigError(error) if group.rank == 0 else RankStopped(error)
    return (group if world > 1 else None), cfg


def _init_group(dist: Any, device: str) -> Transport:
    """The default group for a run on ``device``: ``nccl`` (one GPU per rank, the config's
    index if it names one) for CUDA, ``mpi`` otherwise. A rank that cannot get a GPU of its
    own makes every rank refuse alike: ConfigError on rank 0, RankStopped on the others."""
    target = as_device(device)
    if target.type != "cuda":
        return dist.init_process_group("mpi")
    from handgrad.distributed.nccl import NCCLSetupError

    try:
        return dist.init_process_group("nccl", device_id=target.index)
    except NCCLSetupError as err:
        raise (ConfigError if err.rank == 0 else RankStopped)(str(err)) from None


def rank_device(device: str, group: Transport | None) -> str:
    """The device this rank trains on: ``cuda:<i>`` for the GPU the ``nccl`` group gave it
    (``[train] device = "cuda"`` means GPU 0 in one process), else ``device`` as given."""
    index = getattr(group, "device_index", None)
    return device if index is None else f"cuda:{index}"


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


def rank0_first(group: Transport | None, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then (once it succeeded) on the other ranks: for work whose
    result rank 0 leaves on disk for the others (preparing the data cache). When rank 0
    fails, the others raise RankStopped."""
    if group is None:
        return fn()
    failed = np.zeros(1)
    if group.rank == 0:
        try:
            value = fn()
        except BaseException:
            failed[0] = 1
            group.broadcast(failed, src=0)
            raise
    group.broadcast(failed, src=0)
    if failed[0]:
        raise RankStopped("rank 0 failed")
    return value if group.rank == 0 else fn()


def agree(group: Transport | None, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, then one collective so that all of them go on or all stop:
    the lowest rank whose ``fn`` raised re-raises its error, the others raise RankStopped."""
    if group is None:
        return fn()
    error: Exception | None = None
    try:
        value = fn()
    except RankStopped as err:
        error = err
        code = 1.0  # failed because another rank did: that one reports
    except Exception as err:  # noqa: BLE001 - re-raised below, on one rank
        error = err
        code = 2.0
    else:
        code = 0.0
    flags = np.zeros(group.world_size)
    flags[group.rank] = code
    group.all_reduce(flags)
    reporters = [r for r in range(group.world_size) if flags[r] == 2]
    if error is not None and reporters and reporters[0] == group.rank:
        raise error
    if flags.any():
        raise RankStopped(f"rank {reporters[0] if reporters else 0} failed")
    return value


def abort_job(group: Transport | None, err: BaseException) -> None:
    """For an error raised on this rank alone: end every rank of the job through
    ``group.abort`` (MPI prints ``rank r of P failed: <traceback>`` and calls MPI_Abort, so
    no rank waits on in a collective). Nothing without a group."""
    if group is not None:
        group.abort("".join(traceback.format_exception(type(err), err, err.__traceback__)))


def evaluate_split(
    model: Any,
    tokens: np.ndarray,
    batches: int,
    micro_batch_size: int,
    block_size: int,
    group: Transport,
) -> EvalResult:
    """``evaluate`` with the batches dealt out over the ranks of ``group``: batch b is
    scored by rank b mod P, into slot b of a (batches,) float64 vector that the ranks sum
    (the other ranks add 0, exactly); the mean is then added up in batch order, so every
    rank gets the bits one process gets."""
    if batches < 1:
        raise ValueError(f"evaluate: batches must be >= 1, got {batches}")
    losses = np.zeros(batches)
    mine: dict[int, Any] = {}  # batch -> its 0-d loss, left on the model's device
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            windows = iter_batches_sequential(tokens, micro_batch_size, block_size, batches)
            for b, (x, y) in enumerate(windows):
                if b % group.world_size == group.rank:
                    x, y = to_device(x, model.device), to_device(y, model.device)
                    _, loss = model(Tensor._make(x), Tensor._make(y))
                    mine[b] = loss.data
    finally:
        model.train(was_training)
    if mine:  # one read of the device for all of this rank's batches
        xp = B.get_array_module(*mine.values())
        losses[list(mine)] = B.to_numpy(xp.stack(list(mine.values())))
    group.all_reduce(losses)
    total = 0.0
    for value in losses:
        total += float(value)
    return EvalResult(total / batches, batches * micro_batch_size * block_size)


class NullMetrics:
    """What ranks other than 0 log to: nothing."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_text(self, step: int, text: str, tag: str = "") -> None:
        pass

    def close(self) -> None:
        pass
