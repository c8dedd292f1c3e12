"""The ``nccl`` transport: CuPy arrays reduced by NCCL (``cupy.cuda.nccl``), one GPU per
rank, ranks started by an MPI launcher.

It follows CuPy's documented ``NcclCommunicator`` API and is tested through stand-ins for
CuPy and its NCCL bindings (``tests/fakecupy.py``, ``tests/fakenccl.py``), which run each
collective over MPI on host memory. Importing this module needs neither CuPy nor a GPU;
creating the transport does.

Two wires, one interface: NCCL reduces device arrays only, so a collective on a CuPy array
goes through NCCL, and one on a NumPy array (the trainer's small host messages: loss sums,
has-gradient flags, failure flags, the evaluation's batch losses) goes through MPI
(``self.mpi``). Every rank makes the same calls in the same order, as on any transport.

Start-up: each rank uses GPU ``local rank`` (its rank among the ranks on its node,
``MPI_Comm_split_type(COMM_TYPE_SHARED)``), or GPU ``device_id`` when one is named, which is
refused when more than one rank runs on the node: NCCL cannot put two ranks on one GPU, and
the ranks agree (over MPI) on any refusal before NCCL starts, so every rank raises the same
``NCCLSetupError`` instead of some waiting forever. Then rank 0 draws NCCL's unique id (128
bytes: ``bytes`` in CuPy 14, a tuple of signed chars before), MPI broadcasts it, and every
rank joins the communicator; a rank that fails there ends the job through ``MPI_Abort``.
Collectives are queued on CuPy's current stream, in order with the kernels around them, and
the host does not wait for them; ``barrier()`` does. Failures end the job through MPI (see
``mpi.py``): a rank that raises aborts its NCCL communicator, then calls ``MPI_Abort``.
"""

from __future__ import annotations

import importlib
import traceback
from typing import Any

import numpy as np

from handgrad.distributed.mpi import MPITransport
from handgrad.distributed.transport import (
    Transport,
    check_array,
    check_scatter_sizes,
)


