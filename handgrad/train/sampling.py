"""Text samples from a model during training and from ``handgrad sample``."""

from __future__ import annotations

from typing import Any

import numpy as np

from handgrad.models.gpt2 import GPT2


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from end-of-text (a document boundary) or,
    for tokenizers without one, from a newline (or id 0 if even that is not encodable)."""
    if prompt:
        return tokenizer.encode(prompt)
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    try:
        ids = tokenizer.encode("\n")
    except (KeyError, ValueError):
        ids = []
    return ids or [0]


def sample_text(
    model: GPT2,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> str:
    ids = prompt_ids(tokenizer, prompt)
    out = model.generate(
        np.asarray([ids], dtype=np.int64),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,  # its own generator: sampling never moves the training RNG
    )
    new = [int(t) for t in out[0, len(ids) :]]
    return prompt + tokenizer.decode(new)
