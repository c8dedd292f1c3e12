"""One rank of the overlapped gradient reduction (run under ``mpirun -n 2``): the MPI
transport's non-blocking all-reduce, then data-parallel steps with the reduction overlapped
with backward (hooks polling the requests, or not) against the reduction after backward:
the same losses and gradients, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np

import handgrad as hg
import handgrad.distributed as dist
import handgrad.nn as nn
from handgrad.distributed.reducer import GradientReducer
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.parallel.ddp import DistributedDataParallel


def model() -> GPT2:
    hg.manual_seed(0)
    m = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    m.unused = nn.Parameter(hg.ones(5))  # no rank ever gives it a gradient
    return m


def main() -> None:
    group = dist.init_process_group()
    P, r = group.world_size, group.rank

    # Iallreduce: sum, avg, bfloat16, and a blocking collective issued while it is in flight
    a = np.arange(6, dtype=np.float32) * (r + 1)
    b = np.full(4, r + 1.0, dtype=np.float64)
    c = np.full(3, 1.5 * (r + 1), dtype=ml_dtypes.bfloat16)
    works = [group.all_reduce_async(a), group.all_reduce_async(b, "avg")]
    works.append(group.all_reduce_async(c))
    d = np.ones(2, dtype=np.float32)
    group.all_reduce(d)
    for w in works:
        w.test()
        w.wait()
    works[0].wait()  # a second wait does nothing
    total = P * (P + 1) / 2
    np.testing.assert_array_equal(a, np.arange(6) * total)
    np.testing.assert_array_equal(b, np.full(4, total / P))
    np.testing.assert_array_equal(c.astype(np.float32), np.full(3, 1.5 * total))
    np.testing.assert_array_equal(d, np.full(2, float(P)))

    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(4 * P, 8))
    y = rng.integers(0, 50, size=(4 * P, 8))
    runs = {}
    for name, overlap, poll in (("after", False, True), ("overlap", True, True),
                                ("no poll", True, False)):  # fmt: skip
        m = model()
        dp = DistributedDataParallel(
            m, P, rows=4 * P, block_size=8, seed=0, group=group, overlap=overlap
        )
        assert dp.overlap is overlap
        # small buckets (2 KB), so that several of them start while backward runs
        dp.reducer.detach()
        dp.reducer = GradientReducer(dp.params, group, bucket_bytes=2048, poll=poll)
        if overlap:
            dp.reducer.attach()
        before_flush = []
        real_flush = dp.reducer.flush

        def flush(  # noqa: ANN202
            op: str = "sum",
            reducer=dp.reducer,
            real=real_flush,
            log=before_flush,  # noqa: ANN001
        ):
            log.append(len(reducer._work))
            real(op)

        dp.reducer.flush = flush
        steps = []
        for step in range(2):  # 2 micro batches of 2 rows per rank each: accumulation
            for p in m.parameters():
                p.grad = None
            losses = dp.forward_backward(step, x, y, micro_batch_size=2, scale=1.0 / (2 * P))
            grads = {n: None if p.grad is None else p.grad.numpy().copy()
                     for n, p in m.named_parameters()}  # fmt: skip
            steps.append((losses, grads))
        dp.close()
        runs[name] = steps
        if overlap:  # every bucket but the one holding `unused` (the last) started in backward
            n = len(dp.reducer.buckets)
            assert n > 3 and before_flush == [n - 1, n - 1], (n, before_flush)
    for name in ("overlap", "no poll"):
        for (losses, grads), (ref_losses, ref_grads) in zip(runs[name], runs["after"]):
            assert losses == ref_losses, (name, losses, ref_losses)
            assert grads["unused"] is None and ref_grads["unused"] is None  # no rank had one
            assert grads.keys() == ref_grads.keys()
            for key, g in grads.items():
                if key != "unused":
                    np.testing.assert_array_equal(g, ref_grads[key], err_msg=f"{name}: {key}")
    print(f"rank {r}: overlap ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
