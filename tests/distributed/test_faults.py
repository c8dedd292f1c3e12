"""A failed rank stops the others within 10 s with a message naming it; no process of a
local run outlives its rank 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import handgrad.distributed as dist
from handgrad.distributed import ProcessGroupError
from handgrad.distributed.local import can_fork

HERE = Path(__file__).resolve().parent
needs_fork = pytest.mark.skipif(not can_fork(), reason="the local transport needs fork")


def _raise_after_a_moment():
    time.sleep(0.3)
    raise ValueError("boom on rank 1")


def _die_after_a_moment():
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


@needs_fork
@pytest.mark.parametrize(
    "worker, message, exitcode",
    [
        (_raise_after_a_moment, r"rank 1 failed: Traceback(.|\n)*ValueError: boom on rank 1", 1),
        (_die_after_a_moment, "rank 1 failed: exited, killed by SIGKILL", -signal.SIGKILL),
    ],
)
def test_local_rank_that_fails_stops_the_others(worker, message, exitcode):
    dist.init_process_group("local", world_size=2, worker=worker)
    try:
        start = time.monotonic()
        with pytest.raises(ProcessGroupError, match=message) as info:
            dist.all_reduce(np.zeros(3))
        assert time.monotonic() - start < 10
        assert info.value.rank == 1
        with pytest.raises(ProcessGroupError):  # the group stays broken
            dist.barrier()
        (proc,) = dist.group().processes
    finally:
        dist.destroy_process_group()
    assert proc.exitcode == exitcode


@pytest.mark.parametrize(
    "mode, message",
    [
        ("mpi-raise", r"rank 1 of 2 failed: Traceback(.|\n)*ValueError: boom on rank 1"),
        ("mpi-die", r"rank 1 (.|\n)*(signal 9|Killed|killed)"),  # the launcher's words
    ],
)
def test_mpi_rank_that_fails_ends_the_job(mpirun, mode, message):
    start = time.time()
    run = mpirun(HERE / "ranks.py", mode)
    end, out = time.time(), run.stdout + run.stderr
    assert run.returncode != 0, out
    assert re.search(message, out), out
    raised = float(out.split("raising at ")[1].split()[0])
    assert start < raised < end and end - raised < 10, out  # rank 0 did not wait on


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@needs_fork
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "mode, how, flags",
    [
        ("local-wait", signal.SIGKILL, []),
        ("local-busy", signal.SIGKILL, []),
        ("local-busy", signal.SIGKILL, ["--no-pdeathsig"]),  # the pipe alone
        ("local-busy", signal.SIGTERM, []),
        ("local-wait", signal.SIGINT, []),
    ],
)
def test_no_process_outlives_rank_0(mode, how, flags):
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "ranks.py"), mode, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("pids "), line
        pids = json.loads(line[5:])
        assert len(pids) == 3 and pids[0] == proc.pid
        time.sleep(0.3)
        assert all(_alive(pid) for pid in pids)  # running, before the signal
        os.kill(proc.pid, how)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        proc.kill()
        proc.wait()
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):  # a failed run must not leave its workers behind either
                os.kill(pid, signal.SIGKILL)
