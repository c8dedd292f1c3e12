"""Training GPT-2: configs, the loop, evaluation, checkpoints.

    from handgrad.train import load_config, train

    cfg = load_config("shakespeare-char", ["train.max_steps=100"])
    result = train(cfg, "runs/shakespeare-char")
    result.final_eval.loss

``evaluate(model, tokens, batches, micro_batch_size, block_size)`` is the validation loss used
by training and by ``handgrad eval``.
"""

from handgrad.checkpoint import CheckpointError, resolve_checkpoint
from handgrad.parallel import EvalResult, evaluate, unigram_loss
from handgrad.train.checkpointing import Checkpoint, load_checkpoint, save_checkpoint
from handgrad.train.config import ConfigError, TrainConfig, load_config
from handgrad.train.trainer import TrainingDiverged, TrainResult, train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
    "unigram_loss",
]
