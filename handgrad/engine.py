"""The backward engine: walks the recorded graph once, in reverse topological order.

Nodes are ops (``Function``, linked to their inputs' producers by ``parents``) and the leaf
tensors that require grad. Each node's gradient is summed from its consumers before its own
``backward`` runs; leaves accumulate theirs into ``.grad``. No recursion, so a 1,000-layer
chain does not hit Python's recursion limit.

A leaf's ``.grad`` is final for this backward as soon as the walk reaches it: the reverse
topological order visits every consumer of a node before the node, so the gradients of all
its uses (both of a tied weight's, such as GPT-2's ``wte``) are already summed. That is where
the hooks of ``Tensor.register_post_accumulate_grad_hook`` run, which lets data parallelism
start reducing the last layers' gradients while backward is still working on the first ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from handgrad import backend as B
from handgrad.backend.device import device_of, is_on, to_device
from handgrad.function import Function, GradientPart

if TYPE_CHECKING:
    from handgrad.tensor import Tensor


class SliceGrad:
    """A gradient that is ``values`` at ``index`` of an otherwise-zero array of ``shape``."""

    __slots__ = ("shape", "index", "values")

    def __init__(self, shape: tuple[int, ...], index: Any, values: Any) -> None:
        self.shape, self.index, self.values = shape, index, values

    def dense(self) -> Any:
        out = B.get_array_module(self.values).zeros(self.shape, dtype=self.values.dtype)
        out[self.index] = self.values
        return out


class RemovableHandle:
    """What registering a hook returns: ``remove()`` unregisters it (a second call does
    nothing)."""

    __slots__ = ("_hooks", "_key")

    def __init__(self, hooks: dict[int, Callable[[Any], None]], key: int) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)


_next_hook_key = 0


def add_post_accumulate_grad_hook(t: Tensor, fn: Callable[[Tensor], None]) -> RemovableHandle:
    """Register ``fn(t)`` to run once per backward, after ``t.grad`` has received all of
    this backward's gradient (see ``Tensor.register_post_accumulate_grad_hook``)."""
    global _next_hook_key
    if not callable(fn):
        raise TypeError(f"register_post_accumulate_grad_hook: {fn!r} is not callable")
    if not t.is_leaf or not t.requires_grad:
        kind = "a non-leaf tensor" if not t.is_leaf else "a tensor that does not require grad"
        raise RuntimeError(
            "register_post_accumulate_grad_hook: only leaf tensors that require grad "
            f"accumulate a .grad; this is {kind} of shape {t.shape}"
        )
    hooks = getattr(t, "_grad_hooks", None)
    if hooks is None:
        hooks = t._grad_hooks = {}
    _next_hook_key += 1
    hooks[_next_hook_key] = fn  # dicts keep insertion order: hooks run as registered
    return RemovableHandle(hooks, _next_hook_key)


def _accumulated(t: Tensor) -> None:
    """Run ``t``'s post-accumulate hooks: its ``.grad`` is final for this backward."""
    hooks = getattr(t, "_grad_hooks", None)
    if hooks:
        for fn in list(hooks.values()):  # a hook may remove itself
            fn(t)


