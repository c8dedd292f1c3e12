"""A stand-in for CuPy's NCCL bindings (``cupy.cuda.nccl``), for the CuPy stand-in's arrays.

``NcclCommunicator`` takes what CuPy's takes: raw device pointers (``array.data.ptr``),
element counts, NCCL's datatype and op codes and a stream pointer. The fake arrays of
tests/fakecupy.py live in host memory, so a pointer here is a host address: each collective
reads and writes the memory behind it (through ctypes) and moves it over mpi4py, on a
communicator of its own (a duplicate of ``COMM_WORLD``, so it never mixes with the host
messages the transport sends over MPI). ``handgrad.distributed.nccl`` therefore runs the
same code on the fakes as on a GPU; what this cannot show is NCCL's own behaviour (streams,
device buffers, its failures).

``install(gpus)`` hangs the module on the fake CuPy as ``cupy.cuda.nccl`` and gives the fake
``gpus`` devices and a current stream; ``uninstall()`` undoes that. ``calls`` counts the
collectives by name.
"""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fakecupy  # noqa: E402

NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_BFLOAT16 = 6, 7, 8, 9
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4

available = True
calls: dict[str, int] = {}
# CuPy 14's API: get_unique_id() gives the 128 bytes as ``bytes`` and NcclCommunicator takes
# them so; CuPy 13 and earlier use a tuple of 128 signed chars. False gives the old one.
UNIQUE_ID_AS_BYTES = True


def _dtype(code: int) -> np.dtype:
    import ml_dtypes

    kinds = {
        NCCL_INT8: np.int8, NCCL_UINT8: np.uint8, NCCL_INT32: np.int32, NCCL_UINT32: np.uint32,
        NCCL_INT64: np.int64, NCCL_UINT64: np.uint64, NCCL_FLOAT16: np.float16,
        NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64, NCCL_BFLOAT16: ml_dtypes.bfloat16,
    }  # fmt: skip
    if code not in kinds:
        raise ValueError(f"fakenccl: unknown datatype code {code}")
    return np.dtype(kinds[code])


def _memory(ptr: int, count: int, code: int) -> np.ndarray:
    """The ``count`` elements of datatype ``code`` at address ``ptr``, as a NumPy view."""
    if not isinstance(ptr, int) or ptr == 0:
        raise TypeError(f"fakenccl: expected a device pointer (int), got {ptr!r}")
    dtype = _dtype(code)
    raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return np.ctypeslib.as_array(raw).view(dtype)


def get_unique_id() -> bytes | tuple[int, ...]:
    """NCCL's unique id, 128 bytes, in the form this CuPy gives it (``UNIQUE_ID_AS_BYTES``)."""
    raw = np.random.default_rng().integers(-128, 128, 128, dtype=np.int8)
    return raw.tobytes() if UNIQUE_ID_AS_BYTES else tuple(int(v) for v in raw)


