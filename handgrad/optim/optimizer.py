"""The ``Optimizer`` base class: parameter groups, per-parameter state, state dicts.

State-dict layout (what ``state_dict()`` returns and ``load_state_dict()`` takes), as torch's
with arrays (in the parameters' array namespace: NumPy on the host) and plain Python scalars
only, so it saves as safetensors + JSON::

    {
      "state": {                     # parameter index -> that parameter's state
        0: {"step": 10,                               # int
            "exp_avg": array, "exp_avg_sq": array,    # AdamW moments, the parameter's shape
            "master": array},                         # float32 copy of a 16-bit parameter
        1: {"momentum_buffer": array},                # SGD with momentum
        ...                                            # parameters never stepped have no entry
      },
      "param_groups": [              # one dict per group, options as JSON-able scalars/lists
        {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1e-08, "weight_decay": 0.1,
         "params": [0, 1, 2]},        # the indices of this group's parameters
        ...
      ],
    }

Parameters are numbered 0, 1, ... in the order the groups list them, so a state dict fits any
optimizer built over the same parameters in the same order. ``flatten_state_dict`` splits it
into ``{"state.<i>.<key>": NumPy array}`` (for safetensors) and a JSON-able remainder;
``unflatten_state_dict`` inverts that.

16-bit parameters (bfloat16/float16) are updated through a float32 master copy kept in the
state: the optimizer updates the master and writes its rounding back into the parameter, so
small updates accumulate instead of being rounded away every step. The master is made from
the parameter on its first step; if you later overwrite a 16-bit parameter (e.g. with
``model.load_state_dict``), load the matching optimizer state too (or build a new optimizer),
otherwise the next step continues from the old master.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from handgrad import backend as B
from handgrad.grad_mode import enable_grad
from handgrad.tensor import Tensor

_LOW_PRECISION = (B.bfloat16, B.float16)


class Optimizer:
    """Base class. Subclasses pass their default options to ``__init__``, may override
    ``_check_options`` and implement ``step``."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        # Keyed by the Parameter itself (Tensor hashes by identity), as torch.
        self.state: dict[Tensor, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        if isinstance(params, Tensor | dict):
            raise TypeError(
                f"{type(self).__name__}: params must be an iterable of Tensors or of dicts, "
                f"got a single {type(params).__name__} (wrap it in a list)"
            )
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if all(isinstance(g, dict) for g in groups):
            for group in groups:
                self.add_param_group(group)
        elif any(isinstance(g, dict) for g in groups):
            raise TypeError(
                f"{type(self).__name__}: params mixes dicts and Tensors; give either a list of "
                "Tensors or a list of parameter-group dicts"
            )
        else:
            self.add_param_group({"params": groups})
        if not any(g["params"] for g in self.param_groups):
            raise ValueError(f"{type(self).__name__} got an empty parameter list")

    # ---- groups
    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group: ``{'params': [...], <option>: value, ...}``; unset options take the
        defaults given to the constructor."""
        name = type(self).__name__
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{name}: a parameter group must be a dict with a 'params' key")
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{name}: params must be an ordered sequence, not a set")
        params = list(params)
        gi = len(self.param_groups)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{name}: parameter {i} of group {gi} is a {type(p).__name__}; "
                    "an optimizer can only optimize Tensors (handgrad.nn.Parameter)"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"{name}: parameter {i} of group {gi} (shape {p.shape}) does not require grad"
                )
            if not p.is_leaf:
                raise ValueError(
                    f"{name}: parameter {i} of group {gi} (shape {p.shape}) is not a leaf tensor"
                )
        unknown = sorted(set(group) - set(self.defaults) - {"params"})
        if unknown:
            raise ValueError(
                f"{name}: unknown option(s) {unknown} in parameter group {gi}; "
                f"valid options: {sorted(self.defaults)}"
            )
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in seen for p in params):
            raise ValueError(f"{name}: some parameters appear in more than one group (or twice)")
        full = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        self._check_options(full, gi)
        full["params"] = params
        self.param_groups.append(full)

    def _check_options(self, options: dict[str, Any], group_index: int) -> None:
        lr = options.get("lr")
        if lr is not None and not (isinstance(lr, int | float) and lr >= 0):
            raise ValueError(f"{type(self).__name__}: invalid lr {lr!r} in group {group_index}")
        wd = options.get("weight_decay", 0.0)
        if not (isinstance(wd, int | float) and wd >= 0):
            raise ValueError(
                f"{type(self).__name__}: invalid weight_decay {wd!r} in group {group_index}"
            )

    # ---- gradients and steps
    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.data[...] = 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        raise NotImplementedError

    def _closure_loss(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with enable_grad():
            return closure()

    @staticmethod
    def _state_dtype(p: Tensor) -> Any:
        """dtype of the optimizer's arrays for ``p``: float32 for 16-bit parameters."""
        return B.compute_dtype(p.dtype)

    def _weights(self, p: Tensor, state: dict[str, Any]) -> Any:
        """The C-contiguous array an update is applied to: ``p.data`` itself, or for a 16-bit
        parameter its float32 master copy (created from ``p`` on the first step)."""
        if not p.data.flags.c_contiguous:
            p.data = B.contiguous(p.data)
        if p.dtype in _LOW_PRECISION:
            if "master" not in state:
                state["master"] = B.copy_as(p.data, B.float32)
            return state["master"]
        return p.data

    @staticmethod
    def _grad(p: Tensor, dtype: Any) -> Any:
        return p.grad.data.astype(dtype, copy=False)

    # ---- state dict
    def _indexed_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (arrays are copies) in the layout described in the module docstring."""
        params = self._indexed_params()
        state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(params):
            if p in self.state:
                state[i] = {k: (v.copy() if B.is_array(v) else v) for k, v in self.state[p].items()}
        groups, start = [], 0
        for group in self.param_groups:
            options = {k: _to_json(v) for k, v in group.items() if k != "params"}
            n = len(group["params"])
            options["params"] = list(range(start, start + n))
            groups.append(options)
            start += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore options and state saved by ``state_dict()`` (arrays are copied in). Every
        check runs before anything changes, so a bad state dict leaves the optimizer as it was."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"{name}.load_state_dict: expected a dict with keys 'state' and 'param_groups', "
                f"got {keys}"
            )
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups
        ):
            raise ValueError(
                f"{name}.load_state_dict: 'param_groups' must be a list of dicts with a "
                "'params' list"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: the state dict has {len(saved_groups)} parameter "
                f"groups, this optimizer has {len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: group {gi} has {len(saved['params'])} parameters "
                    f"in the state dict but {len(group['params'])} in this optimizer"
                )
            unknown = sorted(set(saved) - set(self.defaults) - {"params"})
            if unknown:
                raise ValueError(
                    f"{name}.load_state_dict: group {gi} has unknown option(s) {unknown}"
                )
        params = self._indexed_params()
        new_state: dict[Tensor, dict[str, Any]] = {}
        for key, entry in state_dict["state"].items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{name}.load_state_dict: state key {key!r} is not a parameter index"
                ) from None
            if not 0 <= i < len(params):
                raise ValueError(
                    f"{name}.load_state_dict: state for parameter {i}, but there are only "
                    f"{len(params)} parameters"
                )
            if not isinstance(entry, dict):
                raise ValueError(
                    f"{name}.load_state_dict: state for parameter {i} is a "
                    f"{type(entry).__name__}, expected a dict"
                )
            p, restored = params[i], {}
            for k, v in entry.items():
                if isinstance(v, Tensor) or B.is_array(v):
                    arr = v.data if isinstance(v, Tensor) else v
                    if tuple(arr.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{name}.load_state_dict: state[{i}][{k!r}] has shape "
                            f"{tuple(arr.shape)}, but parameter {i} has shape {tuple(p.shape)}"
                        )
                    v = B.copy_as(arr, self._state_dtype(p), like=p.data)
                restored[k] = v
            new_state[p] = restored
        for saved, group in zip(saved_groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(self.defaults.get(k), tuple) else v
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(group):
                if k != "params":
                    lines.append(f"    {k}: {group[k]}")
        return "\n".join(lines) + "\n)"


def _to_json(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_to_json(x) for x in v]
    if B.is_scalar(v):  # a NumPy scalar (e.g. from a saved float64) -> a Python number
        return v.item()
    return v


# ----------------------------------------------------------------------------------------
# saving helpers


def flatten_state_dict(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an optimizer state dict into arrays ``{"state.<i>.<key>": ndarray}`` (write them
    with safetensors) and a JSON-able dict of everything else (write it with ``json``)."""
    arrays: dict[str, Any] = {}
    meta_state: dict[str, dict[str, Any]] = {}
    for i, entry in state_dict["state"].items():
        scalars = {}
        for k, v in entry.items():
            if B.is_array(v):
                arrays[f"state.{i}.{k}"] = B.to_host_contiguous(v)
            else:
                scalars[k] = _to_json(v)
        meta_state[str(i)] = scalars
    return arrays, {"state": meta_state, "param_groups": state_dict["param_groups"]}


def unflatten_state_dict(arrays: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_state_dict``."""
    state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in meta["state"].items()}
    for name, arr in arrays.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"unflatten_state_dict: unexpected array name {name!r}")
        state.setdefault(int(parts[1]), {})[parts[2]] = arr
    return {"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]}


def param_groups_for_weight_decay(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """GPT-2-style groups: matrices (2-D and up: Linear and Embedding weights) decay, vectors
    (biases, LayerNorm gains and shifts) do not. Returns
    ``[{'params': <ndim >= 2>, 'weight_decay': weight_decay}, {'params': <ndim < 2>,
    'weight_decay': 0.0}]``; shared parameters appear once."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": float(weight_decay)},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _is_probability(x: Any) -> bool:
    return isinstance(x, int | float) and 0.0 <= x < 1.0 and not math.isnan(x)
