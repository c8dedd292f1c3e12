"""Fused GPU kernels and the NumPy references that define them.

``reference`` holds one NumPy function per kernel: what the kernel computes, written plainly,
and checked against PyTorch and handgrad's own ops on the CPU. ``cuda`` holds the same
computations as CUDA C (CuPy ``RawKernel``s), each checked against its reference on a GPU
(``tests/kernels``; what has run where: docs/gpu.md).

``dispatch.cuda_kernels`` is the one test the fused ops of ``handgrad.nn`` (layer norm, tanh
GELU, cross entropy, embedding backward, causal softmax) and ``AdamW`` make before calling a
kernel: CuPy arrays, kernels switched on (``handgrad.backend.cuda.use_kernels``, env
``HANDGRAD_CUDA_KERNELS``), float32 data. Everywhere else their generic array code runs.
"""
