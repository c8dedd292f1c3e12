"""All-reduce bandwidth between 2 network hosts: handgrad's gradient reducer beside a plain
``MPI_Allreduce`` of the same bytes, over the same link (root, Linux, iproute2).

    .venv/bin/python benchmarks/bench_hosts.py                      # 4, 32 and 128 MiB
    .venv/bin/python benchmarks/bench_hosts.py --mib 64 --repeats 9

The hosts are the network namespaces of tests/hosts.py (a veth pair each, to a bridge; their
own host names); ``mpirun --hostfile`` starts 1 rank on each with ``--mca btl tcp,self`` and
``btl_tcp_if_include`` set to the link's subnet, so every byte crosses the link over TCP.
For each size S, on gradients shaped like GPT-2 124M's (blocks of 768 x 2,304 / 768 x 768 /
768 x 3,072 / 3,072 x 768 matrices, then the 50,304 x 768 embedding; cut to S bytes of
float32; 474 MiB is all of them):

- reducer: ``GradientReducer(params, MPITransport()).reduce("sum")``: every gradient packed
  into 25 MiB buckets, each bucket all-reduced, the views left as ``.grad``: what a step of
  data parallelism does after backward;
- MPI_Allreduce: ``comm.Allreduce(IN_PLACE, buf)`` of one float32 array of S bytes.

The median of ``--repeats`` timed calls after 2 warm-up calls (a barrier before each), and
the bus bandwidth, 2 (P - 1) / P x S / time (NCCL's tests' measure; P = 2: S / time). The
target: the reducer >= 80% of MPI_Allreduce's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

GPT2_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(50304, 768)]


def gradients(nbytes: int) -> list:
    """Parameters with float32 gradients of GPT-2's shapes, ``nbytes`` in all."""
    from handgrad.nn.module import Parameter
    from handgrad.tensor import Tensor

    params, left, rng = [], nbytes // 4, np.random.default_rng(0)
    for rows, cols in GPT2_SHAPES:
        if left <= 0:
            break
        rows = min(rows, max(1, left // cols))
        p = Parameter(np.zeros((rows, min(cols, left)), np.float32))
        p.grad = Tensor(rng.standard_normal(p.shape).astype(np.float32))
        params.append(p)
        left -= p.data.size
    return params


def timed(fn, barrier, repeats: int) -> float:  # noqa: ANN001
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(mib: list[float], repeats: int, bucket_mib: float) -> None:
    from handgrad.distributed.mpi import MPITransport
    from handgrad.distributed.reducer import GradientReducer

    group = MPITransport()  # first: it starts MPI with handgrad's Open MPI settings
    MPI = group.MPI
    rows = []
    for size in mib:
        params = gradients(int(size * (1 << 20)))
        nbytes = sum(p.data.size for p in params) * 4
        reducer = GradientReducer(params, group, bucket_bytes=int(bucket_mib * (1 << 20)))
        buf = np.ones(nbytes // 4, np.float32)
        t_red = timed(lambda: reducer.reduce("sum"), group.barrier, repeats)  # noqa: B023

        def in_flight() -> None:
            reducer.flush("sum")  # noqa: B023  (every bucket started, as backward's hooks do)
            reducer.wait()  # noqa: B023

        t_ovl = timed(in_flight, group.barrier, repeats)
        t_mpi = timed(
            lambda: group.comm.Allreduce(MPI.IN_PLACE, buf),  # noqa: B023
            group.barrier,
            repeats,
        )
        P = group.world_size
        bus = 2 * (P - 1) / P * nbytes
        rows.append({"bytes": nbytes, "params": len(params), "buckets": len(reducer.buckets),
                     "reducer_s": t_red, "mpi_s": t_mpi, "reducer_busbw": bus / t_red,
                     "flight_s": t_ovl, "flight_busbw": bus / t_ovl,
                     "mpi_busbw": bus / t_mpi})  # fmt: skip
    if group.rank == 0:
        hosts = MPI.COMM_WORLD.gather(MPI.Get_processor_name(), root=0)
        print(json.dumps({"hosts": hosts, "rows": rows}), flush=True)
    else:
        MPI.COMM_WORLD.gather(MPI.Get_processor_name(), root=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, nargs="+", default=[4, 32, 128])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bucket-mib", type=float, default=25, help="GradientReducer's buckets")
    ap.add_argument("--mca", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="an Open MPI setting for both measurements (repeatable)")  # fmt: skip
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        return rank_main(args.mib, args.repeats, args.bucket_mib)
    from hosts import NetHosts, why_not  # tests/hosts.py

    if reason := why_not():
        sys.exit(f"bench_hosts: {reason}")
    mpirun = str(Path(sys.executable).parent / "mpirun")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        hosts = NetHosts(2, Path(tmp))
        try:
            mca = [x for key, value in args.mca for x in ("--mca", key, value)]
            cmd = [mpirun, *hosts.mpirun_args(1), *mca, sys.executable, __file__, "--rank",
                   "--repeats", str(args.repeats),
                   "--bucket-mib", str(args.bucket_mib), "--mib", *map(str, args.mib)]  # fmt: skip
            run = subprocess.run(hosts.on_login(cmd), env=env, capture_output=True, text=True,
                                 timeout=1200)  # fmt: skip
        finally:
            hosts.close()
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        sys.exit(f"mpirun failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    found = json.loads(lines[-1])
    settings = " ".join(f"--mca {k} {v}" for k, v in args.mca) or "Open MPI's defaults"
    print(f"2 hosts x 1 rank over TCP (veth + bridge, {hosts.subnet}): {found['hosts']}; "
          f"{settings}; buckets of {args.bucket_mib:g} MiB")  # fmt: skip
    print(f"{'MiB':>7} {'params':>6} {'buckets':>7} {'MPI GB/s':>9} {'reduce GB/s':>12} "
          f"{'':>5} {'in flight GB/s':>15} {'':>5}  (bus bandwidth; % of MPI_Allreduce)")  # fmt: skip
    for r in found["rows"]:
        a, b = r["reducer_busbw"] / r["mpi_busbw"], r["flight_busbw"] / r["mpi_busbw"]
        print(f"{r['bytes'] / (1 << 20):7.1f} {r['params']:6d} {r['buckets']:7d} "
              f"{r['mpi_busbw'] / 1e9:9.3f} {r['reducer_busbw'] / 1e9:12.3f} {a:5.0%} "
              f"{r['flight_busbw'] / 1e9:15.3f} {b:5.0%}")  # fmt: skip
    print("target: the reducer >= 80% of MPI_Allreduce")


if __name__ == "__main__":
    main()
