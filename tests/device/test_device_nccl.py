"""The nccl transport's start-up on the CuPy and NCCL stand-ins, in this process (one rank):
NCCL's unique id reaches the communicator in the form the installed CuPy takes, ``bytes``
from CuPy 14 on, a tuple of signed chars before."""

from __future__ import annotations

import importlib.util

import fakecupy
import fakenccl
import numpy as np
import pytest


def _skip_without_an_mpi_library() -> None:
    """Skips unless mpi4py loads an MPI library. Checked in the test, not at collection:
    importing ``mpi4py.MPI`` initialises MPI; an mpi4py wheel with no libmpi beside it raises
    RuntimeError there."""
    try:
        from mpi4py import MPI  # noqa: F401
    except RuntimeError as e:
        pytest.skip(f"mpi4py loads no MPI library ({str(e).splitlines()[0]})")


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py")
@pytest.mark.parametrize("as_bytes", [True, False], ids=["cupy14-bytes", "cupy13-tuple"])
def test_the_unique_id_reaches_nccl_in_this_cupys_form(monkeypatch, as_bytes: bool) -> None:
    _skip_without_an_mpi_library()
    from handgrad.distributed.mpi import MPITransport
    from handgrad.distributed.nccl import NCCLTransport

    # a start-up failure raises here instead of ending this process through MPI_Abort
    monkeypatch.setattr(MPITransport, "abort", lambda self, detail: None)
    monkeypatch.setattr(fakenccl, "UNIQUE_ID_AS_BYTES", as_bytes)
    drawn = []
    real = fakenccl.get_unique_id
    monkeypatch.setattr(fakenccl, "get_unique_id", lambda: drawn.append(real()) or drawn[-1])
    with fakecupy.installed() as cp:
        fakenccl.install(gpus=1)
        try:
            t = NCCLTransport()
            assert len(drawn) == 1 and t.comm.unique_id == drawn[0]  # the same 128 bytes
            assert type(t.comm.unique_id) is (bytes if as_bytes else tuple)
            a = cp.asarray(np.arange(3, dtype=np.float32))
            t.all_reduce(a)  # one rank: the sum is the array itself
            np.testing.assert_array_equal(cp.asnumpy(a), [0, 1, 2])
            t.close()
        finally:
            fakenccl.uninstall()
