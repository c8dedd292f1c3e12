"""Reading a checkpoint for evaluation: its model and its tokenizer.

Finding the checkpoint (a run directory, its ``latest`` file or a checkpoint directory), the
run it belongs to and its config are ``handgrad.checkpoint``'s.
"""

from __future__ import annotations

import os

from handgrad.checkpoint import resolve_checkpoint
from handgrad.models import GPT2, Llama, model_from_checkpoint
from handgrad.tokenizer import load_tokenizer

__all__ = ["load_checkpoint_tokenizer", "load_model"]


def load_model(checkpoint: str | os.PathLike, device: str | None = None) -> GPT2 | Llama:
    """The model (GPT-2 or Llama) of a checkpoint (any form ``resolve_checkpoint`` takes), in eval mode, on
    ``device`` ('cpu', 'cuda', 'cuda:N'; the CPU when None)."""
    model = model_from_checkpoint(checkpoint)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_checkpoint_tokenizer(checkpoint: str | os.PathLike):  # -> a handgrad tokenizer
    """The tokenizer saved with a checkpoint (``tokenizer.json``, a handgrad tokenizer file)."""
    path = resolve_checkpoint(checkpoint) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a checkpoint carries its tokenizer)")
    return load_tokenizer(path)
