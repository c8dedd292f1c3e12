"""Shape and indexing ops: pure data movement, so gradients are moved back the same way.

Reshape, Permute, Expand, GetItem, Cat, Stack and ToDevice are ``native``: they work in any
dtype, 16-bit floats included, without a float32 round trip. Where selects between two
inputs; ToDevice copies between devices (CPU and GPU), its gradient copied the other way.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

from handgrad import backend as B
from handgrad.backend.device import device_of, to_device
from handgrad.engine import SliceGrad
from handgrad.function import Function, unbroadcast


class Reshape(Function):
    # out = a viewed with a new shape  =>  da = g viewed with the old shape
    native = True

    def forward(self, a, shape):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(
                f"reshape: cannot view shape {a.shape} ({a.size} elements) as {tuple(shape)}"
            ) from None

    def backward(self, g):
        return (g.reshape(self.shape),)


class Permute(Function):
    # out = a with axes reordered by p  =>  da = g with axes reordered by p^-1
    native = True

    def forward(self, a, dims):
        p = [d % a.ndim for d in dims]
        if sorted(p) != list(range(a.ndim)):
            raise ValueError(f"permute: {tuple(dims)} is not a permutation of {a.ndim} dims")
        self.inverse = tuple(sorted(range(len(p)), key=p.__getitem__))  # argsort(p) = p^-1
        return a.transpose(dims)

    def backward(self, g):
        return (g.transpose(self.inverse),)


class Expand(Function):
    # out = a broadcast to a bigger shape  =>  da = g summed over the broadcast axes
    native = True

    def forward(self, a, shape):
        self.shape = a.shape
        return B.get_array_module(a).broadcast_to(a, shape)

    def backward(self, g):
        return (unbroadcast(g, self.shape),)


class GetItem(Function):
    # out = a[idx]  =>  da = zeros like a, with g scattered back at idx; a scatter-add
    # accumulates when an integer index repeats (a gather's adjoint is a scatter-add)
    native = True

    def forward(self, a, idx):
        self.shape, self.dtype, self.idx = a.shape, a.dtype, idx
        return a[idx]

    def backward(self, g):
        if _is_basic_index(self.idx):
            # a slice's gradient is g placed at idx and zero elsewhere; the engine adds it
            # into the input's gradient buffer in place (split/chunk would otherwise make
            # one full-size zero array per piece)
            return (SliceGrad(self.shape, self.idx, g),)
        da = B.get_array_module(g).zeros(self.shape, dtype=g.dtype)
        B.scatter_add(da, self.idx, g)
        return (da,)


def _is_basic_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items)


class Cat(Function):
    # out = [a_1; a_2; ...] along dim  =>  da_k = the slice of g where a_k sits
    native = True

    def forward(self, *arrays, dim):
        self.dim = dim
        self.bounds = list(accumulate(a.shape[dim] for a in arrays))[:-1]
        try:
            return B.get_array_module(*arrays).concatenate(arrays, axis=dim)
        except ValueError:
            shapes = [a.shape for a in arrays]
            raise ValueError(f"cat: shapes {shapes} differ outside dim {dim}") from None

    def backward(self, g):
        return tuple(B.get_array_module(g).split(g, self.bounds, axis=self.dim))


class Stack(Function):
    # out = stack of a_k along a new dim  =>  da_k = g[..., k, ...]
    native = True

    def forward(self, *arrays, dim):
        self.dim = dim
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"stack: all tensors need the same shape, got {[a.shape for a in arrays]}"
            )
        return B.get_array_module(*arrays).stack(arrays, axis=dim)

    def backward(self, g):
        return tuple(B.get_array_module(g).moveaxis(g, self.dim, 0))


class Where(Function):
    # out = cond ? a : b  =>  da = g * cond, db = g * (1 - cond)
    def forward(self, cond, a, b):
        self.cond, self.sa, self.sb = cond, a.shape, b.shape
        return B.get_array_module(cond, a, b).where(cond, a, b)

    def backward(self, g):
        xp = B.get_array_module(g)
        zero = xp.zeros((), dtype=g.dtype)
        da = (
            unbroadcast(xp.where(self.cond, g, zero), self.sa) if self.needs_input_grad[1] else None
        )
        db = (
            unbroadcast(xp.where(self.cond, zero, g), self.sb) if self.needs_input_grad[2] else None
        )
        return None, da, db


class ToDevice(Function):
    # out = a copied to another device  =>  da = g copied back to a's device
    native = True

    def forward(self, a, target):
        self.source = device_of(a)
        return to_device(a, target)

    def backward(self, g):
        return (to_device(g, self.source),)
