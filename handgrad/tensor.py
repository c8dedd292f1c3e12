"""``Tensor``: an n-dimensional array that records the ops applied to it for ``backward()``.

A ``Tensor`` wraps one array of the backend (NumPy, or CuPy on a GPU); its operator methods
call the primitive ops of ``handgrad.ops``, each a ``Function`` with its derivative beside
it, and ``backward()`` hands the recorded graph to ``handgrad.engine``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from handgrad import backend as B
from handgrad.backend.device import device, device_of, is_on, parse_to, to_device
from handgrad.engine import RemovableHandle, add_post_accumulate_grad_hook, run_backward
from handgrad.function import Function
from handgrad.grad_mode import is_grad_enabled
from handgrad.ops.elementwise import (
    Abs,
    Add,
    Cast,
    Div,
    Exp,
    Log,
    Mul,
    Neg,
    Pow,
    Relu,
    Sigmoid,
    Sqrt,
    Sub,
    Tanh,
)
from handgrad.ops.matmul import MatMul
from handgrad.ops.reduce import Max, Mean, Sum, Var, norm_axes
from handgrad.ops.shape import Expand, GetItem, Permute, Reshape, ToDevice, Where
from handgrad.ops.softmax import LogSoftmax, Softmax


def _infer_array(data: Any, dtype: Any, device: Any = None) -> Any:
    """Convert ``data`` to a backend array on ``device`` (where the data lives if None);
    Python floats default to float32, ints to int64."""
    if isinstance(data, Tensor):
        data = data.data
    if device is not None:
        arr = _infer_array(data, dtype)
        return to_device(arr, device)
    xp = B.get_array_module(data)
    if dtype is not None:
        dtype = B.to_dtype(dtype)
        return xp.array(data, dtype=dtype)
    if B.has_dtype(data):
        arr = xp.array(data)
    else:
        arr = xp.array(data)
        if arr.dtype == B.float64:
            arr = arr.astype(B.default_float)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(B.default_int)
    if arr.dtype.kind in "US" or arr.dtype == object:
        raise TypeError(f"cannot make a tensor from data of dtype {arr.dtype}")
    B.to_dtype(arr.dtype)  # raises on unsupported dtypes such as complex
    return arr


class Tensor:
    """An n-dimensional array that records the ops applied to it for ``backward()``."""

    __slots__ = ("data", "grad", "_requires_grad", "_ctx", "_grad_hooks", "__weakref__")
    __array_priority__ = 1000  # make ``ndarray * Tensor`` defer to Tensor.__rmul__

    def __init__(
        self, data: Any, dtype: Any = None, requires_grad: bool = False, device: Any = None
    ) -> None:
        self.data = _infer_array(data, dtype, device)
        self.grad: Tensor | None = None
        self._ctx: Function | None = None
        self._requires_grad = False
        self.requires_grad = requires_grad

    @classmethod
    def _make(cls, array: Any, requires_grad: bool = False) -> Tensor:
        t = cls.__new__(cls)
        t.data, t.grad, t._ctx = array, None, None
        t._requires_grad = requires_grad
        return t

    # ---- basic properties
    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value and not B.is_floating(self.data.dtype):
            raise TypeError(
                f"only floating point tensors can require gradients; this tensor is "
                f"{B.dtype_name(self.data.dtype)} with shape {self.shape}"
            )
        self._requires_grad = bool(value)

    def requires_grad_(self, value: bool = True) -> Tensor:
        self.requires_grad = value
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> B.DType:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def device(self) -> device:
        """Where the data lives: ``device('cpu')`` or ``device('cuda', i)``."""
        return device_of(self.data)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def T(self) -> Tensor:
        return self.permute(*reversed(range(self.ndim)))

    def size(self, dim: int | None = None) -> tuple[int, ...] | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def item(self) -> float | int | bool:
        if self.data.size != 1:
            raise ValueError(
                f"item(): only one-element tensors can be converted, shape is {self.shape}"
            )
        return self.data.reshape(()).item()

    def numpy(self) -> B.HostArray:
        """The values as a NumPy array: the data itself on the CPU (shared memory, as
        torch's), a host copy of it on a GPU."""
        if self.requires_grad:
            raise RuntimeError("numpy(): call .detach() first on a tensor that requires grad")
        return B.to_numpy(self.data)

    def tolist(self) -> Any:
        return self.data.tolist()

    def detach(self) -> Tensor:
        return Tensor._make(self.data)

    def clone(self) -> Tensor:
        return self * 1 if self.requires_grad else Tensor._make(self.data.copy())

    def retain_grad(self) -> None:
        """Keep ``.grad`` on this non-leaf tensor after backward (leaves always keep it)."""
        if self._ctx is not None:
            self._ctx._retained = weakref.ref(self)

    def register_post_accumulate_grad_hook(self, hook: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``hook(self)`` once per backward that reaches this leaf, after ``.grad`` has
        received all of that backward's gradient (every use of the tensor summed). Not called
        by a backward that gives this tensor no gradient. As torch's; ``.remove()`` on the
        returned handle unregisters it."""
        return add_post_accumulate_grad_hook(self, hook)

    def __repr__(self) -> str:
        body = B.format_array(self.data)
        extra = f", dtype={B.dtype_name(self.dtype)}" if self.dtype != B.float32 else ""
        if self._ctx is not None:
            extra += f", grad_fn=<{type(self._ctx).__name__}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    def __bool__(self) -> bool:
        return bool(self.item())

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]

    # ---- dtype and device
    def to(self, *args: Any, **kwargs: Any) -> Tensor:
        """This tensor on another device and/or in another dtype, as torch's ``.to``:
        ``t.to('cuda')``, ``t.to(hg.bfloat16)``, ``t.to('cuda:1', 'bf16')``, ``t.to(other)``.
        Returns ``self`` when nothing changes; otherwise a copy that gradients flow through."""
        target, dtype = parse_to(args, kwargs)
        dtype = None if dtype is None else B.to_dtype(dtype)
        out = self
        # cast before the copy when it shrinks the data, so fewer bytes cross the bus
        if dtype is not None and dtype.itemsize < self.dtype.itemsize:
            out, dtype = out._cast(dtype), None
        if target is not None:
            out = out._move(target)
        return out if dtype is None else out._cast(dtype)

    def _cast(self, dtype: B.DType) -> Tensor:
        if dtype == self.dtype:
            return self
        if self.requires_grad and not B.is_floating(dtype):
            return Tensor._make(self.data.astype(dtype))
        return Cast.apply(self, dtype=dtype)

    def _move(self, target: device) -> Tensor:
        if is_on(self.data, target):
            return self
        return ToDevice.apply(self, target=target)

    def cuda(self, device: Any = None) -> Tensor:
        """This tensor on a CUDA GPU (``device``: its index or name; the current GPU if
        None)."""
        return self.to("cuda" if device is None else device)

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def float(self) -> Tensor:
        return self.to(B.float32)

    def double(self) -> Tensor:
        return self.to(B.float64)

    def bfloat16(self) -> Tensor:
        return self.to(B.bfloat16)

    def long(self) -> Tensor:
        return self.to(B.int64)

    # ---- autograd
    def backward(self, gradient: Tensor | Any | None = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * gradient into ``leaf.grad`` for every leaf that
        requires grad. ``gradient`` defaults to 1 for a one-element tensor."""
        if not self.requires_grad:
            raise RuntimeError(
                "backward(): this tensor does not require grad and has no graph "
                "(were its inputs created with requires_grad=True, outside no_grad()?)"
            )
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward(): grad can be implicitly created only for scalar outputs; "
                    f"this tensor has shape {self.shape}, pass gradient= of that shape"
                )
            g = B.get_array_module(self.data).ones(self.shape, dtype=B.compute_dtype(self.dtype))
        else:
            g = (
                to_device(gradient.data, self.device)
                if isinstance(gradient, Tensor)
                else _like(gradient, self.data)
            )
            if g.shape != self.shape:
                raise RuntimeError(
                    f"backward(): gradient has shape {g.shape} but the tensor has shape {self.shape}"
                )
            g = g.astype(B.compute_dtype(self.dtype), copy=False)
        run_backward(self, g, retain_graph)

    # ---- operator overloading
    def _other(self, other: Any) -> Tensor:
        if isinstance(other, Tensor):
            return other
        # Python and NumPy scalars take this tensor's dtype (no silent float64 promotion).
        if isinstance(other, B.SCALAR_TYPES):
            dtype = (
                self.dtype
                if B.is_floating(self.dtype) or isinstance(other, int | bool)
                else B.default_float
            )
            return Tensor._make(B.scalar_like(other, dtype, self.data))
        return Tensor(other)

    def __add__(self, o: Any) -> Tensor:
        return _binary(Add, self, self._other(o))

    def __radd__(self, o: Any) -> Tensor:
        return _binary(Add, self._other(o), self)

    def __sub__(self, o: Any) -> Tensor:
        return _binary(Sub, self, self._other(o))

    def __rsub__(self, o: Any) -> Tensor:
        return _binary(Sub, self._other(o), self)

    def __mul__(self, o: Any) -> Tensor:
        return _binary(Mul, self, self._other(o))

    def __rmul__(self, o: Any) -> Tensor:
        return _binary(Mul, self._other(o), self)

    def __truediv__(self, o: Any) -> Tensor:
        return _binary(Div, self, self._other(o))

    def __rtruediv__(self, o: Any) -> Tensor:
        return _binary(Div, self._other(o), self)

    def __pow__(self, o: Any) -> Tensor:
        return _binary(Pow, self, self._other(o))

    def __rpow__(self, o: Any) -> Tensor:
        return _binary(Pow, self._other(o), self)

    def __neg__(self) -> Tensor:
        return Neg.apply(self)

    def __matmul__(self, o: Any) -> Tensor:
        return MatMul.apply(self, self._other(o))

    def __rmatmul__(self, o: Any) -> Tensor:
        return MatMul.apply(self._other(o), self)

    def __getitem__(self, idx: Any) -> Tensor:
        return GetItem.apply(self, idx=_index_arrays(idx, self.data))

    def __setitem__(self, idx: Any, value: Any) -> None:
        if self.requires_grad and is_grad_enabled():
            raise RuntimeError(
                "in-place assignment to a tensor that requires grad; wrap it in handgrad.no_grad()"
            )
        value = value.data if isinstance(value, Tensor) else value
        if B.is_array(value) and getattr(value, "ndim", 0) > 0:
            value = to_device(value, self.device)  # CuPy refuses host arrays here
        self.data[_index_arrays(idx, self.data)] = value

    # comparisons give boolean tensors and are not differentiable
    def _cmp(self, o: Any, name: str) -> Tensor:
        fn = getattr(B.get_array_module(self.data), name)
        return Tensor._make(fn(self.data, self._other(o).data))

    def __eq__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self._cmp(o, "equal")

    def __ne__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self._cmp(o, "not_equal")

    def __lt__(self, o: Any) -> Tensor:
        return self._cmp(o, "less")

    def __le__(self, o: Any) -> Tensor:
        return self._cmp(o, "less_equal")

    def __gt__(self, o: Any) -> Tensor:
        return self._cmp(o, "greater")

    def __ge__(self, o: Any) -> Tensor:
        return self._cmp(o, "greater_equal")

    __hash__ = object.__hash__

    # ---- methods mirroring torch
    def exp(self) -> Tensor:
        return Exp.apply(self)

    def log(self) -> Tensor:
        return Log.apply(self)

    def sqrt(self) -> Tensor:
        return Sqrt.apply(self)

    def tanh(self) -> Tensor:
        return Tanh.apply(self)

    def sigmoid(self) -> Tensor:
        return Sigmoid.apply(self)

    def relu(self) -> Tensor:
        return Relu.apply(self)

    def abs(self) -> Tensor:
        return Abs.apply(self)

    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        return Sum.apply(self, axes=norm_axes(dim, self.ndim), keepdim=keepdim)

    def mean(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        if not B.is_floating(self.dtype):
            raise TypeError(
                f"mean(): needs a floating point tensor, got {B.dtype_name(self.dtype)}"
            )
        return Mean.apply(self, axes=norm_axes(dim, self.ndim), keepdim=keepdim)

    def max(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        """Maximum over ``dim`` (all dims if None). Returns values only (no indices)."""
        if self.data.size == 0:
            raise ValueError("max(): the tensor is empty")
        return Max.apply(self, axes=norm_axes(dim, self.ndim), keepdim=keepdim)

    def var(
        self,
        dim: int | Sequence[int] | None = None,
        keepdim: bool = False,
        unbiased: bool | None = None,
        correction: int | None = None,
    ) -> Tensor:
        """Variance with Bessel's correction by default (``correction=1``), as torch."""
        if correction is None:
            correction = 1 if unbiased is None or unbiased else 0
        return Var.apply(
            self, axes=norm_axes(dim, self.ndim), keepdim=keepdim, correction=correction
        )

    def argmax(self, dim: int | None = None, keepdim: bool = False) -> Tensor:
        if dim is None:
            xp = B.get_array_module(self.data)
            return Tensor._make(xp.asarray(self.data.argmax(), dtype=B.int64))
        return Tensor._make(self.data.argmax(axis=dim, keepdims=keepdim).astype(B.int64))

    def reshape(self, *shape: Any) -> Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        return Reshape.apply(self, shape=shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        if self.ndim == 0:
            return self.reshape(1)
        s, e = start_dim % self.ndim, end_dim % self.ndim
        return self.reshape(*self.shape[:s], -1, *self.shape[e + 1 :])

    def unsqueeze(self, dim: int) -> Tensor:
        dim = dim % (self.ndim + 1)
        return self.reshape(*self.shape[:dim], 1, *self.shape[dim:])

    def squeeze(self, dim: int | None = None) -> Tensor:
        if dim is None:
            return self.reshape(*(n for n in self.shape if n != 1))
        dim = dim % self.ndim
        if self.shape[dim] != 1:
            return self
        return self.reshape(*self.shape[:dim], *self.shape[dim + 1 :])

    def permute(self, *dims: Any) -> Tensor:
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], tuple | list) else dims
        return Permute.apply(self, dims=dims)

    def transpose(self, dim0: int, dim1: int) -> Tensor:
        dims = list(range(self.ndim))
        dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
        return Permute.apply(self, dims=tuple(dims))

    def expand(self, *shape: Any) -> Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        lead = len(shape) - self.ndim
        full = tuple(self.shape[i - lead] if n == -1 else n for i, n in enumerate(shape))
        return Expand.apply(self, shape=full)

    def contiguous(self) -> Tensor:
        return self

    def split(
        self, split_size_or_sections: int | Sequence[int], dim: int = 0
    ) -> tuple[Tensor, ...]:
        """Split along ``dim`` into chunks of ``split_size`` (the last may be smaller) or the
        given section sizes. Each piece is a slice, so its gradient flows back into place."""
        n = self.shape[dim]
        if isinstance(split_size_or_sections, int):
            step = split_size_or_sections
            sizes = [min(step, n - s) for s in range(0, n, step)]
        else:
            sizes = list(split_size_or_sections)
            if sum(sizes) != n:
                raise ValueError(
                    f"split: sections {sizes} sum to {sum(sizes)}, but dim {dim} has size {n}"
                )
        pieces, start = [], 0
        lead = (slice(None),) * (dim % self.ndim)
        for size in sizes:
            pieces.append(self[(*lead, slice(start, start + size))])
            start += size
        return tuple(pieces)

    def chunk(self, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
        n = self.shape[dim]
        return self.split(-(-n // chunks), dim)

    def where(self, condition: Tensor | Any, other: Tensor | Any) -> Tensor:
        """This tensor where ``condition`` is True, ``other`` elsewhere (as torch's
        ``torch.where(condition, self, other)``); ``condition`` must be boolean."""
        xp = B.get_array_module(self.data)
        cond = condition.data if isinstance(condition, Tensor) else xp.asarray(condition)
        if cond.dtype != B.bool_:
            raise TypeError(f"where: condition must be a bool tensor, got {cond.dtype}")
        return Where.apply(Tensor._make(cond), self, self._other(other))

    def masked_fill(self, mask: Tensor | Any, value: float) -> Tensor:
        """``value`` where ``mask`` is True, this tensor elsewhere; no gradient flows to the
        filled positions."""
        return self._other(value).where(mask, self)

    def softmax(self, dim: int = -1) -> Tensor:
        return Softmax.apply(self, dim=dim)

    def log_softmax(self, dim: int = -1) -> Tensor:
        return LogSoftmax.apply(self, dim=dim)

    def zero_(self) -> Tensor:
        self.data[...] = 0
        return self


def _binary(fn: type[Function], a: Tensor, b: Tensor) -> Tensor:
    """Apply a broadcasting binary op with torch's promotion for mixed integer/float inputs:
    the integer side takes the float side's dtype (NumPy would go to float64)."""
    fa, fb = B.is_floating(a.dtype), B.is_floating(b.dtype)
    if fa and not fb:
        b = Tensor._make(b.data.astype(a.dtype))
    elif fb and not fa:
        a = Tensor._make(a.data.astype(b.dtype))
    return fn.apply(a, b)


def _like(data: Any, like: Any) -> Any:
    """``data`` (a list, scalar or array) as an array on the device of ``like``."""
    if B.is_array(data):
        return to_device(data, device_of(like))
    return B.get_array_module(like).asarray(data)


def _index_arrays(idx: Any, like: Any) -> Any:
    """Unwrap Tensors used as indices (integer-array gather, boolean masks) and move index
    arrays to the device of ``like``, the indexed array; a list becomes an array there."""
    if isinstance(idx, Tensor):
        idx = idx.data
    if isinstance(idx, tuple):
        return tuple(_index_arrays(i, like) if not isinstance(i, slice) else i for i in idx)
    if isinstance(idx, list):
        return B.get_array_module(like).asarray(idx)
    if B.is_array(idx) and not isinstance(idx, B.SCALAR_TYPES):
        return to_device(idx, device_of(like))
    return idx


Function.output_type = Tensor  # op outputs and gradients are Tensors
