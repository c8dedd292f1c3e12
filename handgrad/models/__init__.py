"""Model definitions: GPT-2 in ``handgrad.models.gpt2``, the Llama-style GPT in
``handgrad.models.llama``.

A config's dict (a checkpoint's config.json "model" section) names its architecture by its
``arch`` key: "gpt2" (the default, so checkpoints written before there was a choice load as
GPT-2) or "llama". The functions below build the right class from it.
"""

from __future__ import annotations

import os
from typing import Any

from handgrad.checkpoint import read_config, resolve_checkpoint
from handgrad.models import gpt2, llama
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.models.llama import Llama, LlamaConfig

DEFAULT_ARCH = "gpt2"
# arch -> (config class, model class, its module: PRESETS, num_parameters, flops_per_token)
ARCHS: dict[str, tuple[type, type, Any]] = {
    "gpt2": (GPT2Config, GPT2, gpt2),
    "llama": (LlamaConfig, Llama, llama),
}


def arch_of(section: dict[str, Any]) -> str:
    """The architecture a "model" section names (``arch``, default "gpt2"), checked."""
    arch = section.get("arch", DEFAULT_ARCH)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def config_from_dict(section: dict[str, Any]) -> GPT2Config | LlamaConfig:
    """The config of a "model" section, of the class its ``arch`` names."""
    if not isinstance(section, dict):
        raise TypeError(f"expected a model section (a dict), got {type(section).__name__}")
    arch = arch_of(section)
    fields = {k: v for k, v in section.items() if k != "arch"}
    return ARCHS[arch][0].from_dict(fields)


def build_model(config: GPT2Config | LlamaConfig | dict[str, Any]) -> GPT2 | Llama:
    """A freshly initialised model of ``config`` (a config object or a "model" section)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return ARCHS[config.arch][1](config)


def model_from_checkpoint(path: str | os.PathLike, dtype: str | None = None) -> GPT2 | Llama:
    """The model of a checkpoint (any form ``resolve_checkpoint`` takes), GPT-2 or Llama as
    its config.json says; see ``GPT2.from_checkpoint``."""
    section = read_config(resolve_checkpoint(path))["model"]
    try:
        arch = arch_of(section)
    except ValueError as e:
        raise ValueError(f"{resolve_checkpoint(path) / 'config.json'}: {e}") from None
    return ARCHS[arch][1].from_checkpoint(path, dtype=dtype)


def num_parameters(config: GPT2Config | LlamaConfig, non_embedding: bool = False) -> int:
    """The number of parameters of the model of ``config``, computed without building it."""
    return ARCHS[config.arch][2].num_parameters(config, non_embedding)


__all__ = [
    "ARCHS",
    "GPT2",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "arch_of",
    "build_model",
    "config_from_dict",
    "model_from_checkpoint",
    "num_parameters",
]
