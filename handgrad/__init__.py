"""handgrad: a deep learning library written by hand in NumPy, to train and evaluate GPT-2.

The public API mirrors PyTorch's so that what you know carries over::

    import handgrad as hg
    import handgrad.nn.functional as F

    x = hg.randn(4, 3, requires_grad=True)
    loss = F.cross_entropy(x, hg.tensor([0, 2, 1, 0]))
    loss.backward()
"""

from handgrad.backend import (
    bfloat16,
    bool_,
    float16,
    float32,
    float64,
    get_num_threads,
    int32,
    int64,
    set_num_threads,
    uint8,
    uint16,
    uint32,
)
from handgrad.serialization import load, save
from handgrad.tensor import (
    Function,
    Tensor,
    arange,
    cat,
    empty,
    enable_grad,
    exp,
    full,
    get_rng_state,
    is_grad_enabled,
    log,
    manual_seed,
    masked_fill,
    matmul,
    no_grad,
    ones,
    ones_like,
    rand,
    randn,
    relu,
    set_rng_state,
    split,
    sqrt,
    stack,
    tanh,
    tensor,
    where,
    zeros,
    zeros_like,
)

__version__ = "0.1.0"

__all__ = [
    "Function",
    "Tensor",
    "get_num_threads",
    "set_num_threads",
    "arange",
    "bfloat16",
    "bool_",
    "cat",
    "empty",
    "enable_grad",
    "exp",
    "float16",
    "float32",
    "float64",
    "full",
    "get_rng_state",
    "int32",
    "int64",
    "is_grad_enabled",
    "load",
    "log",
    "manual_seed",
    "masked_fill",
    "matmul",
    "no_grad",
    "ones",
    "ones_like",
    "rand",
    "randn",
    "relu",
    "save",
    "set_rng_state",
    "split",
    "sqrt",
    "stack",
    "tanh",
    "tensor",
    "uint8",
    "uint16",
    "uint32",
    "where",
    "zeros",
    "zeros_like",
]
