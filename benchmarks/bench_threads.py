"""What a second core is worth to small NumPy work, three ways: handing each op's half to a
thread (as an op-level thread pool must), two threads that each run a long loop, and two
processes. The work is attention-sized: per iteration, a stacked matmul of 48 (64 x 32) x
(32 x 64) products, an exp over the (48, 64, 64) result and another stacked matmul, i.e.
one head-batch of the shakespeare-char model's attention forward.

    .venv/bin/python benchmarks/bench_threads.py
    .venv/bin/python benchmarks/bench_threads.py --iterations 400 --repeats 5

Prints microseconds per iteration (median of the repeats) and the speed-up over one thread.
BLAS is held to one thread throughout, so each piece runs on one core.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handgrad import backend as B  # noqa: E402

rng = np.random.default_rng(0)
Q = rng.standard_normal((48, 64, 32), dtype=np.float32)
KT = rng.standard_normal((48, 32, 64), dtype=np.float32)


def work(heads: slice, iterations: int) -> None:
    for _ in range(iterations):
        s = Q[heads] @ KT[heads]
        np.exp(s * 0.01, out=s)
        s @ Q[heads]


def _process_half(conn, iterations: int) -> None:
    B.set_num_threads(1)
    work(slice(24, 48), 20)  # warm up: first writes to memory shared with the parent fault
    conn.send(0)
    conn.recv()
    work(slice(24, 48), iterations)
    conn.send(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    n = args.iterations
    pool = ThreadPoolExecutor(1)
    times: dict[str, list[float]] = {k: [] for k in ("one", "handoff", "threads", "processes")}
    with B.num_threads(1):
        work(slice(None), 5)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            work(slice(None), n)
            times["one"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            for _ in range(n):  # one hand-off per iteration, as an op would do
                f = pool.submit(work, slice(0, 24), 1)
                work(slice(24, 48), 1)
                f.result()
            times["handoff"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            f = pool.submit(work, slice(0, 24), n)
            work(slice(24, 48), n)
            f.result()
            times["threads"].append(time.perf_counter() - t0)

            if "fork" in mp.get_all_start_methods():
                ctx = mp.get_context("fork")
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_process_half, args=(child, n))
                proc.start()
                work(slice(0, 24), 20)
                parent.recv()
                t0 = time.perf_counter()
                parent.send(0)
                work(slice(0, 24), n)
                parent.recv()
                times["processes"].append(time.perf_counter() - t0)
                proc.join()
    one = statistics.median(times["one"])
    labels = {
        "one": "one thread",
        "handoff": "2 threads, a hand-off per iteration",
        "threads": "2 threads, one long loop each",
        "processes": "2 processes, one long loop each",
    }
    print(f"{'':40}{'us/iteration':>14}{'speed-up':>10}")
    for key, label in labels.items():
        if times[key]:
            t = statistics.median(times[key])
            print(f"{label:40}{t / n * 1e6:>14.0f}{one / t:>10.2f}")


if __name__ == "__main__":
    main()
