"""The one small interface every transport (``local``, ``mpi``, ``nccl``) implements.

A transport moves the bytes of backend arrays (NumPy, or CuPy for ``nccl``) between the
``world_size`` ranks of one run. Every collective is called by every rank, in the same order,
with arrays of the same shape and dtype on every rank (the usual MPI contract); the arrays
must be C-contiguous because they are handed over as flat buffers.

    all_reduce(a, op)        a <- op over ranks of a           (in place; sum, avg, max)
    reduce(a, dst, op)       on rank dst only: a <- op of a    (others' a is left as it was)
    broadcast(a, src)        a <- a of rank src
    reduce_scatter(out, in)  in: world*n elements, out: n;   out_r = sum over ranks of in[r*n:(r+1)*n]
    all_gather(out, in)      in: n elements, out: world*n;   out[r*n:(r+1)*n] = in of rank r
    barrier()                returns once every rank has called it

    all_reduce_async(a, op)  starts all_reduce(a, op); returns a Work whose wait() returns
                             once a holds the result (a must not be touched before)

``all_reduce_async`` lets gradient buckets be reduced while backward computes earlier layers.
``mpi`` starts an ``Iallreduce``. A transport that cannot overlap (``local``) runs the
collective at once and returns a Work already complete, which keeps the calling code the
same; so does ``nccl``, whose collectives are queued on the current CUDA stream anyway: the
host does not wait, but the reduction shares the stream with backward's kernels rather than
running beside them (that would take a second stream ordered by events). Collectives,
blocking or not, are started in the same order on every rank.

A rank that fails makes every other rank's next (or current) collective raise
``ProcessGroupError`` naming the failed rank and its error, within seconds; the group is
unusable afterwards.
"""

from __future__ import annotations

import math
from typing import Any

OPS = ("sum", "avg", "max")


class ProcessGroupError(RuntimeError):
    """Another rank of the group failed (raised, was killed, or went away).

    ``rank`` is the rank that failed first and ``detail`` its error (a traceback, or how
    the process ended)."""

    def __init__(self, rank: int, detail: str, exitcode: int | None = None) -> None:
        super().__init__(f"rank {rank} failed: {detail}")
        self.rank, self.detail = rank, detail
        self.exitcode = exitcode  # set when the rank's process ended rather than raised


def check_rank_count(world_size: int) -> int:
    """``world_size`` when it is an int >= 1; a ValueError naming it otherwise."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world size must be an integer >= 1, got {world_size!r}")
    return world_size


def check_op(op: str) -> str:
    """``op`` as given, when it is a supported reduction; a ValueError naming it otherwise."""
    if op not in OPS:
        raise ValueError(f"unknown reduction op {op!r}; expected one of {OPS}")
    return op


def check_array(array: Any, what: str) -> None:
    """A clear error for an array a collective cannot hand over as one flat buffer."""
    if not hasattr(array, "flags") or not array.flags.c_contiguous:
        shape = getattr(array, "shape", None)
        raise ValueError(
            f"{what}: needs a C-contiguous array (NumPy or CuPy), got "
            f"{type(array).__name__} of shape {shape}"
        )


def check_avg_dtype(array: Any, what: str) -> None:
    """avg divides by the world size: only for floating arrays."""
    if array.dtype.kind not in "fc" and array.dtype.name != "bfloat16":
        raise ValueError(f"{what}: op 'avg' needs a floating array, got dtype {array.dtype}")


def check_reduction(array: Any, op: str, what: str) -> None:
    """The checks of all_reduce and reduce: a known ``op``, a flat-able array, and a floating
    one for "avg"."""
    check_op(op)
    check_array(array, what)
    if op == "avg":
        check_avg_dtype(array, what)


def check_scatter_sizes(output: Any, input: Any, world_size: int, what: str) -> int:
    """n, the elements per rank: reduce_scatter's output (all_gather's input) has n elements
    and the other array world_size x n, both of one dtype; a ValueError naming the shapes
    otherwise."""
    check_array(output, what)
    check_array(input, what)
    if input.dtype != output.dtype:
        raise ValueError(f"{what}: dtypes differ, input {input.dtype}, output {output.dtype}")
    small, big = (output, input) if what == "reduce_scatter" else (input, output)
    if big.size != world_size * small.size:
        names = ("output", "input") if what == "reduce_scatter" else ("input", "output")
        raise ValueError(
            f"{what}: {names[1]} of shape {tuple(big.shape)} ({big.size} elements) must hold "
            f"world size {world_size} x {names[0]} of shape {tuple(small.shape)} "
            f"({math.prod(small.shape)} elements)"
        )
    return int(small.size)


class Work:
    """A started collective. ``test()`` says whether it has completed (and, for MPI, lets
    the library progress it: Open MPI advances a non-blocking collective only inside MPI
    calls unless it runs a progress thread); ``wait()`` returns once it has. This one is
    complete from the start: the blocking fallback."""

    def test(self) -> bool:
        return True

    def wait(self) -> None:
        """Return once the collective's result is in its array."""


class Transport:
    """The collectives of one group of ``world_size`` processes, seen from rank ``rank``.

    Subclasses implement ``_reduce`` (behind ``all_reduce`` and ``reduce``, which check the
    arguments here) and the other collectives below; argument checks are shared (``check_*``)."""

    name = "base"
    rank: int = 0
    world_size: int = 1

    def all_reduce(self, array: Any, op: str = "sum") -> None:
        check_reduction(array, op, "all_reduce")
        self._reduce(array, op, None, "all_reduce")

    def all_reduce_async(self, array: Any, op: str = "sum") -> Work:
        """Start ``all_reduce(array, op)``; ``array`` holds the result once the returned
        Work's ``wait()`` has returned. Here: the blocking collective, already complete."""
        self.all_reduce(array, op)
        return Work()

    def reduce(self, array: Any, dst: int = 0, op: str = "sum") -> None:
        dst = self.check_rank(dst, "reduce")
        check_reduction(array, op, "reduce")
        self._reduce(array, op, dst, "reduce")

    def _reduce(self, array: Any, op: str, dst: int | None, what: str) -> None:
        """``array`` <- ``op`` over ranks, on every rank (``dst`` None) or on rank ``dst``
        only; the arguments are already checked. ``what`` names the collective in errors."""
        raise NotImplementedError

    def broadcast(self, array: Any, src: int = 0) -> None:
        raise NotImplementedError

    def reduce_scatter(self, output: Any, input: Any) -> None:
        raise NotImplementedError

    def all_gather(self, output: Any, input: Any) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, detail: str) -> None:
        """Tell the other ranks this one has failed with ``detail`` (best effort; may not
        return, e.g. MPI's Abort ends the whole job)."""

    def end_job(self, message: str, direct: bool = False) -> None:
        """End every rank of the job, printing ``message`` (a watchdog's: another rank has
        failed). ``direct``: the launcher may be ending the job already (a peer's process
        ended), so its output of this rank may never be printed: write ``message`` where the
        launcher itself prints, if the transport knows a way. Here: ``abort(message)``."""
        self.abort(message)

    def close(self) -> None:
        """Release what the transport holds; collectives are not allowed afterwards."""

    def check_rank(self, rank: int, what: str) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"{what}: rank {rank} is outside 0 .. {self.world_size - 1}")
        return rank
