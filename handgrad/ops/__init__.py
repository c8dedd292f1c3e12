"""The primitive differentiable ops, each a ``Function`` with its derivative beside it.

Grouped by kind: ``elementwise`` (arithmetic with broadcasting, unary maps, casts),
``matmul``, ``reduce`` (sum, mean, max, var), ``shape`` (reshape, permute, expand, indexing,
cat, stack, where, copies between devices) and ``softmax``. Ops work on arrays and take their
array namespace from them (``handgrad.backend.get_array_module``); ``Tensor``'s methods call
them.
"""
