"""Fused GPU kernels and the NumPy references that define them.

``reference`` holds one NumPy function per kernel: what the kernel computes, written plainly,
and checked against PyTorch and handgrad's own ops on the CPU. ``cuda`` holds the same
computations as CUDA C (CuPy ``RawKernel``s), each checked against its reference on a GPU.
The CUDA half is untested on a GPU: the machines this was written on have none (every
source is compiled with nvcc by the tests when nvcc is present).
"""