class NCCLSetupError(RuntimeError):
    """The ranks cannot each get a GPU of their own (raised on every rank alike); ``rank``
    is the rank that raised this one."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def _cupy() -> tuple[Any, Any]:
    """CuPy (as ``handgrad.backend.cuda`` has it, so a stand-in counts) and its NCCL."""
    from handgrad.backend import cuda

    try:
        cp = cuda.require()
    except RuntimeError as e:  # what is missing: CuPy or a GPU
        raise RuntimeError(f"the nccl transport needs CuPy and a GPU per rank: {e}") from None
    nccl = getattr(cp.cuda, "nccl", None)
    if nccl is None:
        try:
            nccl = importlib.import_module("cupy.cuda.nccl")
        except ImportError as e:
            raise RuntimeError(
                f"the nccl transport needs CuPy built with NCCL (pip install nvidia-nccl-cu12 "
                f"or nvidia-nccl-cu13 next to cupy-cuda12x / 13x) ({e})"
            ) from None
    if not getattr(nccl, "available", True):
        raise RuntimeError(
            "the nccl transport: CuPy finds no NCCL library (pip install nvidia-nccl-cu12 or "
            "nvidia-nccl-cu13, matching the CuPy wheel)"
        )
    return cp, nccl


def _is_host(array: Any) -> bool:
    return isinstance(array, np.ndarray | np.generic)


class NCCLTransport(Transport):
    """Collectives on CuPy arrays over NCCL and on NumPy arrays over MPI (``self.mpi``).

    ``device_id``: the GPU index for this rank (None: the local rank), ``device_index`` the one
    chosen. ``local_rank``, ``local_size``: this rank's place among the ranks of its node."""

    name = "nccl"

    def __init__(self, comm: Any = None, device_id: int | None = None) -> None:
        self.mpi = MPITransport(comm)
        MPI, world = self.mpi.MPI, self.mpi.comm
        self.rank, self.world_size = self.mpi.rank, self.mpi.world_size
        local = world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        problem, setup = "", None
        try:
            setup = _cupy()
            gpus = int(setup[0].cuda.runtime.getDeviceCount())
            problem, self.device_index = self._choose(device_id, gpus)
        except Exception as err:  # noqa: BLE001 - agreed on below, then raised on every rank
            problem, self.device_index = str(err), -1
        self._agree(problem)
        self.cupy, self.nccl = setup
        try:
            self._join()
        except BaseException:
            # the other ranks wait in the Bcast or in NCCL's own start-up, which has no
            # timeout: end the job from here, naming this rank and its error
            self.mpi.abort(traceback.format_exc())
            raise
        n = self.nccl
        self._types = {
            "float16": n.NCCL_FLOAT16,
            "float32": n.NCCL_FLOAT32,
            "float64": n.NCCL_FLOAT64,
            "int32": n.NCCL_INT32,
            "int64": n.NCCL_INT64,
            "int8": n.NCCL_INT8,
            "uint8": n.NCCL_UINT8,
        }
        if hasattr(n, "NCCL_BFLOAT16"):
            self._types["bfloat16"] = n.NCCL_BFLOAT16
        self._avg = getattr(n, "NCCL_AVG", None)  # NCCL >= 2.10

    def _join(self) -> None:
        """Take this rank's GPU, then join the NCCL communicator of every rank."""
        self.device = self.cupy.cuda.Device(self.device_index)
        self.device.use()
        # NCCL_UNIQUE_ID_BYTES = 128. CuPy 14 gives and takes them as bytes, CuPy 13 and
        # earlier as a tuple of signed chars: rank 0 sends which (byte 128: 1 for bytes)
        uid = np.zeros(129, dtype=np.uint8)
        if self.rank == 0:
            raw = self.nccl.get_unique_id()
            as_bytes = isinstance(raw, bytes | bytearray)
            signed = np.frombuffer(bytes(raw), np.int8) if as_bytes else np.asarray(raw, np.int8)
            uid[:128], uid[128] = signed.view(np.uint8), as_bytes
        self.mpi.comm.Bcast(uid, root=0)
        key = uid[:128]
        comm_id = key.tobytes() if uid[128] else tuple(int(v) for v in key.view(np.int8))
        self.comm = self.nccl.NcclCommunicator(self.world_size, comm_id, self.rank)

    def _choose(self, device: int | None, gpus: int) -> tuple[str, int]:
        """(why this rank cannot have a GPU of its own, or ""; the GPU index)."""
        here = f"{self.local_size} ranks run on this node"
        # every message names the transport: they reach the user as ConfigError
        if device is None:
            if self.local_size > gpus:
                return (
                    f"the nccl transport: {here} but it has {gpus} GPU"
                    f"{'s' if gpus != 1 else ''}; NCCL needs one GPU per rank: start at most "
                    f"{gpus} ranks per node"
                ), -1
            return "", self.local_rank
        if self.local_size > 1:
            return (
                f"the nccl transport: [train] device = 'cuda:{device}' names one GPU, but "
                f"{here}, which NCCL cannot put on one GPU; use device = 'cuda' (each rank "
                "takes the GPU of its local rank)"
            ), -1
        if not 0 <= device < gpus:
            return f"the nccl transport: cuda:{device} does not exist here ({gpus} GPUs)", -1
        return "", device

    def _agree(self, problem: str) -> None:
        """Every rank raises NCCLSetupError when any rank has a ``problem`` (the lowest such
        rank's words, sent as bytes over MPI), before any rank starts NCCL."""
        MPI, world = self.mpi.MPI, self.mpi.comm
        flags = np.zeros(self.world_size, dtype=np.int64)
        flags[self.rank] = bool(problem)
        world.Allreduce(MPI.IN_PLACE, flags, op=MPI.SUM)
        if not flags.any():
            return
        first = int(np.flatnonzero(flags)[0])
        text = np.zeros(1024, dtype=np.uint8)
        if self.rank == first:
            raw = problem.encode("utf-8")[:1024]
            text[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        world.Bcast(text, root=first)
        words = text.tobytes().rstrip(b"\0").decode("utf-8", "replace")
        raise NCCLSetupError(f"{words} (rank {first} of {self.world_size})", self.rank)

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def _type(self, array: Any, what: str) -> int:
        name = array.dtype.name
        if name not in self._types:
            raise ValueError(f"{what}: NCCL cannot reduce dtype {name}")
        return self._types[name]

    def _op(self, op: str) -> int:
        if op == "max":
            return self.nccl.NCCL_MAX
        if op == "avg" and self._avg is not None:
            return self._avg
        return self.nccl.NCCL_SUM

    def _reduce(self, array: Any, op: str, dst: int | None, what: str) -> None:
        if _is_host(array):
            self.mpi._reduce(array, op, dst, what)
            return
        ptr, count, kind = array.data.ptr, array.size, self._type(array, what)
        if dst is None:
            self.comm.allReduce(ptr, ptr, count, kind, self._op(op), self._stream())
        else:
            self.comm.reduce(ptr, ptr, count, kind, self._op(op), dst, self._stream())
        if op == "avg" and self._avg is None and (dst is None or dst == self.rank):
            array /= self.world_size

    def broadcast(self, array: Any, src: int = 0) -> None:
        if _is_host(array):
            self.mpi.broadcast(array, src)
            return
        check_array(array, "broadcast")
        self.check_rank(src, "broadcast")
        ptr = array.data.ptr
        self.comm.broadcast(ptr, ptr, array.nbytes, self.nccl.NCCL_UINT8, src, self._stream())

    def _placed(self, output: Any, input: Any, what: str) -> bool:
        """True when both arrays are on the host (MPI's), False when both on the device."""
        host = _is_host(output), _is_host(input)
        if host[0] != host[1]:
            where = ["device", "host"]
            raise ValueError(
                f"{what}: output on the {where[host[0]]}, input on the {where[host[1]]}; "
                "both must be on one side"
            )
        return host[0]

    def reduce_scatter(self, output: Any, input: Any) -> None:
        if self._placed(output, input, "reduce_scatter"):
            self.mpi.reduce_scatter(output, input)
            return
        n = check_scatter_sizes(output, input, self.world_size, "reduce_scatter")
        self.comm.reduceScatter(
            input.data.ptr, output.data.ptr, n, self._type(output, "reduce_scatter"),
            self.nccl.NCCL_SUM, self._stream(),
        )  # fmt: skip

    def all_gather(self, output: Any, input: Any) -> None:
        if self._placed(output, input, "all_gather"):
            self.mpi.all_gather(output, input)
            return
        check_scatter_sizes(output, input, self.world_size, "all_gather")
        self.comm.allGather(
            input.data.ptr, output.data.ptr, input.nbytes, self.nccl.NCCL_UINT8, self._stream()
        )

    def barrier(self) -> None:
        """Every rank's queued collectives done, then MPI's barrier."""
        self.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def abort(self, detail: str) -> None:
        try:
            self.comm.abort()
        finally:
            self.mpi.abort(detail)

    def end_job(self, message: str, direct: bool = False) -> None:
        try:
            self.comm.abort()
        finally:
            self.mpi.end_job(message, direct)

    def close(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        self.comm.destroy()
