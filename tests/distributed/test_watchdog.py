"""The watchdog of MPI jobs (handgrad/distributed/watchdog.py) on forked local ranks: a rank
that dies or stops is named within the timeout, a normal end names nobody; the start line's
hosts."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from handgrad import distributed as dist
from handgrad.distributed.local import can_fork
from handgrad.distributed.watchdog import Watchdog, local_addresses
from handgrad.parallel.modes import host_line

needs_fork = pytest.mark.skipif(not can_fork(), reason="the local transport needs fork")


def _watched(fault: str, timeout: float = 1.5) -> list[str]:
    """Rank 0 and a forked rank 1 under watchdogs; rank 1 does ``fault``; rank 0's
    messages."""
    said: list[str] = []

    def worker() -> None:
        dog = Watchdog(dist.group(), timeout, lambda m: None)
        if fault == "die":
            os._exit(3)
        if fault == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(0.5)
        dog.close()

    dist.init_process_group("local", world_size=2, worker=worker)
    try:
        group = dist.group()
        (proc,) = group.processes
        dog = Watchdog(group, timeout, said.append)
        deadline = time.monotonic() + timeout + 5
        while not said and time.monotonic() < deadline:
            dog.progress()  # rank 0 itself goes on
            time.sleep(0.1)
        dog.close()
    finally:
        if fault == "stop":
            os.kill(proc.pid, signal.SIGKILL)
        dist.destroy_process_group()
    return said


@needs_fork
def test_a_rank_that_dies_is_named_at_once():
    start = time.monotonic()
    (message,) = _watched("die")
    assert time.monotonic() - start < 1.5
    assert message == (
        f"handgrad: rank 1 of 2 (host {socket.gethostname()}) failed: its process ended (connection closed); "
        "ending the job"
    )


@needs_fork
def test_a_stopped_rank_is_named_after_the_timeout():
    start = time.monotonic()
    (message,) = _watched("stop", timeout=1.5)
    assert 1.5 <= time.monotonic() - start < 5
    assert "rank 1 of 2" in message and "no heartbeat for 1." in message, message
    assert "collective_timeout = 1.5 s" in message


@needs_fork
def test_a_normal_end_names_nobody():
    assert _watched("none") == []


def test_the_start_line_names_hosts_and_their_ranks():
    assert host_line(["a", "b"]) == "2 hosts: a (rank 0), b (rank 1)"
    assert host_line(["a", "b", "a", "b"]) == "2 hosts: a (ranks 0, 2), b (ranks 1, 3)"
    assert host_line(["a"] * 4 + ["b"] * 4) == "2 hosts: a (ranks 0-3), b (ranks 4-7)"
    assert host_line(["x"]) == "1 host: x (rank 0)"
    assert host_line([f"n{i}" for i in range(5)], most=2) == (
        "5 hosts: n0 (rank 0), n1 (rank 1), 3 more"
    )


def test_local_addresses_put_loopback_last():
    found = local_addresses()
    assert found and all(a.count(".") == 3 for a in found)
    assert [a.startswith("127.") for a in found] == sorted(a.startswith("127.") for a in found)
