"""Matrix multiplication with NumPy's batched / broadcast semantics."""

from __future__ import annotations

from handgrad import backend as B
from handgrad.function import Function, unbroadcast


class MatMul(Function):
    """out = a @ b with NumPy's batched/broadcast semantics.

    For 2-D blocks: da = g @ b^T and db = a^T @ g; batch dimensions that were broadcast are
    summed. 1-D operands are promoted (a: (n,) -> (1, n); b: (n,) -> (n, 1)) and the added
    axis is removed again from the result and the gradient.
    """

    autocast = "lower"  # inside hg.autocast (handgrad.amp)

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(
                "matmul: both operands need at least one dimension (use * for scalars)"
            )
        self.a_shape, self.b_shape = a.shape, b.shape
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if a2.shape[-1] != b2.shape[-2]:
            raise ValueError(
                f"matmul: shapes {a.shape} and {b.shape} are not aligned "
                f"({a.shape[-1]} (dim -1 of the first) != {b2.shape[-2]} (dim -2 of the second))"
            )
        try:
            B.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except ValueError:
            raise ValueError(
                f"matmul: batch dimensions of {a.shape} and {b.shape} cannot be broadcast"
            ) from None
        self.a, self.b = a2, b2
        if b2.ndim == 2 and a2.ndim > 2:
            # (..., m, k) @ (k, n): one 2-D GEMM over the folded leading dims, not one per index
            out = (a2.reshape(-1, a2.shape[-1]) @ b2).reshape(*a2.shape[:-1], b2.shape[-1])
        else:
            out = a2 @ b2
        if a.ndim == 1:
            out = out[..., 0, :]
        if b.ndim == 1:
            out = out[..., 0]
        return out

    def backward(self, g):
        a, b = self.a, self.b
        xp = B.get_array_module(g, a, b)
        # undo the squeezes in reverse order (b's axis was removed last), so that the
        # 1-D @ 1-D case goes () -> (1,) -> (1, 1)
        if len(self.b_shape) == 1:
            g = xp.expand_dims(g, -1)
        if len(self.a_shape) == 1:
            g = xp.expand_dims(g, -2)
        da = db = None
        if self.needs_input_grad[0]:
            if b.ndim == 2 and a.ndim > 2:
                da = (g.reshape(-1, g.shape[-1]) @ b.T).reshape(a.shape)
            else:
                da = unbroadcast(g @ xp.swapaxes(b, -1, -2), a.shape)
            da = da.reshape(self.a_shape)
        if self.needs_input_grad[1]:
            if b.ndim == 2 and a.ndim > 2:
                # Shared weight (the Linear case): fold the batch into one GEMM instead of
                # materialising a per-batch (.., k, n) product and summing it.
                k, n = a.shape[-1], g.shape[-1]
                db = a.reshape(-1, k).T @ g.reshape(-1, n)
            else:
                db = unbroadcast(xp.swapaxes(a, -1, -2) @ g, b.shape)
            db = db.reshape(self.b_shape)
        return da, db
