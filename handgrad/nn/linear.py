"""``linear`` and ``embedding``: the two ops that map tokens and features through a weight
matrix (an embedding lookup is a product with a one-hot matrix, done as a gather)."""

from __future__ import annotations

from handgrad import backend as B
from handgrad.backend import cuda, get_array_module
from handgrad.function import Function
from handgrad.kernels.dispatch import cuda_kernels, f32, i64
from handgrad.tensor import Tensor


class _Linear(Function):
    autocast = "lower"  # inside hg.autocast (handgrad.amp)

    # y = x W^T + b with x: (..., in), W: (out, in), b: (out,)
    # dx = g W;  dW = g^T x (summed over all leading dims);  db = sum of g over leading dims.
    # The leading dims are folded into one, so each product is a single 2-D GEMM (NumPy would
    # otherwise run one small GEMM per leading index).
    # bfloat16 x and W (autocast, or a bf16 model fed bf16) multiply as bfloat16
    # (``backend.matmul_bf16``: float32 accumulation; cuBLAS on a GPU, its float32 reference
    # on the CPU): y is rounded once to bfloat16, after the bias is added in float32. In
    # backward g is rounded to bfloat16 as the GEMMs' operand; dx and dW come out in float32,
    # the dtype of every 16-bit tensor's gradient here (torch rounds them to bfloat16 too).
    @classmethod
    def keeps_low_precision(cls, arrays):
        if not all(a.dtype == B.bfloat16 for a in arrays):
            return False
        xp = get_array_module(*arrays)
        return B.is_numpy(xp) or (cuda.is_cupy(xp) and cuda.bf16_matmul_enabled())

    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features (shape {x.shape}) but weight "
                f"expects {w.shape[1]} (shape {w.shape})"
            )
        self.lead = x.shape[:-1]
        self.x2, self.w = x.reshape(-1, x.shape[-1]), w
        self.on_gpu = not B.is_numpy(get_array_module(x))
        if w.dtype == B.bfloat16:  # keeps_low_precision: a bfloat16 product
            if b is None:
                y = B.matmul_bf16(self.x2, w.T)
            else:
                y = B.matmul_bf16(self.x2, w.T, out_dtype=B.float32)
                y += b.astype(B.float32)
                y = y.astype(B.bfloat16)
            return y.reshape(*self.lead, w.shape[0])
        if self.on_gpu:
            cuda.count_gemm(x.dtype, 2 * self.x2.shape[0] * w.shape[0] * w.shape[1])
        y = self.x2 @ w.T
        if b is not None:
            y += b
        return y.reshape(*self.lead, w.shape[0])

    def backward(self, g):
        x2, w = self.x2, self.w
        g2 = g.reshape(-1, g.shape[-1])
        dx = dw = None
        if w.dtype == B.bfloat16:
            gm = g2.astype(B.bfloat16, copy=False)  # the GEMM operand
            if self.needs_input_grad[0]:
                dx = B.matmul_bf16(gm, w, out_dtype=B.float32).reshape(*self.lead, w.shape[1])
            if self.needs_input_grad[1]:
                dw = B.matmul_bf16(gm.T, x2, out_dtype=B.float32)
        else:
            if self.on_gpu:  # dx and dW, each 2 m n k
                wanted = int(self.needs_input_grad[0]) + int(self.needs_input_grad[1])
                cuda.count_gemm(g2.dtype, wanted * 2 * g2.shape[0] * w.shape[0] * w.shape[1])
            if self.needs_input_grad[0]:
                dx = (g2 @ w).reshape(*self.lead, w.shape[1])
            if self.needs_input_grad[1]:
                dw = g2.T @ x2
        if len(self.needs_input_grad) == 3:
            db = (
                g2.sum(axis=0, dtype=B.compute_dtype(g2.dtype))
                if self.needs_input_grad[2]
                else None
            )
            return dx, dw, db
        return dx, dw


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = input @ weight.T + bias.  input (..., in), weight (out, in), bias (out,) -> (..., out)."""
    if bias is None:
        return _Linear.apply(input, weight)
    return _Linear.apply(input, weight, bias)


class _Embedding(Function):
    # y[i] = W[idx[i]] (a gather)  =>  dW[j] = sum of g[i] over all i with idx[i] == j
    # (its adjoint is a scatter-add). Backward sorts the rows of g by token id and sums each
    # run of equal ids with one reduceat: several times faster than np.add.at when ids repeat
    # (a small vocabulary), as fast when they do not, and the sums come in a fixed order.
    def forward(self, idx, w):
        if idx.dtype.kind not in "iu":
            raise TypeError(f"embedding: indices must be integers, got {idx.dtype}")
        # range-checked on the host only: on a GPU the check would wait for the device (an
        # out-of-range id there is the caller's bug, as in torch's CUDA embedding)
        host = B.is_numpy(get_array_module(idx))
        if host and idx.size and (idx.min() < 0 or idx.max() >= w.shape[0]):
            bad = int(idx.max() if idx.max() >= w.shape[0] else idx.min())
            raise IndexError(f"embedding: index {bad} out of range for {w.shape[0]} embeddings")
        self.idx, self.wshape = idx, w.shape
        return w[idx]

    def backward(self, g):
        kernels = cuda_kernels(g)
        if kernels is not None:  # a GPU: one atomic scatter-add kernel
            rows = f32(g).reshape(-1, self.wshape[1])
            return None, kernels.embedding_backward(i64(self.idx).reshape(-1), rows, self.wshape[0])
        xp = get_array_module(g)
        dw = xp.zeros(self.wshape, dtype=g.dtype)
        idx = self.idx.reshape(-1)
        if idx.size:
            order = xp.argsort(idx, kind="stable")
            ids = idx[order]
            starts = xp.flatnonzero(xp.concatenate((xp.ones(1, dtype=bool), ids[1:] != ids[:-1])))
            rows = g.reshape(-1, self.wshape[1])[order]
            dw[ids[starts]] = xp.add.reduceat(rows, starts, axis=0)
        return None, dw


def embedding(input: Tensor, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (num, dim) picked by integer ``input`` (...) -> (..., dim)."""
    return _Embedding.apply(input, weight)
