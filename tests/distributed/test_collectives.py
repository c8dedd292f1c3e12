"""The collectives give the same results over every transport: the checks in
``collectives.py`` run by each rank of a local group, and under ``mpirun -n 2``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import handgrad.distributed as dist
from handgrad.distributed.local import can_fork
from handgrad.distributed.mpi import launched_by_mpi

HERE = Path(__file__).resolve().parent


def _load_checks():
    spec = importlib.util.spec_from_file_location("hg_dist_collectives", HERE / "collectives.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_collectives


@pytest.mark.skipif(not can_fork(), reason="the local transport needs the fork start method")
# capacity 16 bytes per rank: every array larger than that goes through in pieces
@pytest.mark.parametrize("world_size, capacity", [(2, None), (3, None), (2, 16), (3, 16)])
def test_local_collectives(world_size, capacity):
    check = _load_checks()
    dist.init_process_group("local", world_size=world_size, worker=check, capacity=capacity)
    try:
        assert dist.get_world_size() == world_size and dist.get_rank() == 0
        check()
        workers = list(dist.group().processes)
    finally:
        dist.destroy_process_group()
    assert [p.exitcode for p in workers] == [0] * (world_size - 1)  # their asserts held too
    assert not dist.is_initialized()


def test_mpi_collectives(mpirun):
    run = mpirun(HERE / "collectives.py")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "rank 0 of 2: ok" in out and "rank 1 of 2: ok" in out, out


def test_one_process_group_and_bad_input():
    dist.init_process_group("local")
    try:
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
        a = np.array([1.0, 2.0])
        dist.all_reduce(a, op="avg")
        np.testing.assert_array_equal(a, [1.0, 2.0])
        with pytest.raises(ValueError, match="unknown reduction op 'min'"):
            dist.all_reduce(a, op="min")
        with pytest.raises(ValueError, match=r"C-contiguous .* shape \(3, 2\)"):
            dist.all_reduce(np.zeros((2, 3)).T)
        with pytest.raises(ValueError, match="op 'avg' needs a floating array, got dtype int64"):
            dist.all_reduce(np.zeros(2, dtype=np.int64), op="avg")
        with pytest.raises(ValueError, match=r"input of shape \(3,\) .* x output of shape \(2,\)"):
            dist.reduce_scatter(np.zeros(2), np.zeros(3))
        with pytest.raises(ValueError, match="rank 1 is outside 0 .. 0"):
            dist.broadcast(a, src=1)
        with pytest.raises(RuntimeError, match="already set up"):
            dist.init_process_group("local")
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="no process group"):
        dist.get_rank()
    with pytest.raises(ValueError, match="unknown backend 'gloo'"):
        dist.init_process_group("gloo")
    with pytest.raises(ValueError, match="needs worker="):
        dist.init_process_group("local", world_size=2)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
        ({"PMI_SIZE": "2"}, True),
        ({"PMIX_RANK": "0"}, True),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"}, True),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, False),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # a batch script, before srun
        ({}, False),
    ],
)
def test_mpi_launcher_detection(env, expected):
    assert launched_by_mpi(env) is expected


def test_nccl_module_imports_without_cupy():
    import handgrad.distributed.nccl as nccl

    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(RuntimeError, match="needs CuPy"):
            nccl.NCCLTransport()


def test_device_id_is_refused_outside_nccl():
    with pytest.raises(ValueError, match="device_id= is for the nccl backend"):
        dist.init_process_group("local", device_id=1)
    assert not dist.is_initialized()


@pytest.mark.parametrize("backend", ["mpi", "nccl"])
def test_mpi4py_without_an_mpi_library_is_named(backend, tmp_path, monkeypatch):
    """An mpi4py wheel alone (no libmpi anywhere) raises RuntimeError, not ImportError, when
    ``mpi4py.MPI`` is imported; the error says that the MPI library is what is missing."""
    package = tmp_path / "mpi4py"
    package.mkdir()
    (package / "__init__.py").write_text("")
    # mpi4py 4's own words when it finds no libmpi
    (package / "MPI.py").write_text(
        "raise RuntimeError('cannot load MPI library\\nlibmpi.so: cannot open shared object')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mpi4py", "mpi4py.MPI"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(RuntimeError, match=r"loads no MPI library \(libmpi\).*cannot load MPI"):
        dist.init_process_group(backend)
    assert not dist.is_initialized()
