"""Gradients over ranks: one flat buffer per bucket (data parallelism), and the flat
gradient / parameter shards ZeRO-1 needs.

Data parallelism: every rank holds the whole model and the gradient of its share of the
batch; the step needs their sum (or mean). Reducing parameter by parameter pays a
collective's fixed cost per parameter (GPT-2 has ~150); packing all of them into one flat
buffer pays it once. A model of billions of parameters would need a second copy of its
gradients to do that, so parameters are packed in order into buckets of at most
``bucket_bytes`` (25 MB, PyTorch's default): small models reduce once, large ones in pieces.

ZeRO-1 (optimizer state sharded over ranks): the flat gradient, padded to world x n elements,
is reduce-scattered, so rank r gets the summed gradient of flat elements r*n .. (r+1)*n - 1;
it steps the optimizer on that slice only, then the parameters are all-gathered back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from handgrad import backend as B
from handgrad.distributed.transport import Transport, check_op
from handgrad.nn import Parameter
from handgrad.tensor import Tensor

DEFAULT_BUCKET_BYTES = 25 << 20


class _Bucket:
    def __init__(self, xp: Any, dtype: Any, members: list[tuple[int, int, int]]) -> None:
        self.members = members  # (parameter index, offset, size)
        self.flat = xp.zeros(sum(size for _, _, size in members), dtype=dtype)


class GradientReducer:
    """Sums (or averages) every parameter's ``.grad`` over the ranks of ``group``, bucket by
    bucket. A parameter without a gradient counts as zeros.

    Buckets hold parameters of one gradient dtype (float32 for float32 and bfloat16
    parameters), consecutive in ``params`` order; a parameter larger than ``bucket_bytes``
    gets a bucket of its own."""

    def __init__(
        self,
        params: Sequence[Parameter],
        group: Transport,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.params, self.group = list(params), group
        xp = B.get_array_module(*(p.data for p in self.params)) if self.params else B.xp
        self.buckets: list[_Bucket] = []
        members: list[tuple[int, int, int]] = []
        dtype, used = None, 0
        for i, p in enumerate(self.params):
            gdtype = B.compute_dtype(p.dtype)
            nbytes = p.data.size * gdtype.itemsize
            if members and (gdtype != dtype or used + nbytes > bucket_bytes):
                self.buckets.append(_Bucket(xp, dtype, members))
                members, used = [], 0
            dtype = gdtype
            members.append((i, used // gdtype.itemsize, p.data.size))
            used += nbytes
        if members:
            self.buckets.append(_Bucket(xp, dtype, members))

    def reduce(
        self, op: str = "sum", dst: int | None = None, has_grad: Sequence[bool] | None = None
    ) -> None:
        """Every parameter's ``.grad`` <- ``op`` ("sum" or "avg") over the ranks of its
        ``.grad``; on every rank (``dst`` None) or on rank ``dst`` only. On the receiving
        ranks a parameter gets a gradient (zeros where no rank had one) unless
        ``has_grad[i]`` is False; the other ranks' gradients are left as they were."""
        if check_op(op) == "max":
            raise ValueError("GradientReducer: op must be 'sum' or 'avg', got 'max'")
        receives = dst is None or dst == self.group.rank
        for bucket in self.buckets:
            flat = bucket.flat
            for i, offset, size in bucket.members:
                grad = self.params[i].grad
                if grad is None:
                    flat[offset : offset + size] = 0
                else:
                    flat[offset : offset + size] = grad.data.reshape(-1)
            if dst is None:
                self.group.all_reduce(flat, op)
            else:
                self.group.reduce(flat, dst, op)
            if receives:
                for i, offset, size in bucket.members:
                    if has_grad is None or has_grad[i]:
                        _set_grad(self.params[i], flat[offset : offset + size])


def _set_grad(p: Parameter, values: Any) -> None:
    values = values.reshape(p.shape)
    if p.grad is None:
        p.grad = Tensor._make(values.copy())
    else:
        p.grad.data[...] = values


class FlatShards:
    """ZeRO-1's view of ``params``: one flat float32 (compute dtype) vector of all their
    elements, padded with zeros to ``world_size`` x ``shard_size`` elements, of which rank r
    owns elements ``r * shard_size`` .. ``(r + 1) * shard_size - 1`` (``shard_range``)."""

    def __init__(self, params: Sequence[Parameter], group: Transport) -> None:
        self.params, self.group = list(params), group
        dtypes = {B.compute_dtype(p.dtype) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(
                f"FlatShards: parameters must share one compute dtype, got {sorted(map(str, dtypes))}"
            )
        xp = B.get_array_module(*(p.data for p in self.params))
        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.data.size
        self.numel = total
        self.shard_size = -(-total // group.world_size)
        (self.dtype,) = dtypes
        self._grads = xp.zeros(self.shard_size * group.world_size, dtype=self.dtype)
        # the flat parameters share the flat gradients' buffer: a step reduce-scatters the
        # gradients out of it before the parameters are gathered into it, and neither is
        # needed across that point, so ZeRO-1 pays for one flat copy of the model, not two
        self._values = self._grads
        self._grad_shard = xp.zeros(self.shard_size, dtype=self.dtype)

    def shard_range(self, rank: int | None = None) -> tuple[int, int]:
        """Flat indices ``[lo, hi)`` of rank ``rank``'s shard (this rank's by default)."""
        r = self.group.rank if rank is None else rank
        return r * self.shard_size, (r + 1) * self.shard_size

    def reduce_scatter_gradients(self, op: str = "sum") -> Any:
        """This rank's shard (``shard_size``,) of the flat gradient, summed ("sum") or
        averaged ("avg") over ranks; a parameter without ``.grad`` counts as zeros."""
        if op not in ("sum", "avg"):
            raise ValueError(f"reduce_scatter_gradients: op must be 'sum' or 'avg', got {op!r}")
        for p, offset in zip(self.params, self.offsets):
            part = self._grads[offset : offset + p.data.size]
            if p.grad is None:
                part[...] = 0
            else:
                part[...] = p.grad.data.reshape(-1)
        self.group.reduce_scatter(self._grad_shard, self._grads)
        if op == "avg":
            self._grad_shard /= self.group.world_size
        return self._grad_shard

    def parameter_shard(self) -> Any:
        """A copy (``shard_size``,) of this rank's slice of the flat parameters."""
        for p, offset in zip(self.params, self.offsets):
            self._values[offset : offset + p.data.size] = p.data.reshape(-1)
        lo, hi = self.shard_range()
        return self._values[lo:hi].copy()

    def all_gather_parameters(self, shard: Any) -> None:
        """Every rank's parameters <- the concatenation of the ranks' ``shard`` (each
        ``(shard_size,)``), cast to each parameter's dtype, written in place."""
        if tuple(shard.shape) != (self.shard_size,):
            raise ValueError(
                f"all_gather_parameters: shard of shape {tuple(shard.shape)}, expected "
                f"({self.shard_size},)"
            )
        self.group.all_gather(self._values, shard.astype(self.dtype, copy=False))
        for p, offset in zip(self.params, self.offsets):
            values = self._values[offset : offset + p.data.size].reshape(p.shape)
            p.data[...] = values.astype(p.dtype, copy=False)
