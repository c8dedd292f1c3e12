"""handgrad: a deep learning library written by hand in NumPy, to train and evaluate GPT-2.

The public API mirrors PyTorch's so that what you know carries over::

    import handgrad as hg
    import handgrad.nn.functional as F

    x = hg.randn(4, 3, requires_grad=True)
    loss = F.cross_entropy(x, hg.tensor([0, 2, 1, 0]))
    loss.backward()
"""

# nn and optim load with the package, so ``hg.nn.Linear`` and ``hg.optim.AdamW`` work after
# ``import handgrad as hg``, as ``torch.nn`` and ``torch.optim`` do
from handgrad import nn, optim
from handgrad.amp import autocast, get_autocast_dtype, is_autocast_enabled
from handgrad.backend import (
    bfloat16,
    bool_,
    cuda,
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
from handgrad.backend.device import device
from handgrad.creation import (
    arange,
    cat,
    empty,
    exp,
    from_numpy,
    full,
    load,
    log,
    masked_fill,
    matmul,
    ones,
    ones_like,
    rand,
    randn,
    relu,
    save,
    split,
    sqrt,
    stack,
    tanh,
    tensor,
    where,
    zeros,
    zeros_like,
)
from handgrad.function import Function
from handgrad.grad_mode import enable_grad, is_grad_enabled, no_grad
from handgrad.random import get_rng_state, manual_seed, set_rng_state
from handgrad.tensor import Tensor

__version__ = "0.1.0"

__all__ = [
    "Function",
    "Tensor",
    "get_num_threads",
    "set_num_threads",
    "arange",
    "autocast",
    "bfloat16",
    "bool_",
    "cat",
    "cuda",
    "device",
    "empty",
    "enable_grad",
    "exp",
    "float16",
    "float32",
    "float64",
    "from_numpy",
    "full",
    "get_autocast_dtype",
    "get_rng_state",
    "int32",
    "int64",
    "is_autocast_enabled",
    "is_grad_enabled",
    "load",
    "log",
    "manual_seed",
    "masked_fill",
    "matmul",
    "nn",
    "no_grad",
    "ones",
    "ones_like",
    "optim",
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