class NcclCommunicator:
    """``NcclCommunicator(ndev, commId, rank)``: every rank of ``COMM_WORLD`` joins."""

    def __init__(self, ndev: int, commId: tuple[int, ...], rank: int) -> None:  # noqa: N803
        from mpi4py import MPI

        form = bytes if UNIQUE_ID_AS_BYTES else tuple  # as Cython's typed argument checks it
        if not isinstance(commId, form):
            raise TypeError(
                f"fakenccl: NcclCommunicator() argument 'commId' must be {form.__name__}, "
                f"not {type(commId).__name__}"
            )
        if len(commId) != 128:
            raise ValueError(f"fakenccl: the unique id has {len(commId)} bytes, not 128")
        signed = np.frombuffer(commId, np.int8) if form is bytes else np.asarray(commId, np.int8)
        self.MPI = MPI
        world = MPI.COMM_WORLD
        if world.Get_size() != ndev or world.Get_rank() != rank:
            raise ValueError(
                f"fakenccl: rank {rank} of {ndev}, but MPI says rank {world.Get_rank()} of "
                f"{world.Get_size()}"
            )
        ids = np.zeros((ndev, 128), dtype=np.int16)
        world.Allgather(signed.astype(np.int16), ids)
        if not (ids == ids[0]).all():
            raise ValueError("fakenccl: the ranks were given different unique ids")
        self.comm = world.Dup()
        self._rank, self._size, self.aborted = rank, ndev, False
        self.unique_id = commId

    def rank_id(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def _call(self, name: str, stream: Any) -> None:
        if self.aborted or self.comm is None:
            raise RuntimeError(f"fakenccl: {name} on an aborted or destroyed communicator")
        if not isinstance(stream, int):
            raise TypeError(f"fakenccl: {name}: the stream must be a pointer (int), got {stream!r}")
        calls[name] = calls.get(name, 0) + 1

    def _op(self, op: int) -> Any:
        M = self.MPI
        ops = {NCCL_SUM: M.SUM, NCCL_PROD: M.PROD, NCCL_MAX: M.MAX, NCCL_MIN: M.MIN}
        return M.SUM if op == NCCL_AVG else ops[op]

    def _wide(self, a: np.ndarray) -> np.ndarray:
        # MPI has no bfloat16: reduce in float32
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream) -> None:  # noqa: N802
        self._call("allReduce", stream)
        send, recv = _memory(sendbuf, count, datatype), _memory(recvbuf, count, datatype)
        wide = self._wide(send).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, wide, op=self._op(op))
        if op == NCCL_AVG:
            wide /= self._size
        recv[...] = wide.astype(recv.dtype)

    def reduce(self, sendbuf, recvbuf, count, datatype, op, root, stream) -> None:
        self._call("reduce", stream)
        send = _memory(sendbuf, count, datatype)
        wide = self._wide(send).copy()
        if self._rank == root:
            self.comm.Reduce(self.MPI.IN_PLACE, wide, op=self._op(op), root=root)
            if op == NCCL_AVG:
                wide /= self._size
            _memory(recvbuf, count, datatype)[...] = wide.astype(send.dtype)
        else:
            self.comm.Reduce(wide, None, op=self._op(op), root=root)

    def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream) -> None:
        self._call("broadcast", stream)
        recv = _memory(recvbuf, count, datatype)
        if self._rank == root and sendbuf != recvbuf:
            recv[...] = _memory(sendbuf, count, datatype)
        self.comm.Bcast(recv.view(np.uint8), root=root)

    def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream) -> None:  # noqa: N802
        self._call("reduceScatter", stream)
        send = _memory(sendbuf, recvcount * self._size, datatype)
        recv = _memory(recvbuf, recvcount, datatype)
        wide_in = self._wide(send).copy()
        wide_out = np.empty(recvcount, dtype=wide_in.dtype)
        self.comm.Reduce_scatter_block(wide_in, wide_out, op=self._op(op))
        if op == NCCL_AVG:
            wide_out /= self._size
        recv[...] = wide_out.astype(recv.dtype)

    def allGather(self, sendbuf, recvbuf, count, datatype, stream) -> None:  # noqa: N802
        self._call("allGather", stream)
        send = _memory(sendbuf, count, datatype).copy()
        recv = _memory(recvbuf, count * self._size, datatype)
        self.comm.Allgather(send.view(np.uint8), recv.view(np.uint8))

    def abort(self) -> None:
        self.aborted = True

    def destroy(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


class _Stream:
    ptr = 0x5EED  # any int: CuPy passes the stream's address

    def synchronize(self) -> None:
        pass


_saved: list[tuple[Any, Any]] = []


def install(gpus: int = 2) -> types.ModuleType:
    """Make the fake CuPy (installed separately, ``fakecupy.install()``) carry this module as
    ``cupy.cuda.nccl``, see ``gpus`` devices and have a current stream."""
    cuda = fakecupy.namespace.cuda
    _saved.append((cuda, fakecupy.namespace.cuda))
    fakecupy.namespace.cuda = types.SimpleNamespace(
        **vars(cuda),
        nccl=sys.modules[__name__],
        get_current_stream=_Stream,
    )
    fakecupy.namespace.cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: gpus)
    return sys.modules[__name__]


def uninstall() -> None:
    if _saved:
        cuda, _ = _saved.pop()
        fakecupy.namespace.cuda = cuda
