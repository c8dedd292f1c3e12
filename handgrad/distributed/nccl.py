"""The ``nccl`` transport: CuPy arrays reduced by NCCL (``cupy.cuda.nccl``), one GPU per
rank, ranks started by an MPI launcher.

Untested on a GPU: it follows CuPy's documented ``NcclCommunicator`` API and has not run.
Importing this module needs neither CuPy nor a GPU; creating the transport does.

Start-up: rank 0 draws NCCL's unique id (128 bytes) and MPI broadcasts it as a byte array;
each rank uses GPU ``local rank mod device count``, where the local rank is its rank among
the ranks on its node (``MPI_Comm_split_type(COMM_TYPE_SHARED)``); then every rank joins the
communicator. Collectives are queued on CuPy's current stream, in order with the kernels
around them; ``barrier()`` also waits for the stream. Failures end the job through MPI (see
``mpi.py``): a rank that raises aborts its NCCL communicator, then calls ``MPI_Abort``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handgrad.distributed.mpi import MPITransport
from handgrad.distributed.transport import (
    Transport,
    check_array,
    check_scatter_sizes,
)


def _cupy() -> tuple[Any, Any]:
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as e:
        raise RuntimeError(
            "the nccl transport needs CuPy built with NCCL (pip install cupy-cuda12x) and a "
            f"GPU per rank ({e})"
        ) from None
    return cupy, nccl


class NCCLTransport(Transport):
    """Collectives on CuPy arrays over NCCL; MPI (``mpi``) only starts it and aborts."""

    name = "nccl"

    def __init__(self, comm: Any = None) -> None:
        self.cupy, self.nccl = _cupy()
        self.mpi = MPITransport(comm)
        MPI, world = self.mpi.MPI, self.mpi.comm
        self.rank, self.world_size = self.mpi.rank, self.mpi.world_size
        local = world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = local.Get_rank()
        local.Free()
        devices = self.cupy.cuda.runtime.getDeviceCount()
        if devices < 1:
            raise RuntimeError(f"nccl transport: rank {self.rank} sees no GPU")
        self.device = self.cupy.cuda.Device(self.local_rank % devices)
        self.device.use()
        # NCCL_UNIQUE_ID_BYTES = 128; CuPy gives and takes them as a tuple of signed chars
        uid = np.zeros(128, dtype=np.int16)
        if self.rank == 0:
            uid[:] = self.nccl.get_unique_id()
        world.Bcast(uid, root=0)
        uid_tuple = tuple(int(v) for v in uid)
        self.comm = self.nccl.NcclCommunicator(self.world_size, uid_tuple, self.rank)
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
        ptr, count, kind = array.data.ptr, array.size, self._type(array, what)
        if dst is None:
            self.comm.allReduce(ptr, ptr, count, kind, self._op(op), self._stream())
        else:
            self.comm.reduce(ptr, ptr, count, kind, self._op(op), dst, self._stream())
        if op == "avg" and self._avg is None and (dst is None or dst == self.rank):
            array /= self.world_size

    def broadcast(self, array: Any, src: int = 0) -> None:
        check_array(array, "broadcast")
        self.check_rank(src, "broadcast")
        ptr = array.data.ptr
        self.comm.broadcast(ptr, ptr, array.nbytes, self.nccl.NCCL_UINT8, src, self._stream())

    def reduce_scatter(self, output: Any, input: Any) -> None:
        n = check_scatter_sizes(output, input, self.world_size, "reduce_scatter")
        self.comm.reduceScatter(
            input.data.ptr, output.data.ptr, n, self._type(output, "reduce_scatter"),
            self.nccl.NCCL_SUM, self._stream(),
        )  # fmt: skip

    def all_gather(self, output: Any, input: Any) -> None:
        check_scatter_sizes(output, input, self.world_size, "all_gather")
        self.comm.allGather(
            input.data.ptr, output.data.ptr, input.nbytes, self.nccl.NCCL_UINT8, self._stream()
        )

    def barrier(self) -> None:
        one = self.cupy.zeros(1, dtype=self.cupy.float32)
        self.all_reduce(one)
        self.cupy.cuda.get_current_stream().synchronize()

    def abort(self, detail: str) -> None:
        try:
            self.comm.abort()
        finally:
            self.mpi.abort(detail)

    def close(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        self.comm.destroy()
