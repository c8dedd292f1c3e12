"""ZeRO-1 (``[train] zero = 1`` under MPI): AdamW with its moments and fp32 master weights
sharded over the ranks.

Every rank holds the whole model and computes the gradient of its share of the batch, as in
plain data parallelism; the optimizer state is cut instead. All parameters are laid end to
end in one flat fp32 vector, padded to P x n elements (``FlatShards``, below);
rank r owns elements r*n .. (r+1)*n - 1 and keeps m and v of those only, 2n floats instead
of 2 x P x n (half of AdamW's state at P = 2). 16-bit parameters also need fp32 master
weights; those are sharded too (n more floats). float32 parameters are their own masters: the
update runs in place on this rank's pieces of them, as ``AdamW.step`` does. One step:

    g_r   = reduce_scatter(flat gradients)               rank r's slice of the summed gradient
    total = sqrt(all_reduce(sum(g_r^2)))                  the global norm (padding adds 0)
    g_r  *= min(1, clip / (total + 1e-6))                 clip_grad_norm_'s rule
    AdamW on (w_r, m_r, v_r) with g_r, each parameter's    decay only where the parameter's
      piece of the slice under its own group's options     group has it (2-D weights)
    params = all_gather(w_r)                              cast to each parameter's dtype
                                                          (w_r: the masters, or the pieces
                                                          of the float32 parameters)

The update is the same elementwise arithmetic as ``AdamW.step`` on the same summed
gradient, so only the norm's order of summation differs from plain data parallelism.

On a GPU (one MPI rank per GPU, ``nccl`` transport) the shards are CuPy arrays, the
collectives run over NCCL, and the step reads nothing back: the norm stays a 0-d device
array and the clip is a multiplication by min(coef, 1).

Checkpoints hold AdamW's own state dict: before a save every rank all-gathers m, v and the
masters, and rank 0 writes them per parameter, so the files are the same for any world
size and with or without ZeRO, and a run resumes from them either way. Only the writing rank
keeps the gathered vectors (``gather_state(dst=0)``), and only until ``state_dict()`` has
handed them to the checkpoint writer: two float32 copies of the model, three with masters.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.distributed import Transport
from handgrad.nn import Parameter
from handgrad.optim import AdamW
from handgrad.optim.adamw import _adamw_update

__all__ = ["FlatShards", "ZeroAdamW"]

# ZeRO-1's collectives: elements of each rank's shard per chunk (16 MiB of float32, a send
# buffer of P x 16 MiB). On GPT-2 124M at 2 ranks, 4M-element chunks reduce-scattered and
# gathered as fast as one whole-vector call; 1M-element ones were up to 1.5x slower.
DEFAULT_CHUNK_ELEMS = 1 << 22


class ZeroAdamW:
    """``optimizer``'s param groups, options and state (an ``AdamW``, fresh or restored),
    the state sharded over ``group``. Offers what the trainer uses of AdamW: ``param_groups``,
    ``step``, ``zero_grad``, ``state_dict`` (after ``gather_state``), ``load_state_dict``,
    plus ``reduce_and_clip``, which the step needs first."""

    def __init__(self, optimizer: AdamW, group: Transport) -> None:
        self.optimizer, self.group = optimizer, group
        self.param_groups = optimizer.param_groups
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.shards = FlatShards(self.params, group)
        lo, hi = self.shards.shard_range()
        # (group, parameter index, slice of the shard, slice of the parameter's flat data)
        self.pieces: list[tuple[dict[str, Any], int, slice, slice]] = []
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                start = self.shards.offsets[i]
                a, b = max(lo, start), min(hi, start + p.data.size)
                if a < b:
                    self.pieces.append((g, i, slice(a - lo, b - lo), slice(a - start, b - start)))
                i += 1
        # fp32 masters only for parameters stored in another dtype (bfloat16); float32
        # parameters are updated in place, and their updated pieces are sent to the gather
        # from the gradient shard's buffer (each piece's gradient is used up by then)
        self.keeps_masters = any(
            p.data.dtype != self.shards.dtype or not p.data.flags.c_contiguous for p in self.params
        )
        n, dtype = self.shards.shard_size, self.shards.dtype
        # the state lives where the parameters do (NumPy, or CuPy on a GPU)
        self.xp = xp = B.get_array_module(*(p.data for p in self.params))
        self.master: Any = self.shards.parameter_shard() if self.keeps_masters else None
        self.exp_avg = xp.zeros(n, dtype=dtype)
        self.exp_avg_sq = xp.zeros(n, dtype=dtype)
        self.steps = 0
        self._grad: Any = None
        self._tmp = xp.empty(min(n, 1 << 15), dtype=dtype)
        self._gathered: dict[str, Any] | None = None
        self._gathered_at: int | None = None  # gather_state()'s dst
        if optimizer.state:  # an AdamW restored from a checkpoint: keep this rank's slice
            self._take_state()

    def reduce_and_clip(self, max_norm: float) -> Any:
        """This rank's slice of the summed gradient, clipped to a global norm of
        ``max_norm`` (inf: no clipping); returns the norm before clipping (every rank): a
        float on the CPU, a 0-d array on a GPU, where nothing is read back."""
        self._grad = self.shards.reduce_scatter_gradients("sum")
        if not B.is_numpy(self.xp):
            return self._clip_on_device(max_norm)
        # sum of squares in float64, a chunk at a time: a float64 copy of the whole shard
        # would cost twice the shard's own memory at once
        sumsq = np.zeros(1)
        for start in range(0, self._grad.size, 1 << 20):
            chunk = self._grad[start : start + (1 << 20)].astype(np.float64)
            sumsq[0] += np.dot(chunk, chunk)
        self.group.all_reduce(sumsq)
        dtype = self._grad.dtype.type
        total = dtype(math.sqrt(sumsq[0]))
        clip_coef = dtype(max_norm) / (total + dtype(1e-6))
        if clip_coef < 1.0:
            self._grad *= clip_coef
        return float(total)

    def _clip_on_device(self, max_norm: float) -> Any:
        """``reduce_and_clip``'s arithmetic where the gradient lives: the same float64 sum
        of squares and float32 coefficient, with grad *= (coef if coef < 1 else 1) in place
        of the host's test (multiplying by 1 changes no bit; a nan norm leaves the gradient
        alone, as on the host, and the run stops at the loss it reads)."""
        xp, grad = self.xp, self._grad
        sumsq = xp.zeros(1, dtype=B.float64)
        for start in range(0, grad.size, 1 << 20):
            chunk = grad[start : start + (1 << 20)].astype(B.float64)
            sumsq += xp.dot(chunk, chunk)
        self.group.all_reduce(sumsq)
        dtype = grad.dtype.type
        total = xp.sqrt(sumsq[0]).astype(grad.dtype)
        clip_coef = dtype(max_norm) / (total + dtype(1e-6))
        clip_coef = xp.where(clip_coef < 1.0, clip_coef, dtype(1.0))  # minimum() keeps a nan
        grad *= clip_coef
        return total

    def step(self) -> None:
        """The AdamW update of this rank's slice, then every rank's parameters gathered."""
        if self._grad is None:
            raise RuntimeError("ZeroAdamW.step: call reduce_and_clip first")
        self.steps += 1
        for g, i, s, part in self.pieces:
            beta1, beta2 = g["betas"]
            w = self.master[s] if self.keeps_masters else self.params[i].data.reshape(-1)[part]
            _adamw_update(
                w, self._grad[s], self.exp_avg[s], self.exp_avg_sq[s],
                self._tmp, None, lr=g["lr"], beta1=beta1, beta2=beta2, eps=g["eps"],
                weight_decay=g["weight_decay"], step=self.steps,
            )  # fmt: skip
            if not self.keeps_masters:
                self._grad[s] = w
        # the padding past the last parameter holds gradient zeros: gathered, never read
        send = self.master if self.keeps_masters else self._grad
        self._grad, self._gathered = None, None
        self.shards.all_gather_parameters(send)

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: the moments' shards and the masters'."""
        arrays = [self.exp_avg, self.exp_avg_sq, self.master]
        return sum(a.nbytes for a in arrays if a is not None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    # ---- checkpoints: AdamW's layout, whole parameters
    def _gather(self, shard: Any, out: Any = None) -> Any:
        """Every rank's ``shard`` end to end (world x shard_size,), into ``out`` if given."""
        xp = self.xp
        n = self.shards.shard_size * self.group.world_size
        full = xp.empty(n, dtype=shard.dtype) if out is None else out
        self.group.all_gather(full, xp.ascontiguousarray(shard))
        return full

    def gather_state(self, dst: int | None = None) -> None:
        """Collective (every rank calls it): assemble AdamW's state dict for
        ``state_dict()``, on every rank (``dst`` None) or on rank ``dst`` only. The other
        ranks keep nothing: they gather m, v and the masters one after another into one
        scratch vector, dropped on return."""
        if dst is not None:
            self.group.check_rank(dst, "ZeroAdamW.gather_state")
        keep = dst is None or dst == self.group.rank
        self._gathered, self._gathered_at = None, dst
        sd = self.optimizer.state_dict()  # the groups and options; no state (never stepped)
        state: dict[int, dict[str, Any]] = {}
        if self.steps and not keep:
            scratch = None
            for shard in (self.exp_avg, self.exp_avg_sq, self.master):
                if shard is not None:  # the same collectives, in the same order, as below
                    scratch = self._gather(shard, scratch)
            return
        if self.steps:
            m, v = self._gather(self.exp_avg), self._gather(self.exp_avg_sq)
            w = self._gather(self.master) if self.keeps_masters else None
            # entries are views of the gathered vectors: copies would hold the whole state
            # twice while they are made
            for i, p in enumerate(self.params):
                o = self.shards.offsets[i]
                whole = slice(o, o + p.data.size)
                entry = {
                    "step": self.steps,
                    "exp_avg": m[whole].reshape(p.shape),
                    "exp_avg_sq": v[whole].reshape(p.shape),
                }
                if w is not None and p.data.dtype != w.dtype:  # 16-bit: fp32 masters
                    entry["master"] = w[whole].reshape(p.shape)
                state[i] = entry
        if keep:
            sd["state"] = state
            self._gathered = sd

    def state_dict(self) -> dict[str, Any]:
        """Hands over the state ``gather_state()`` assembled (three whole-model vectors):
        this optimizer keeps no reference, so they are freed as soon as the caller drops
        the dict, once the checkpoint is written. Each call needs its own
        ``gather_state()``."""
        if self._gathered is None:
            at, rank = self._gathered_at, self.group.rank
            where = f" (the last one kept it on rank {at} only)" if at not in (None, rank) else ""
            raise RuntimeError(
                "ZeroAdamW.state_dict: call gather_state() on every rank first, once per "
                f"state_dict(){where}"
            )
        sd, self._gathered = self._gathered, None
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """AdamW's state dict (from any world size, with or without ZeRO) into the shards."""
        self.optimizer.load_state_dict(state_dict)  # checks it; options into the groups
        self._take_state()

    def _take_state(self) -> None:
        """The wrapped AdamW's per-parameter state into this rank's shards; the full-size
        copies are dropped, so this rank keeps its slice only."""
        states = [self.optimizer.state.get(p) for p in self.params]
        steps = {int(s["step"]) for s in states if s}
        if len(steps) > 1:
            raise ValueError(f"ZeroAdamW: parameters at different steps {sorted(steps)}")
        self.steps = steps.pop() if steps else 0
        if self.keeps_masters:  # the parameters' values, unless the state has masters
            self.master = self.shards.parameter_shard()
        self.exp_avg[...], self.exp_avg_sq[...] = 0, 0
        for _, i, s, part in self.pieces:
            st = states[i]
            if not st:
                continue
            self.exp_avg[s] = self._here(st["exp_avg"], part)
            self.exp_avg_sq[s] = self._here(st["exp_avg_sq"], part)
            if "master" in st and self.keeps_masters:
                self.master[s] = self._here(st["master"], part)
        self.optimizer.state.clear()

    def _here(self, values: Any, part: slice) -> Any:
        """Flat elements ``part`` of a saved array, on this optimizer's device."""
        return self.xp.asarray(B.to_numpy(values).reshape(-1)[part])


# ----------------------------------------------------------------------------------------
# the flat vector of all parameters, cut into one shard per rank


class FlatShards:
    """ZeRO-1's view of ``params``: one flat float32 (compute dtype) vector of all their
    elements, padded with zeros to ``world_size`` x ``shard_size`` elements, of which rank r
    owns elements ``r * shard_size`` .. ``(r + 1) * shard_size - 1`` (``shard_range``).

    The flat vector is never built: the collectives run in chunks of ``chunk_elems``
    elements of each rank's shard. Chunk c of the reduce-scatter packs, for every rank r,
    flat elements ``r * n + c * k`` .. ``r * n + (c + 1) * k - 1`` (n = ``shard_size``,
    k = ``chunk_elems``, the last chunk shorter) straight from the parameters' gradients into
    one (P, k) send buffer, and reduce-scatters it into this rank's shard; the all-gather
    mirrors it, unpacking the gathered (P, k) buffer straight into the parameters. Memory
    beyond the gradient shard: one buffer of P x k elements, reused every step, and no
    collective sees more than P x k elements (Open MPI's reduce-scatter allocates a
    temporary of its whole input on rank 0). Every element is summed over the same ranks as
    with one whole-vector collective, so the results do not depend on ``chunk_elems``."""

    def __init__(
        self, params: Sequence[Parameter], group: Transport, chunk_elems: int | None = None
    ) -> None:
        self.params, self.group = list(params), group
        dtypes = {B.compute_dtype(p.dtype) for p in self.params}
        if len(dtypes) != 1:
            kinds = sorted(map(str, dtypes))
            raise ValueError(f"FlatShards: parameters must share one compute dtype, got {kinds}")
        chunk = DEFAULT_CHUNK_ELEMS if chunk_elems is None else chunk_elems
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"FlatShards: chunk_elems must be an integer >= 1, got {chunk!r}")
        self.xp = B.get_array_module(*(p.data for p in self.params))
        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.data.size
        self.numel = total
        self.shard_size = -(-total // group.world_size)
        self.chunk_elems = max(1, min(chunk, self.shard_size))
        (self.dtype,) = dtypes
        self._grad_shard = self.xp.empty(self.shard_size, dtype=self.dtype)
        self._buffer = self.xp.empty(self.chunk_elems * group.world_size, dtype=self.dtype)

    def shard_range(self, rank: int | None = None) -> tuple[int, int]:
        """Flat indices ``[lo, hi)`` of rank ``rank``'s shard (this rank's by default)."""
        r = self.group.rank if rank is None else rank
        return r * self.shard_size, (r + 1) * self.shard_size

    def _chunks(self) -> Any:
        """(start, stop) within a shard of each chunk, and the chunk's (P, k) buffer view."""
        P, n = self.group.world_size, self.shard_size
        for start in range(0, n, self.chunk_elems):
            stop = min(n, start + self.chunk_elems)
            yield start, stop, self._buffer[: P * (stop - start)].reshape(P, stop - start)

    def _pieces(self, lo: int, hi: int) -> Any:
        """(parameter index, [a, b) within the parameter's flat data, [a, b) within the flat
        range) for every parameter overlapping flat elements ``[lo, hi)``; elements past the
        last parameter (padding) belong to none."""
        i = max(0, bisect.bisect_right(self.offsets, lo) - 1)
        while i < len(self.params) and self.offsets[i] < hi:
            start = self.offsets[i]
            a, b = max(lo, start), min(hi, start + self.params[i].data.size)
            if a < b:
                yield i, a - start, b - start, a - lo, b - lo
            i += 1

    def _flat_copy(self, out: Any, lo: int, grads: bool) -> None:
        """``out`` (m,) <- flat elements ``[lo, lo + m)`` of the gradients (``grads``) or of
        the parameters; padding and missing gradients as zeros."""
        hi = lo + out.shape[0]
        if hi > self.numel:  # padding (only the last rank's shard has any)
            out[max(0, self.numel - lo) :] = 0
        for i, a, b, s, e in self._pieces(lo, min(hi, self.numel)):
            p = self.params[i]
            if grads:
                if p.grad is None:
                    out[s:e] = 0
                else:
                    out[s:e] = _flat(p.grad.data)[a:b]
            else:
                out[s:e] = _flat(p.data)[a:b]

    def reduce_scatter_gradients(self, op: str = "sum") -> Any:
        """This rank's shard (``shard_size``,) of the flat gradient, summed ("sum") or
        averaged ("avg") over ranks; a parameter without ``.grad`` counts as zeros. The
        array is reused by the next call."""
        if op not in ("sum", "avg"):
            raise ValueError(f"reduce_scatter_gradients: op must be 'sum' or 'avg', got {op!r}")
        n = self.shard_size
        for start, stop, send in self._chunks():
            for r in range(self.group.world_size):
                self._flat_copy(send[r], r * n + start, grads=True)
            self.group.reduce_scatter(self._grad_shard[start:stop], send)
        if op == "avg":
            self._grad_shard /= self.group.world_size
        return self._grad_shard

    def parameter_shard(self) -> Any:
        """A copy (``shard_size``,) of this rank's slice of the flat parameters, in the
        compute dtype (padding zeros)."""
        shard = self.xp.empty(self.shard_size, dtype=self.dtype)
        self._flat_copy(shard, self.shard_range()[0], grads=False)
        return shard

    def all_gather_parameters(self, shard: Any) -> None:
        """Every rank's parameters <- the concatenation of the ranks' ``shard`` (each
        ``(shard_size,)``), cast to each parameter's dtype, written in place."""
        if tuple(shard.shape) != (self.shard_size,):
            raise ValueError(
                f"all_gather_parameters: shard of shape {tuple(shard.shape)}, expected "
                f"({self.shard_size},)"
            )
        n = self.shard_size
        for start, stop, recv in self._chunks():
            piece = shard[start:stop]
            if piece.dtype != self.dtype or not piece.flags.c_contiguous:
                piece = self.xp.ascontiguousarray(piece, dtype=self.dtype)
            self.group.all_gather(recv, piece)
            for r in range(self.group.world_size):
                lo = r * n + start
                for i, a, b, s, e in self._pieces(lo, min(lo + stop - start, self.numel)):
                    p = self.params[i]
                    _flat(p.data)[a:b] = recv[r, s:e].astype(p.dtype, copy=False)


def _flat(array: Any) -> Any:
    """A 1-D view of ``array``'s elements in C order that slices read and write through:
    ``reshape(-1)`` where that is a view, NumPy's flat iterator otherwise (a strided array;
    ``reshape`` would copy it whole)."""
    return array.reshape(-1) if array.flags.c_contiguous else array.flat
