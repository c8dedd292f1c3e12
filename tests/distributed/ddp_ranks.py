"""One rank of data-parallel training over a process group (run under ``mpirun -n 2``):
every rank calls ``DistributedDataParallel.forward_backward`` on the same batch and must get
the gradient one process computes on the whole batch."""

from __future__ import annotations

import numpy as np

import handgrad as hg
import handgrad.distributed as dist
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.parallel.ddp import DistributedDataParallel
from handgrad.parallel.step import accumulate


def model() -> GPT2:
    hg.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    return GPT2(cfg)


def main() -> None:
    group = dist.init_process_group()
    P = group.world_size
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(4 * P, 8))
    y = rng.integers(0, 50, size=(4 * P, 8))
    m = model()
    dp = DistributedDataParallel(m, P, rows=4 * P, block_size=8, seed=0, group=group)
    # 2 micro batches of 2 P rows, 2 rows per rank each; scale 1 / (accum x P)
    losses = dp.forward_backward(0, x, y, micro_batch_size=2, scale=1.0 / (2 * P))
    ref = model()
    half = 2 * P
    micro = [(x[:half], y[:half]), (x[half:], y[half:])]
    ref_losses = accumulate(ref, micro, scale=0.5)  # one process: 1 / accum
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(
            p.grad.numpy(), q.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name
        )
        # every rank holds the very same summed gradient (so their optimizers agree)
        mine = np.ascontiguousarray(p.grad.numpy().reshape(-1))
        every = np.zeros(P * mine.size, dtype=mine.dtype)
        dist.all_gather(every, mine)
        assert all((every.reshape(P, -1)[r] == mine).all() for r in range(P)), name
    print(f"rank {group.rank}: ddp ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