def _topological_order(root: Function) -> list[Function | Tensor]:
    """Graph nodes reachable from ``root``, inputs before outputs.

    Nodes are ops (``Function``) and the leaf tensors that require grad. An explicit stack
    replaces recursion so that deep graphs (a 1,000-layer chain) do not hit Python's
    recursion limit.
    """
    order: list[Function | Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Function | Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if not isinstance(node, Function):  # a leaf tensor
            continue
        if getattr(node, "_freed", False):
            raise RuntimeError(
                "backward(): trying to go through the graph a second time; its saved "
                "values were freed by the first backward(). Call backward(retain_graph=True) "
                "the first time if you need to backpropagate twice."
            )
        # leaves go on the stack below the ops, so they are popped after the ops' subgraphs
        # are done: each leaf lands in ``order`` just before the op that reached it first
        # (its last consumer in the backward walk), hence right after that op's backward,
        # the moment its gradient is final (and its hooks can start reducing it) rather
        # than at the end. Leaves have no inputs, so the ops' order, and with it every sum
        # of gradients, is the same either way.
        for p in node.parents:
            if p is not None and not isinstance(p, Function) and id(p) not in seen:
                stack.append((p, False))
        for p in node.parents:
            if isinstance(p, Function) and id(p) not in seen:
                stack.append((p, False))
    return order


def _accumulate(t: Tensor, g: Any, owned: bool = False) -> None:
    """Add ``g`` into ``t.grad``. An ``owned`` array (nobody else holds it) is adopted as the
    gradient without a copy."""
    if isinstance(g, SliceGrad):
        g, owned = g.dense(), True
    if type(g) is not type(t.data) and not is_on(g, device_of(t.data)):
        # a CPU scalar tensor that met a GPU tensor: its gradient comes back to the CPU
        g, owned = to_device(g, device_of(t.data)), True
    if g.shape != t.shape:  # a bug in some op's backward, never a user error
        raise RuntimeError(
            f"internal error: gradient of shape {g.shape} for a tensor of shape {t.shape}"
        )
    gdtype = B.compute_dtype(t.dtype)
    if t.grad is None:
        adopt = owned and g.dtype == gdtype and B.is_writeable(g)
        if not adopt:
            g = B.get_array_module(g).array(g, dtype=gdtype, copy=True)
        t.grad = Function.output_type._make(g)
    else:
        t.grad.data += g


def _add_grad(grads: dict[int, tuple[Any, bool]], key: int, g: Any, fresh: bool) -> None:
    """Sum ``g`` into the pending gradient of a node. An "owned" buffer (allocated here, or a
    fresh array nobody else holds) is updated in place; any other array may be shared (Add
    passes the same ``g`` to both inputs), so it is never written to."""
    prev = grads.get(key)
    if isinstance(g, GradientPart):  # one output of a several-output op: its slot
        parts = prev[0] if prev is not None else [None] * g.count
        parts[g.index] = g.value
        grads[key] = (parts, False)
        return
    if prev is None:
        grads[key] = (g, fresh) if not isinstance(g, SliceGrad) else (g.dense(), True)
        return
    buf, owned = prev
    if isinstance(g, SliceGrad):
        buf = buf if owned else buf.copy()
        buf[g.index] += g.values
    elif owned:
        buf += g
    else:
        buf = buf + g
    grads[key] = (buf, True)


def run_backward(root: Tensor, g: Any, retain_graph: bool) -> None:
    """Accumulate d(root)/d(leaf) * ``g`` into ``leaf.grad`` for every leaf that requires
    grad. ``g`` is an array of root's shape. Unless ``retain_graph``, each op's saved arrays
    are freed as soon as its backward has run."""
    if root._ctx is None:
        _accumulate(root, g)
        _accumulated(root)
        return
    order = _topological_order(root._ctx)
    grads: dict[int, tuple[Any, bool]] = {id(root._ctx): (g, False)}
    for node in reversed(order):
        entry = grads.pop(id(node), None)
        if entry is None:
            continue
        g, owned = entry
        if not isinstance(node, Function):  # a leaf tensor: every consumer has been visited
            _accumulate(node, g, owned)
            _accumulated(node)
            continue
        retained = getattr(node, "_retained", None)
        if retained is not None and retained() is not None:
            _accumulate(retained(), g)
        if isinstance(g, list):  # the gathered gradients of a several-output op
            g = tuple(p.dense() if isinstance(p, SliceGrad) else p for p in g)
        in_grads = node.backward(g)
        returned = [id(a) for a in in_grads if a is not None]
        for p, pg in zip(node.parents, in_grads):
            if p is not None and pg is not None:
                # a new allocation handed to one input only can be written in place later
                fresh = (
                    not isinstance(pg, SliceGrad | GradientPart)
                    and B.owns_data(pg)
                    and pg is not g
                    and returned.count(id(pg)) == 1
                )
                _add_grad(grads, id(p), pg, fresh)
        if not retain_graph:
            parents = node.parents
            node.__dict__.clear()
            node.parents, node._freed = parents, True
