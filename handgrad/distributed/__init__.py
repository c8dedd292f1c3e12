"""Processes that train one model together: a process group and its collectives, with
torch.distributed's names.

    import handgrad.distributed as dist
    dist.init_process_group()            # under mpirun / srun: MPI; otherwise one process
    dist.all_reduce(grad, op="avg")      # in place, on every rank
    dist.destroy_process_group()

Transports (one module each, one interface: ``transport.Transport``):

- ``local``: processes forked on one machine, shared memory; no launcher.
  ``init_process_group("local", world_size=P, worker=fn)`` forks ranks 1 .. P-1, each
  running ``fn()`` with the group set up, and returns in rank 0.
- ``mpi``: mpi4py over any MPI; chosen by default when an MPI launcher started the process.
- ``nccl``: CuPy arrays over NCCL (NumPy ones over MPI), one GPU per rank, started by MPI.

Gradient reduction in buckets: ``reducer.GradientReducer``. How training uses the ranks
(data parallel, ZeRO-1) is ``handgrad.parallel``'s.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from handgrad.distributed.transport import OPS, ProcessGroupError, Transport

__all__ = [
    "OPS",
    "ProcessGroupError",
    "Transport",
    "all_gather",
    "all_reduce",
    "barrier",
    "broadcast",
    "destroy_process_group",
    "get_rank",
    "get_world_size",
    "group",
    "init_process_group",
    "is_initialized",
    "reduce",
    "reduce_scatter",
]

BACKENDS = ("local", "mpi", "nccl")

_group: Transport | None = None
_previous_excepthook: Any = None


def _default_backend() -> str:
    from handgrad.distributed.mpi import launched_by_mpi

    if not launched_by_mpi():
        return "local"
    from handgrad.backend import cuda

    return "nccl" if cuda.is_available() else "mpi"  # as torch: NCCL where there are GPUs


def init_process_group(
    backend: str | None = None,
    *,
    world_size: int | None = None,
    worker: Callable[[], Any] | None = None,
    comm: Any = None,
    capacity: int | None = None,
    device_id: int | None = None,
) -> Transport:
    """Join (or, for ``local``, create) the default process group; returns its transport.

    ``backend`` None picks ``nccl`` where CuPy finds a GPU, else ``mpi``, when an MPI
    launcher started this process, and a one-process ``local`` group otherwise.
    ``world_size`` is for ``local`` (default 1); MPI's comes from the launcher. ``worker``
    (``local`` only) is what ranks 1 .. P-1 run; they exit when it returns. ``comm``: an
    mpi4py communicator other than ``COMM_WORLD`` (``mpi``, ``nccl``). ``capacity``
    (``local``): bytes of shared memory per rank a collective moves at once (32 MiB).
    ``device_id`` (``nccl``, as torch's): this rank's GPU index (default: its local rank on
    its node)."""
    global _group, _previous_excepthook
    if _group is not None:
        raise RuntimeError("init_process_group: the default process group is already set up")
    backend = _default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if device_id is not None and backend != "nccl":
        raise ValueError(f"{backend}: device_id= is for the nccl backend (one GPU per rank)")
    if backend == "local":
        from handgrad.distributed.local import DEFAULT_CAPACITY, LocalTransport

        size = 1 if world_size is None else world_size
        if size > 1 and worker is None:
            raise ValueError("init_process_group('local', world_size > 1) needs worker=")
        transport = LocalTransport(size, DEFAULT_CAPACITY if capacity is None else capacity)
        if size > 1:
            transport.start(_run_worker(worker))
    else:
        if world_size is not None or worker is not None or capacity is not None:
            raise ValueError(f"{backend}: world size and workers come from the MPI launcher")
        from handgrad.distributed.mpi import install_excepthook

        if backend == "mpi":
            from handgrad.distributed.mpi import MPITransport

            transport = MPITransport(comm)
        else:
            from handgrad.distributed.nccl import NCCLTransport

            transport = NCCLTransport(comm, device_id)
        _previous_excepthook = install_excepthook(transport)
    _group = transport
    return transport


def _run_worker(worker: Callable[[], Any]) -> Callable[[Transport], Any]:
    def run(transport: Transport) -> None:
        global _group
        _group = transport  # the forked rank's own default group
        worker()

    return run


def group() -> Transport:
    """The default group's transport; a RuntimeError when there is none."""
    if _group is None:
        raise RuntimeError("no process group: call handgrad.distributed.init_process_group()")
    return _group


def is_initialized() -> bool:
    """Whether ``init_process_group`` has set up the default group."""
    return _group is not None


def get_rank() -> int:
    """This process's rank in the default group (0 .. world size - 1)."""
    return group().rank


def get_world_size() -> int:
    """The number of processes in the default group."""
    return group().world_size


def all_reduce(array: Any, op: str = "sum") -> None:
    """``array`` <- ``op`` ("sum", "avg", "max") over every rank's ``array``, in place."""
    group().all_reduce(array, op)


def reduce(array: Any, dst: int = 0, op: str = "sum") -> None:
    """On rank ``dst`` only: ``array`` <- ``op`` over every rank's ``array``."""
    group().reduce(array, dst, op)


def broadcast(array: Any, src: int = 0) -> None:
    """``array`` <- rank ``src``'s ``array``, in place on every rank."""
    group().broadcast(array, src)


def barrier() -> None:
    """Return once every rank has called ``barrier()``."""
    group().barrier()


def reduce_scatter(output: Any, input: Any) -> None:
    """``output`` (n,) <- the sum over ranks of ``input[rank * n : (rank + 1) * n]``;
    ``input`` holds world size x n elements."""
    group().reduce_scatter(output, input)


def all_gather(output: Any, input: Any) -> None:
    """``output[r * n : (r + 1) * n]`` <- rank r's ``input`` (n elements), on every rank."""
    group().all_gather(output, input)


def destroy_process_group() -> None:
    """Close the default group (rank 0 of ``local`` waits for its workers)."""
    global _group, _previous_excepthook
    if _group is None:
        return
    transport, _group = _group, None
    if _previous_excepthook is not None:
        sys.excepthook, _previous_excepthook = _previous_excepthook, None
    transport.close()
