"""Model definitions. GPT-2 lives in ``handgrad.models.gpt2``."""

from handgrad.models.gpt2 import GPT2, GPT2Config, num_parameters

__all__ = ["GPT2", "GPT2Config", "num_parameters"]
