"""``Function``: one node of the autograd graph, and the broadcasting helpers ops share.

Every differentiable op is a ``Function`` with a ``forward`` on arrays and a hand-derived
``backward`` that maps the gradient of the output, ``g = dL/dout``, to the gradients of the
inputs. Calling an op records the ``Function`` on its output (``out._ctx``); the engine
(``handgrad.engine``) walks those records once, in reverse topological order.

Conventions used in the derivations of the ops: ``g`` is dL/d(out); "unbroadcast" sums a
gradient over the axes that broadcasting expanded, because an input that was broadcast to
many positions receives the sum of their gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from handgrad import amp as _amp
from handgrad import backend as B
from handgrad.backend.device import device_of, devices_of, to_device
from handgrad.grad_mode import is_grad_enabled

if TYPE_CHECKING:
    from handgrad.tensor import Tensor

_LOW_PRECISION = (B.bfloat16, B.float16)


class Function:
    """Base class of differentiable ops.

    Subclasses implement ``forward(*arrays, **kwargs) -> array`` (saving on ``self`` what
    backward needs) and ``backward(g) -> tuple`` with one gradient (or None) per tensor input.
    A forward may return a tuple of arrays: ``apply`` then returns a tuple of tensors, and
    backward receives a tuple with the gradient of each output (None for an output nothing
    used).
    ``self.needs_input_grad`` tells backward which input gradients are wanted. Backward must
    not write into ``g`` (the same array may be handed to several ops), and returns new arrays
    or views, never an array it keeps elsewhere (new arrays are written into in place).

    NumPy has no fast bfloat16/float16 kernels, so unless a subclass sets ``native = True``
    (pure data movement: reshape, slicing, concatenation), 16-bit inputs are computed in
    float32 and the output is cast back to the 16-bit dtype.
    """

    native = False
    # What the op does inside ``hg.autocast`` (see ``handgrad.amp``): "lower" casts
    # its floating inputs to bfloat16, "float32" computes in float32 and returns float32,
    # None runs in the inputs' dtype.
    autocast: ClassVar[str | None] = None
    needs_input_grad: tuple[bool, ...] = ()
    # The class op outputs and gradients are made of. ``handgrad.tensor`` sets it to Tensor
    # when it is imported: Tensor's methods call the ops, which build on this module, so this
    # module cannot import Tensor without an import circle.
    output_type: ClassVar[Any] = None

    @classmethod
    def keeps_low_precision(cls, arrays: list[Any]) -> bool:
        """Whether this op takes these 16-bit inputs as they are (it computes in 16 bits
        itself, e.g. a bfloat16 GEMM on a GPU) instead of receiving float32 copies."""
        return False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, g: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Tensor, **kwargs: Any) -> Tensor:
        ctx = cls()
        rule = _amp.policy(cls, inputs) if cls.autocast is not None else None
        if rule == "lower":
            inputs = _amp.cast_inputs(inputs)
        arrays = [t.data for t in inputs]
        if len(arrays) > 1:
            # host arrays only (the common case on the CPU) need no device check
            first = type(arrays[0])
            if first is not B.HostArray or any(type(a) is not first for a in arrays):
                arrays = _on_one_device(cls.__name__, arrays)
        cast_back = None
        low = any(a.dtype in _LOW_PRECISION for a in arrays)
        if low and not cls.native and not cls.keeps_low_precision(arrays):
            floats = [a.dtype for a in arrays if B.is_floating(a.dtype)]
            cast_back = B.get_array_module(*arrays).result_type(*floats)
            arrays = [a.astype(B.float32) if a.dtype in _LOW_PRECISION else a for a in arrays]
        record = is_grad_enabled() and any(t.requires_grad for t in inputs)
        ctx.needs_input_grad = tuple(t.requires_grad for t in inputs) if record else ()
        out = ctx.forward(*arrays, **kwargs)
        several = isinstance(out, tuple)
        outs = out if several else (out,)
        if cast_back in _LOW_PRECISION and rule != "float32":
            outs = tuple(o.astype(cast_back) if o.dtype == B.float32 else o for o in outs)
        results = tuple(Function.output_type._make(o, requires_grad=record) for o in outs)
        if record:
            # Edges point at the op that produced each input (or at the leaf itself), never
            # at intermediate tensors, so an intermediate's array is freed as soon as no op
            # saved it for backward.
            ctx.parents = tuple(
                t._ctx if t._ctx is not None else (t if t.requires_grad else None) for t in inputs
            )
            if several:  # each output gets a node of its own that hands its gradient back
                for i, t in enumerate(results):
                    t._ctx = OutputOf(ctx, i, len(results))
            else:
                results[0]._ctx = ctx
        return results if several else results[0]


class OutputOf(Function):
    """Output ``index`` of an op with ``count`` outputs: a graph node whose backward hands its
    gradient to the op as one part of the tuple the op's backward receives (``engine``
    gathers the parts)."""

    def __init__(self, op: Function, index: int, count: int) -> None:
        self.parents, self.index, self.count = (op,), index, count
        self.needs_input_grad = (True,)

    def backward(self, g: Any) -> tuple[Any]:
        return (GradientPart(self.index, self.count, g),)


class GradientPart:
    """The gradient of one output of a several-output op, on its way to that op."""

    __slots__ = ("count", "index", "value")

    def __init__(self, index: int, count: int, value: Any) -> None:
        self.index, self.count, self.value = index, count, value


def _on_one_device(op: str, arrays: list[Any]) -> list[Any]:
    """``arrays`` when they all live on one device. A 0-d array on another device is moved
    to it (as torch lets a CPU scalar tensor meet a GPU tensor: a few bytes uploaded, no
    synchronisation); any other mix raises a RuntimeError naming both devices."""
    big = [a for a in arrays if a.ndim > 0]
    found = devices_of(big)
    if len(found) > 1:
        raise RuntimeError(
            f"{op}: expected all tensors on the same device, got {found[0]} and {found[1]} "
            f"(move one with .to(device))"
        )
    if len(big) == len(arrays):
        return arrays
    if big:
        target = found[0]
    else:  # only 0-d arrays: compute where the first non-CPU one lives
        everywhere = devices_of(arrays)
        target = next((d for d in everywhere if d.type != "cpu"), everywhere[0])
    return [a if device_of(a) == target else _scalar_to(a, target) for a in arrays]


def _scalar_to(a: Any, target: Any) -> Any:
    """The 0-d array ``a`` on ``target``: on a GPU a host one goes as a NumPy scalar (a
    kernel argument, no copy; see ``backend.host_scalar``)."""
    if target.type != "cpu":
        scalar = B.host_scalar(a)
        if scalar is not None:
            return scalar
    return to_device(a, target)


def unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``g`` down to ``shape``: the adjoint of broadcasting ``shape`` up to ``g.shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return g.sum(axis=axes, keepdims=True).reshape(shape) if axes else g.reshape(shape)


def check_broadcastable(a: tuple[int, ...], b: tuple[int, ...], op: str) -> None:
    """Raise a ValueError naming ``op`` and both shapes when they cannot be broadcast."""
    try:
        B.broadcast_shapes(a, b)
    except ValueError:
        raise ValueError(
            f"{op}: shapes {a} and {b} cannot be broadcast together "
            f"(trailing dimensions must be equal or 1)"
        ) from None
