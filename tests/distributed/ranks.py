"""Runs started by the fault tests as their own processes (``python ranks.py MODE``).

- ``mpi-raise``, ``mpi-die``: under mpirun -n 2; rank 1 prints ``raising at <time>`` and
  raises (or kills itself with SIGKILL) while rank 0 waits in an all_reduce.
- ``local-wait``, ``local-busy``: a local group of 3; prints ``pids <json>`` (every rank's
  process id), then ranks wait in collectives (``wait``) or compute without any collective
  (``busy``) until they are stopped. ``--no-pdeathsig``: the workers rely on the pipe alone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

import handgrad.distributed as dist
from handgrad.distributed import local


def _wait_forever() -> None:
    a = np.zeros(4)
    while True:
        dist.all_reduce(a)
        time.sleep(0.01)


def _busy_forever() -> None:
    while True:
        sum(range(100_000))


def main(mode: str, flags: list[str]) -> None:
    if mode in ("mpi-raise", "mpi-die"):
        dist.init_process_group()
        if dist.get_rank() == 1:
            time.sleep(0.5)
            print(f"raising at {time.time()}", flush=True)
            if mode == "mpi-die":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("boom on rank 1")
        _wait_forever()
    local.use_pdeathsig = "--no-pdeathsig" not in flags
    body = _wait_forever if mode == "local-wait" else _busy_forever
    dist.init_process_group("local", world_size=3, worker=body)
    pids = [os.getpid()] + [p.pid for p in dist.group().processes]
    print("pids " + json.dumps(pids), flush=True)
    body()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
