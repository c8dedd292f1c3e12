"""Automatic mixed precision (``hg.autocast``): matrix products in bfloat16, precision-sensitive ops in float32, as
``torch.autocast("cuda", dtype=torch.bfloat16)``.

Inside ``with hg.autocast("cuda"):`` (or ``"cpu"``) every op keeps the meaning torch's CUDA
autocast gives it, on the tensors of that device type:

* **lower precision** (``Function.autocast = "lower"``: ``linear``, ``@``,
  ``scaled_dot_product_attention``): floating inputs are cast to bfloat16. A product of
  bfloat16 operands accumulates in float32 and is rounded once, to a bfloat16 output.
* **float32** (``"float32"``: layer and RMS norm, softmax, log-softmax, cross entropy, MSE,
  sum): computed in float32 from whatever they are given; the output is float32.
* **everything else** runs in its inputs' dtype, the widest when they differ: GELU of a
  bfloat16 activation is bfloat16, and ``x + attn(x)`` with a float32 residual stream is
  float32.

A parameter (a leaf that requires grad) is cast once per autocast region and the copy is
shared by all its uses, like the tied embedding that is both a lookup table (float32, not
on either list) and the output layer (bfloat16). The copy's gradient flows back through
the cast, so parameters and their gradients stay float32 for the optimizer.

On the CPU the same rules hold through a reference path (NumPy has no bfloat16 arithmetic):
a bfloat16 product is computed in float32 from the bfloat16 operands and rounded through
``ml_dtypes`` (``backend.matmul_bf16``). This differs from ``torch.autocast("cpu")``, whose
lists keep layer norm and softmax in bfloat16: handgrad has one meaning for autocast, the
one a GPU run has, so that a CPU test checks what the GPU will compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import wraps
from typing import TYPE_CHECKING, Any

from handgrad import backend as B
from handgrad.grad_mode import is_grad_enabled

if TYPE_CHECKING:
    from handgrad.tensor import Tensor

__all__ = ["autocast", "get_autocast_dtype", "is_autocast_enabled"]

_DEVICE_TYPES = ("cpu", "cuda")


class _State:
    # the active region: device type and dtype (None: autocast is off)
    device_type: str | None = None
    dtype: Any = None
    cache_enabled = True
    depth = 0  # nested regions; the cast cache lives as long as the outermost one
    # id(parameter) -> (parameter, grad mode, its cast): the parameter is held so that its
    # id cannot be reused by another tensor while the entry lives
    cache: dict[int, tuple[Any, bool, Any]] = {}  # noqa: RUF012  (one shared state)


class autocast:  # noqa: N801  (torch's name)
    """Context manager (and decorator) that runs matrix products in ``dtype`` (bfloat16)
    and keeps precision-sensitive ops in float32; see the module docstring.

    ``device_type``: "cuda" or "cpu" (ops on tensors of that type are affected);
    ``enabled=False`` turns autocast off inside the region; ``cache_enabled=False`` casts a
    parameter again at each use."""

    def __init__(
        self,
        device_type: str,
        dtype: Any = None,
        enabled: bool = True,
        cache_enabled: bool = True,
    ) -> None:
        if device_type not in _DEVICE_TYPES:
            raise ValueError(
                f"autocast: device_type must be one of {', '.join(_DEVICE_TYPES)}, "
                f"got {device_type!r}"
            )
        dtype = B.bfloat16 if dtype is None else B.to_dtype(dtype)
        if dtype != B.bfloat16:
            raise ValueError(
                f"autocast: only bfloat16 is supported, got {B.dtype_name(dtype)} (float16 "
                "needs loss scaling, which handgrad does not have)"
            )
        self.device_type, self.dtype = device_type, dtype
        self.enabled, self.cache_enabled = bool(enabled), bool(cache_enabled)

    def __enter__(self) -> autocast:
        self._prev = (_State.device_type, _State.dtype, _State.cache_enabled)
        if self.enabled:
            _State.device_type, _State.dtype = self.device_type, self.dtype
            _State.cache_enabled = self.cache_enabled
        else:
            _State.device_type, _State.dtype = None, None
        _State.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        _State.device_type, _State.dtype, _State.cache_enabled = self._prev
        _State.depth -= 1
        if _State.depth == 0:
            _State.cache.clear()

    def __call__(self, fn: Callable) -> Callable:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with autocast(self.device_type, self.dtype, self.enabled, self.cache_enabled):
                return fn(*args, **kwargs)

        return wrapper


def is_autocast_enabled(device_type: str | None = None) -> bool:
    """Whether an autocast region is active (for ``device_type``, when given)."""
    if _State.dtype is None:
        return False
    return device_type is None or device_type == _State.device_type


def get_autocast_dtype(device_type: str | None = None) -> Any:
    """The active region's dtype (bfloat16), or None outside autocast."""
    return _State.dtype if is_autocast_enabled(device_type) else None


def state() -> tuple[str | None, Any]:
    """(device type, dtype) of the active region, (None, None) outside: what
    ``nn.utils.checkpoint`` records so that a recompute runs under the forward's rules."""
    return _State.device_type, _State.dtype


def policy(op: Any, inputs: Sequence[Tensor]) -> str | None:
    """The autocast rule for ``op`` (a Function class) on these inputs: its ``autocast``
    attribute when a region is active for their device type, else None."""
    rule = op.autocast
    if rule is None or _State.dtype is None or not inputs:
        return None
    return rule if inputs[0].device.type == _State.device_type else None


def cast_inputs(inputs: Sequence[Tensor]) -> list[Tensor]:
    """``inputs`` with every floating tensor not yet in the region's dtype cast to it
    (integer and boolean tensors pass as they are). A parameter's cast is cached for the
    rest of the region (see the module docstring)."""
    dtype, out = _State.dtype, []
    for t in inputs:
        if not B.is_floating(t.dtype) or t.dtype == dtype:
            out.append(t)
            continue
        if not (_State.cache_enabled and t.requires_grad and t._ctx is None):
            out.append(t.to(dtype))
            continue
        grad = is_grad_enabled()
        hit = _State.cache.get(id(t))
        if hit is None or hit[0] is not t or hit[1] != grad:
            hit = (t, grad, t.to(dtype))
            _State.cache[id(t)] = hit
        out.append(hit[2])
    return out
