"""Activation recompute (``torch.utils.checkpoint``): keep a block's input, not its insides.

Backward needs what forward computed: a transformer block saves a dozen activations of its
input's size and more (attention probabilities are (B, H, T, T)). ``checkpoint(fn, x)`` runs
``fn`` without recording a graph, so only ``x`` is kept, and runs it again in backward:

    forward:   y = fn(x)                      keep x and the RNG state s0; the block's graph
                                              is dropped as soon as y is made
    backward:  set the RNG to s0              dropout draws the very same masks
               y' = fn(x'), x' = x as a leaf  the block's graph, built now (y' == y)
               y'.backward(dL/dy)             parameters' .grad accumulate here; dL/dx = x'.grad
               restore the RNG                the run's later draws are the ones it had

The recompute runs under the autocast state of the forward (``hg.autocast``), as torch's does.

Every value is computed by the same ops in the same order as without recompute, so the
gradients are bit-identical; the price is one more forward of each block per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from handgrad import amp as _amp
from handgrad.function import Function
from handgrad.grad_mode import enable_grad, is_grad_enabled
from handgrad.random import get_rng_state, set_rng_state
from handgrad.tensor import Tensor

__all__ = ["checkpoint"]


class _Recompute(Function):
    native = True  # ``fn`` sees the input as it is (a bf16 block casts inside itself)

    def forward(self, x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
        self.x, self.fn, self.rng = x, fn, get_rng_state()
        self.amp_state = _amp.state()  # the recompute runs under the same autocast
        # Recorded as in backward, then dropped with ``y``: some fused ops take another
        # (equally exact) order of operations when no gradient is wanted, and the values
        # passed on must be the bits the recompute will produce.
        with enable_grad():
            return fn(Tensor._make(x, requires_grad=True)).data

    def backward(self, g: Any) -> tuple[Any]:
        later = get_rng_state()
        set_rng_state(self.rng)
        x = Tensor._make(self.x, requires_grad=True)
        device_type, dtype = self.amp_state
        rules = _amp.autocast(device_type or "cpu", dtype, enabled=dtype is not None)
        try:
            with enable_grad(), rules:
                y = self.fn(x)
        finally:
            set_rng_state(later)
        if not y.requires_grad:  # nothing in fn depends on a tensor that wants a gradient
            return (None,)
        y.backward(Tensor._make(g))
        return (x.grad.data if x.grad is not None and self.needs_input_grad[0] else None,)


def checkpoint(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)``, recomputed in backward instead of keeping its activations (see the module
    docstring). ``fn`` takes and returns one tensor; the parameters it uses get their
    gradients during the recompute. Outside autograd (``no_grad``, or nothing requiring a
    gradient) it is just ``fn(x)``."""
    if not is_grad_enabled():
        return fn(x)
    if not x.requires_grad:  # a graph node all the same: fn's parameters want gradients
        x = Tensor._make(x.data, requires_grad=True)
    return _Recompute.apply(x, fn=fn)
