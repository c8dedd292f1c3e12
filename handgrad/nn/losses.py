"""Losses: ``cross_entropy`` (fused softmax + negative log-likelihood) and ``mse_loss``; and
``one_hot`` for class targets."""

from __future__ import annotations

from handgrad import backend as B
from handgrad.backend import get_array_module
from handgrad.function import Function
from handgrad.kernels.dispatch import cuda_kernels, f32, i64
from handgrad.tensor import Tensor


class _CrossEntropy(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # Rows x (N, C), targets t (N,), smoothing e, lse = log sum_c e^(x_c):
    #   loss_i = (1 - e) (lse - x_{t_i}) + e (lse - mean_c x_c)
    #   dloss_i/dx_ic = softmax(x_i)_c - (1 - e) [c == t_i] - e / C
    # Rows whose target is ignore_index contribute nothing. 'mean' divides by the number of
    # counted rows. Only the logits (by reference) and lse are kept for backward; softmax
    # is recomputed there, so no (N, C) temporary outlives the forward pass.
    # On a GPU with kernels on (no smoothing), one kernel per pass reads each row of logits
    # twice (forward: max, then sum of exp; backward: one read, one write). bfloat16 logits
    # (autocast) go to the fused classifier instead (llm.c's): loss and dlogits in one
    # kernel during forward, dlogits bfloat16, so no float32 (N, C) array is ever made;
    # backward multiplies them by the upstream gradient.
    @classmethod
    def keeps_low_precision(cls, arrays):
        return (
            arrays[0].dtype == B.bfloat16 and cuda_kernels(arrays[0], cast_16bit=True) is not None
        )

    def forward(self, x, target, ignore_index, reduction, label_smoothing):
        n, c = x.shape
        xp = get_array_module(x)
        self.fused = x.dtype == B.bfloat16 and label_smoothing == 0
        if self.fused:
            return self._fused_forward(xp, x, target, ignore_index, reduction)
        if x.dtype == B.bfloat16:  # kept, but smoothed: computed in float32 as usual
            x = x.astype(B.float32)
        self.kernels = cuda_kernels(x) if label_smoothing == 0 else None
        if self.kernels is not None:
            return self._cuda_forward(xp, x, target, ignore_index, reduction)
        valid = target != ignore_index
        safe_t = xp.where(valid, target, 0)
        # targets are range-checked and counted on the host only: on a GPU either would wait
        # for the device, so there the count stays a device array
        host = B.is_numpy(xp)
        if host and valid.any() and (safe_t.min() < 0 or safe_t.max() >= c):
            bad = safe_t[(safe_t < 0) | (safe_t >= c)][0]
            raise IndexError(f"cross_entropy: target {int(bad)} is out of bounds for {c} classes")
        m = x.max(axis=1, keepdims=True)
        e = x - m
        xp.exp(e, out=e)
        lse = (m[:, 0] + xp.log(e.sum(axis=1))).astype(x.dtype, copy=False)
        del e
        rows = xp.arange(n)
        loss = lse - x[rows, safe_t]
        if label_smoothing > 0:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(axis=1))
        loss = xp.where(valid, loss, 0).astype(x.dtype, copy=False)
        self.x, self.lse, self.t, self.valid = x, lse, safe_t, valid
        self.reduction, self.smoothing = reduction, label_smoothing
        self.count = int(valid.sum()) if host else valid.sum()
        if reduction == "none":
            return loss
        total = loss.sum(dtype=x.dtype)
        if reduction == "sum":
            return xp.asarray(total)
        # torch returns nan when every target is ignored (0 / 0); so do we
        with B.ignore_float_errors():
            if host:
                return xp.asarray(total / x.dtype.type(self.count))
            return (total / self.count.astype(x.dtype)).astype(x.dtype)

    def _cuda_forward(self, xp, x, target, ignore_index, reduction):
        """Per-row loss and lse from ``handgrad.kernels.cuda.cross_entropy_forward``; the
        reduction, as the generic path, stays on the device. A target
        out of range gives a NaN loss there instead of an IndexError (checking would wait
        for the device)."""
        self.x, self.t, self.ignore_index = f32(x), i64(target), ignore_index
        self.reduction = reduction
        loss, self.lse = self.kernels.cross_entropy_forward(
            self.x, self.t, x.shape[1], ignore_index
        )
        self.valid = self.t != ignore_index
        if reduction == "none":
            return loss
        total = loss.sum(dtype=B.float32)
        if reduction == "sum":
            return xp.asarray(total)
        self.count = self.valid.sum()
        with B.ignore_float_errors():  # nan when every target is ignored, as torch
            return (total / self.count.astype(B.float32)).astype(B.float32)

    def _fused_forward(self, xp, x, target, ignore_index, reduction):
        """Per-row losses and dlogits = softmax - onehot (times 1 / count for 'mean', the
        count computed on the device) from ``kernels.cuda.fused_classifier``."""
        kernels = cuda_kernels(x, cast_16bit=True)
        t = i64(target)
        count = (t != ignore_index).sum()
        scale = None
        if reduction == "mean":
            with B.ignore_float_errors():  # every target ignored: nan, as torch
                scale = (1 / count.astype(B.float32)).reshape(1)
        losses, self.dlogits = kernels.fused_classifier(x, t, x.shape[1], ignore_index, scale)
        self.reduction = reduction
        if reduction == "none":
            return losses
        total = losses.sum(dtype=B.float32)
        return total * scale[0] if reduction == "mean" else xp.asarray(total)

    def _cuda_backward(self, g):
        """dlogits from ``handgrad.kernels.cuda.cross_entropy_backward`` with the upstream
        gradient per row: g_n ('none'), g ('sum') or g / count ('mean')."""
        xp = get_array_module(self.x)
        n = self.x.shape[0]
        if self.reduction == "mean":
            g = g / xp.maximum(self.count, 1).astype(B.float32)
        dloss = xp.empty(n, dtype=B.float32)
        dloss[...] = g  # broadcasts a 0-d gradient over the rows
        d = self.kernels.cross_entropy_backward(
            self.x, self.lse, self.t, dloss, self.x.shape[1], self.ignore_index
        )
        return d, None

    def backward(self, g):
        if self.fused:  # dlogits times the upstream gradient, in place, kept bfloat16
            d = self.dlogits
            g = g[:, None] if self.reduction == "none" else g
            get_array_module(d).multiply(d, g, out=d)
            return d, None
        if self.kernels is not None:
            return self._cuda_backward(g)
        x, lse, t, valid = self.x, self.lse, self.t, self.valid
        n, c = x.shape
        xp = get_array_module(x)
        dx = x - lse[:, None]
        xp.exp(dx, out=dx)
        dx[xp.arange(n), t] -= 1 - self.smoothing
        if self.smoothing > 0:
            dx -= self.smoothing / c
        if self.reduction == "none":
            scale = (g * valid)[:, None]
        elif self.reduction == "sum":
            scale = (valid * g)[:, None]
        else:
            count = max(self.count, 1) if isinstance(self.count, int) else xp.maximum(self.count, 1)
            scale = (valid * (g / count))[:, None]
        dx *= scale.astype(dx.dtype, copy=False)
        return dx, None


