"""``handgrad train`` on one rank of an MPI job, run by tests/train/test_train_mpi.py as
``mpirun -n 2 python mpi_train.py [--fault KIND:STEP] -- ARGS...``.

``--fault`` makes rank 1 fail at optimizer step STEP (1-based), by the test's hand, not the
library's: ``raise`` raises ValueError from its gradient computation, ``kill`` kills the
process with SIGKILL, ``nan`` turns its loss into NaN (every rank must stop on it)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time

from handgrad.cli import main
from handgrad.distributed.mpi import MPITransport
from handgrad.train import parallel


def inject(kind: str, step: int) -> None:
    rank = MPITransport().rank
    if rank != 1:
        return
    real = parallel.accumulate_gradients
    calls = [0]

    def failing(model, micro_batches, scale):  # type: ignore[no-untyped-def]
        calls[0] += 1
        losses = real(model, micro_batches, scale)
        if calls[0] == step:
            print(f"rank 1 failing at {time.time()}", flush=True)
            if kind == "raise":
                raise ValueError(f"boom on rank 1 at step {step}")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "nan":
                losses[0] = math.nan
        return losses

    parallel.accumulate_gradients = failing


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--")
    if args[:split][:1] == ["--fault"]:
        kind, step = args[1].split(":")
        inject(kind, int(step))
    sys.exit(main(args[split + 1 :]))
