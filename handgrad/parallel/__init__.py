"""How a training step is spread over processes and devices, behind one object.

    mode = choose_mode(device="cpu", processes=2, zero=False)   # once, from the config
    optimizer = mode.setup(model, optimizer, micro_batch_size=8, grad_accum_steps=1,
                           block_size=64, seed=1337)
    losses = mode.gradients(step, x, y)             # the global batch's forward + backward
    stats = mode.clip_and_step(step, losses, lr, grad_clip)

``modes.py`` has the modes (one process, forked ranks, MPI ranks on CPUs or GPUs, each with
or without ZeRO-1) and is the only place that knows ranks; ``step.py`` the micro-batch loop
every mode runs; ``ddp.py`` the data-parallel gradients; ``zero.py`` ZeRO-1's sharded AdamW;
``evaluate.py`` the validation loss, which ``handgrad eval`` uses too.
"""

from handgrad.parallel.evaluate import EvalResult, evaluate, unigram_loss
from handgrad.parallel.modes import (
    FAILED,
    ForkedRanks,
    ModeError,
    MPIRanks,
    RankStopped,
    RunMode,
    choose_mode,
)
from handgrad.parallel.step import PendingLosses, StepStats, TrainingDiverged

__all__ = [
    "FAILED",
    "EvalResult",
    "ForkedRanks",
    "MPIRanks",
    "ModeError",
    "PendingLosses",
    "RankStopped",
    "RunMode",
    "StepStats",
    "TrainingDiverged",
    "choose_mode",
    "evaluate",
    "unigram_loss",
]
