"""Gradients over ranks: flat buckets, reduced in place (data parallelism).

Data parallelism: every rank holds the whole model and the gradient of its share of the
batch; the step needs their sum (or mean). Reducing parameter by parameter pays a
collective's fixed cost per parameter (GPT-2 has ~150); packing all of them into one flat
buffer pays it once. Parameters are packed into buckets of at most ``bucket_bytes`` (25 MB,
PyTorch's default): small models reduce once, large ones in pieces.

Each parameter's gradient lives in its bucket, as with PyTorch DDP's
``gradient_as_bucket_view=True``: ``.grad`` is a view of the parameter's slice of the
bucket's flat buffer, so the reduction runs in place on the gradients themselves and no
second copy of them exists. Backward gives a parameter its first gradient of a step in a
new array; the parameter's post-accumulate-grad hook (``attach()``) copies it into the view
and makes the view the ``.grad``, and later micro batches add into the view in place
(``engine._accumulate``: ``grad.data += g``). A gradient set some other way, or reached
without the hooks, is copied into its view when its bucket is packed, and ``.grad`` becomes
the view from then on. A parameter without a gradient keeps ``.grad = None``; its slice of
the bucket is zeroed when the bucket is packed, and gets the view after the reduction only
where some rank had a gradient (``has_grad``). Consequently a ``.grad`` held across steps
is overwritten by the next step's gradient, as with PyTorch's option.

Buckets are laid out in reverse parameter order, the order in which backward finishes the
gradients (the last layers' first), so that the reduction can overlap backward, as PyTorch's
DistributedDataParallel does: ``arm(backwards=k)`` before the k backward passes of a step
(k micro batches), and each parameter's post-accumulate-grad hook counts it ready when it
fires for the k-th time, its gradient complete for the step (earlier micro batches only
accumulate, like DDP's ``no_sync``); once every parameter of bucket i is ready and buckets
0 .. i-1 have started, bucket i's non-blocking all-reduce is started, while backward goes on
computing earlier layers. After backward, ``flush()`` starts the buckets backward did not
complete (a parameter without a gradient counts as zeros) and ``wait()`` waits for them
all. Every rank starts the buckets in the same order, 0, 1, 2, ..., whatever order its hooks
fire in: MPI matches collectives by their order. Each bucket holds the same values and is
reduced by the same collective as in ``reduce()`` after backward, so both give the same
sums, bit for bit (with 2 ranks; with more, an MPI may sum in an order of its choosing).

Consecutive buckets of one dtype are slices of one storage array, so ``reduce()`` after
backward reduces all of them in one collective: over a network, one large MPI_Allreduce
moves the same bytes faster than several smaller ones (benchmarks/bench_hosts.py). The
overlapped buckets' in-place ``Iallreduce`` runs as a ring under Open MPI (the mpi
transport's ``OPEN_MPI_SETTINGS``): its default for an in-place buffer, a binomial tree,
reduces to one rank and broadcasts back, and got 69-81% of MPI_Allreduce's bandwidth between
two hosts where the ring gets 1.5-1.7 times it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from handgrad import backend as B
from handgrad.distributed.transport import Transport, Work, check_op
from handgrad.engine import RemovableHandle
from handgrad.nn import Parameter
from handgrad.tensor import Tensor

DEFAULT_BUCKET_BYTES = 25 << 20


class _Bucket:
    def __init__(self, dtype: Any, members: list[tuple[int, int, int]]) -> None:
        self.members = members  # (parameter index, offset, size)
        self.dtype, self.size = dtype, sum(size for _, _, size in members)
        self.flat: Any = None  # its slice of its run's storage


class GradientReducer:
    """Sums (or averages) every parameter's ``.grad`` over the ranks of ``group``, bucket by
    bucket: after backward (``reduce``), or overlapping it (``attach`` once, then per step
    ``arm``, backward, ``flush``, ``wait``). A parameter without a gradient counts as zeros.

    Every gradient ends up as a view of its bucket (``grad_view``): from backward's hooks
    once ``attach()`` has registered them, otherwise when its bucket is packed; the sums are
    written there in place. Buckets hold parameters of one gradient dtype (the compute dtype:
    float32 for float32 and bfloat16 parameters), consecutive in reverse ``params`` order; a
    parameter larger than ``bucket_bytes`` gets a bucket of its own. ``poll``: test the
    reductions in flight from every hook, which is what progresses them in an MPI without a
    progress thread."""

    def __init__(
        self,
        params: Sequence[Parameter],
        group: Transport,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        poll: bool = True,
    ) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.params, self.group, self.poll = list(params), group, poll
        xp = B.get_array_module(*(p.data for p in self.params))
        self.buckets: list[_Bucket] = []
        self._bucket_of = [0] * len(self.params)  # parameter index -> its bucket's index
        members: list[tuple[int, int, int]] = []
        dtype, used = None, 0
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            gdtype = B.compute_dtype(p.dtype)
            nbytes = p.data.size * gdtype.itemsize
            if members and (gdtype != dtype or used + nbytes > bucket_bytes):
                self.buckets.append(_Bucket(dtype, members))
                members, used = [], 0
            dtype = gdtype
            members.append((i, used // gdtype.itemsize, p.data.size))
            self._bucket_of[i] = len(self.buckets)
            used += nbytes
        if members:
            self.buckets.append(_Bucket(dtype, members))
        # consecutive buckets of one dtype share one storage, each its slice of it: reduce()
        # reduces a whole run at once (one large message moves faster over a network)
        self.runs: list[tuple[Any, list[_Bucket]]] = []
        for bucket in self.buckets:
            if not self.runs or self.runs[-1][1][0].dtype != bucket.dtype:
                self.runs.append((None, []))
            self.runs[-1][1].append(bucket)
        for k, (_, run) in enumerate(self.runs):
            storage = xp.zeros(sum(b.size for b in run), dtype=run[0].dtype)
            start = 0
            for bucket in run:
                bucket.flat = storage[start : start + bucket.size]
                start += bucket.size
            self.runs[k] = (storage, run)
        # parameter index -> its gradient's home: its slice of its bucket, in its shape
        self._views: list[Any] = [None] * len(self.params)
        for bucket in self.buckets:
            for i, offset, size in bucket.members:
                self._views[i] = bucket.flat[offset : offset + size].reshape(self.params[i].shape)
        # the overlapped reduction of one step; _op is None while not armed
        self._hooks: list[RemovableHandle] = []
        self._op: str | None = None
        self._fired: list[int] = []  # per parameter: its hook's calls since arm()
        self._backwards = 1
        self._missing: list[int] = []  # per bucket: its parameters not ready yet
        self._work: list[Work] = []  # of buckets 0 .. len(_work) - 1, started in order

    def grad_view(self, i: int) -> Any:
        """The array parameter ``i``'s gradient lives in: a view of its bucket, of the
        parameter's shape, in the compute dtype."""
        return self._views[i]

    def reduce(
        self, op: str = "sum", dst: int | None = None, has_grad: Sequence[bool] | None = None
    ) -> None:
        """Every parameter's ``.grad`` <- ``op`` ("sum" or "avg") over the ranks of its
        ``.grad``; on every rank (``dst`` None) or on rank ``dst`` only. On the receiving
        ranks a parameter gets a gradient (zeros where no rank had one) unless
        ``has_grad[i]`` is False; the other ranks' gradients keep their values."""
        _check_op(op)
        if dst is None:  # a run of buckets in one collective
            for storage, run in self.runs:
                for bucket in run:
                    self._pack(bucket)
                self.group.all_reduce(storage, op)
                for bucket in run:
                    self._unpack(bucket, has_grad)
            return
        for bucket in self.buckets:
            self._pack(bucket)
            self.group.reduce(bucket.flat, dst, op)
            if dst == self.group.rank:
                self._unpack(bucket, has_grad)

    # ---- overlapped with backward (every rank all-reduces)
    def attach(self) -> None:
        """Register the post-accumulate-grad hook of every parameter that requires grad
        (once): it moves the parameter's first gradient of a step into its bucket view, and
        after ``arm()`` counts the parameter ready."""
        if self._hooks:
            return
        for i, p in enumerate(self.params):
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def detach(self) -> None:
        """Remove the hooks ``attach()`` registered."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def arm(self, op: str = "sum", backwards: int = 1) -> None:
        """Start a step of ``backwards`` backward passes (micro batches): a parameter is
        ready, and its bucket may start, once the last of them has given its gradient."""
        if backwards < 1:
            raise ValueError(f"GradientReducer.arm: backwards must be >= 1, got {backwards}")
        self._op, self._backwards = _check_op(op), backwards
        self._fired = [0] * len(self.params)
        self._missing = [len(b.members) for b in self.buckets]
        self._work = []

    def flush(self, op: str = "sum") -> None:
        """Start every bucket not started yet, in order (zeros for a parameter without a
        gradient; arming first if ``arm()`` was not called). Call it on every rank before
        any other collective, so that every rank starts the same collectives in the same
        order: some may have stopped early (a non-finite loss) and started fewer."""
        if self._op is None:
            self.arm(op)
        while len(self._work) < len(self.buckets):
            self._start()

    def wait(self, has_grad: Sequence[bool] | None = None) -> None:
        """After ``flush()``: wait for every bucket; each ``.grad`` then holds the sum (a
        gradient of zeros where no rank had one, unless ``has_grad[i]`` is False: ``None``
        stays ``None``)."""
        if self._op is None or len(self._work) < len(self.buckets):
            raise RuntimeError("GradientReducer.wait(): call flush() first")
        for bucket, work in zip(self.buckets, self._work):
            work.wait()
            self._unpack(bucket, has_grad)
        self._op, self._work = None, []

    def _hook(self, i: int) -> Any:
        def ready(_: Tensor) -> None:
            armed = self._op is not None  # else a backward outside an overlapped step
            if armed:
                # checked before the gradient moves: its bucket may be in flight
                self._fired[i] += 1
                if self._fired[i] > self._backwards:
                    raise RuntimeError(
                        f"GradientReducer: parameter {i} (shape {tuple(self.params[i].shape)}) "
                        f"got a gradient from more than the {self._backwards} backward passes "
                        "of arm(); its bucket may be reducing already"
                    )
                if self._bucket_of[i] < len(self._work):  # flush() sent it without this one
                    raise RuntimeError(
                        f"GradientReducer: parameter {i} (shape {tuple(self.params[i].shape)}) "
                        "got its gradient after flush() had started its bucket"
                    )
            self._into_view(i)
            if not armed or self._fired[i] < self._backwards:  # earlier micro batches accumulate
                return
            self._missing[self._bucket_of[i]] -= 1
            # bucket k starts only after buckets < k: the same order on every rank
            while len(self._work) < len(self.buckets) and not self._missing[len(self._work)]:
                self._start()
            if self.poll:
                for work in self._work:
                    work.test()

        return ready

    def _start(self) -> None:
        bucket = self.buckets[len(self._work)]
        self._pack(bucket)
        self._work.append(self.group.all_reduce_async(bucket.flat, self._op))

    # ---- gradients in their buckets
    def _into_view(self, i: int) -> None:
        """Make parameter ``i``'s ``.grad`` its bucket view (copying the values in), unless
        it is already or has no gradient."""
        p, view = self.params[i], self._views[i]
        grad = p.grad
        if grad is None or grad.data is view:
            return
        if tuple(grad.shape) != tuple(p.shape):
            raise ValueError(
                f"GradientReducer: parameter {i} of shape {tuple(p.shape)} has a .grad of "
                f"shape {tuple(grad.shape)}"
            )
        view[...] = grad.data
        p.grad = Tensor._make(view)

    def _pack(self, bucket: _Bucket) -> None:
        """Bucket ``bucket`` <- the gradients (zeros where there is none); afterwards every
        ``.grad`` of the bucket is a view of it."""
        for i, _, _ in bucket.members:
            if self.params[i].grad is None:
                self._views[i][...] = 0
            else:
                self._into_view(i)

    def _unpack(self, bucket: _Bucket, has_grad: Sequence[bool] | None) -> None:
        """The reduced bucket's parameters without a gradient get their view (the sum of
        the ranks' gradients; zeros if none had one), unless ``has_grad[i]`` is False."""
        for i, _, _ in bucket.members:
            if has_grad is not None and not has_grad[i]:
                continue
            p, view = self.params[i], self._views[i]
            if p.grad is None:
                p.grad = Tensor._make(view)
            elif p.grad.data is not view:  # replaced while the bucket was in flight
                p.grad.data[...] = view


def _check_op(op: str) -> str:
    if check_op(op) == "max":
        raise ValueError("GradientReducer: op must be 'sum' or 'avg', got 'max'")
    return op
