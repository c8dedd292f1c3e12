"""``handgrad train`` on one rank of an MPI job, run by tests/train/test_train_mpi.py and
test_train_nccl.py as ``mpirun -n 2 python mpi_train.py [OPTIONS] -- ARGS...``.

``--fault KIND:STEP`` makes rank 1 fail at optimizer step STEP (1-based), by the test's
hand, not the library's: ``raise`` raises ValueError from its gradient computation, ``kill``
kills the process with SIGKILL, ``nan`` turns its loss into NaN (every rank must stop on it);
``nccl`` (with ``--fake-gpu``; STEP unused) makes rank 1's NCCL communicator fail to start.
``--fault KIND:STEP:RANK`` makes rank RANK the one that fails, and three kinds act on the
host of that rank (a network namespace of tests/hosts.py, whose link is ``eth0``):
``host-kill`` kills every process of the host with SIGKILL (the launcher's daemon too),
``link-down`` cuts the host's link, ``stop`` stops every training process of the host with
SIGSTOP (its daemon goes on, as on a machine whose training hangs).
``--fake-gpu`` installs the CuPy and NCCL stand-ins (tests/fakecupy.py, tests/fakenccl.py)
with two fake GPUs, so ``train.device=cuda`` runs the nccl transport's code on the CPU; it
also prints each rank's host synchronisations per optimizer step at the end
(``rank R syncs per step: [...]``) and the NCCL collectives it made (``rank R nccl calls:
[(name, count), ...]``)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import handgrad.parallel.step as steps
from handgrad.cli import main
from handgrad.distributed.mpi import MPITransport
from handgrad.parallel import modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def on_this_host() -> list[int]:
    """The other processes in this process's network namespace (its host)."""
    mine, found = os.stat("/proc/self/ns/net").st_ino, []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == mine:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def host_fault(kind: str) -> None:
    if kind == "link-down":
        subprocess.run(["ip", "link", "set", "dev", "eth0", "down"], check=True)
        return
    for pid in on_this_host():
        try:
            if kind == "stop":
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"mpi_train.py" not in f.read():
                        continue
            os.kill(pid, signal.SIGSTOP if kind == "stop" else signal.SIGKILL)
        except OSError:
            pass
    os.kill(os.getpid(), signal.SIGSTOP if kind == "stop" else signal.SIGKILL)


def inject(kind: str, step: int, device: bool, who: int = 1) -> None:
    rank = MPITransport().rank
    if rank != who:
        return
    calls = [0]

    def fail(losses: list) -> None:  # type: ignore[type-arg]
        calls[0] += 1
        if calls[0] == step:
            print(f"rank {who} failing at {time.time()}", flush=True)
            if kind in ("host-kill", "link-down", "stop"):
                time.sleep(0.5)  # the line above reaches the launcher before the host goes
                host_fault(kind)
            if kind == "raise":
                raise ValueError(f"boom on rank 1 at step {step}")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "nan":
                losses[0] = math.nan

    if kind == "nccl":  # rank 0 is left waiting in NCCL's start-up, which has no timeout
        import fakenccl

        def failing_start(*args, **kwargs):  # type: ignore[no-untyped-def]
            print(f"rank 1 failing at {time.time()}", flush=True)
            raise RuntimeError("boom on rank 1: NCCL could not start")

        fakenccl.NcclCommunicator = failing_start
        return
    real = steps.accumulate  # every run mode's micro-batch loop, on the CPU and on a GPU

    def failing(model, micro_batches, *args):  # type: ignore[no-untyped-def]
        losses = real(model, micro_batches, *args)
        fail(losses)
        return losses

    steps.accumulate = failing


def fake_gpus() -> list[int]:
    """Install the stand-ins; returns the list that each step's host syncs are added to."""
    import fakecupy
    import fakenccl

    fakecupy.install()
    fakenccl.install(gpus=2)
    syncs: list[int] = []
    gradients, clip_and_step = modes.MPIRanks.gradients, modes.RunMode.clip_and_step

    def counted_gradients(*args, **kwargs):  # type: ignore[no-untyped-def]
        fakecupy.stats.reset()  # a step: its gradients, then its clip and update
        return gradients(*args, **kwargs)

    def counted_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = clip_and_step(*args, **kwargs)
        syncs.append(fakecupy.stats.syncs)
        return out

    modes.MPIRanks.gradients = counted_gradients
    modes.RunMode.clip_and_step = counted_step
    return syncs


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--")
    options = args[:split]
    syncs = fake_gpus() if "--fake-gpu" in options else None
    if "--fault" in options:
        kind, step, *who = options[options.index("--fault") + 1].split(":")
        inject(kind, int(step), syncs is not None, *map(int, who))
    code = main(args[split + 1 :])
    if syncs is not None:
        import fakenccl

        rank = MPITransport().rank
        print(f"rank {rank} syncs per step: {syncs}", flush=True)
        print(f"rank {rank} nccl calls: {sorted(fakenccl.calls.items())}", flush=True)
    sys.exit(code)
