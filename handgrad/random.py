"""The global random generator behind ``randn``, ``rand``, dropout and the init helpers.

It is a host-side NumPy generator whatever array library the tensors use: samples are drawn
on the host and moved to the arrays' namespace, so a seed gives the same numbers everywhere.
"""

from __future__ import annotations

import numpy as np


class _RNG:
    gen = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the global generator used by ``randn``, ``rand``, dropout and init helpers."""
    _RNG.gen = np.random.default_rng(int(seed))


def default_generator() -> np.random.Generator:
    return _RNG.gen


def get_rng_state() -> dict:
    """The global generator's state as a JSON-serialisable dict (for exact resume)."""
    return _RNG.gen.bit_generator.state


def set_rng_state(state: dict) -> None:
    gen = np.random.default_rng()
    gen.bit_generator.state = state
    _RNG.gen = gen