def cross_entropy(
    input: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross entropy of logits against class indices, in one fused op.

    input (N, C) or (C,) or (N, C, d1, ...), as torch: the class axis is 1.
    target (N,) or () or (N, d1, ...) integer class indices.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"cross_entropy: target must hold integer class indices, got {target.dtype}"
        )
    x, t = input, target
    if x.ndim == 1:
        x, t = x.reshape(1, -1), t.reshape(1)
    elif x.ndim > 2:
        # (N, C, d...) -> (N * d..., C)
        perm = (0, *range(2, x.ndim), 1)
        x = x.permute(*perm).reshape(-1, x.shape[1])
        t = t.reshape(-1)
    expected = (input.shape[0],) + tuple(input.shape[2:]) if input.ndim > 1 else ()
    if tuple(target.shape) != expected:
        raise ValueError(
            f"cross_entropy: target shape {target.shape} does not match input shape "
            f"{input.shape} (expected target shape {expected})"
        )
    out = _CrossEntropy.apply(
        x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if reduction == "none":
        return out.reshape(*expected)
    return out


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"mse_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    d = input - target
    sq = d * d
    return sq.mean() if reduction == "mean" else sq.sum() if reduction == "sum" else sq


def one_hot(tensor: Tensor, num_classes: int) -> Tensor:
    idx = tensor.data
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        bad = int(idx.min() if idx.min() < 0 else idx.max())
        raise ValueError(f"one_hot: class values must be in [0, {num_classes}), got {bad}")
    xp = get_array_module(idx)
    return Tensor._make((idx[..., None] == xp.arange(num_classes)).astype(B.int64))
