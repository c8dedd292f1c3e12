"""``Parameter``, ``Module`` and the containers ``Sequential``, ``ModuleList``, ``ModuleDict``.

A ``Module`` owns three ordered name -> value tables, filled by plain attribute assignment
(``self.fc = Linear(...)``) exactly as in PyTorch:

- ``_parameters``: ``Parameter`` s, the tensors an optimizer updates;
- ``_buffers``: tensors that are state but not trained (e.g. a causal mask); a buffer
  registered with ``persistent=False`` is left out of ``state_dict()``;
- ``_modules``: child modules.

Walking these tables recursively gives dotted names (``transformer.h.0.attn.c_attn.weight``)
that are the keys of ``state_dict()`` and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from handgrad import backend as B
from handgrad.backend.device import parse_to, to_device
from handgrad.tensor import Tensor

# ----------------------------------------------------------------------------------------
# Parameter


class Parameter(Tensor):
    """A Tensor that is a module parameter: ``requires_grad=True`` by default, and assigning it
    as a module attribute registers it. Built from a Tensor it shares that tensor's array."""

    __slots__ = ()

    def __init__(self, data: Tensor | Any = None, requires_grad: bool = True) -> None:
        if data is None:
            data = B.asarray([], dtype=B.default_float)  # shape (0,)
        array = data.data if isinstance(data, Tensor) else Tensor(data).data
        self.data = array
        self.grad = None
        self._ctx = None
        self._requires_grad = False
        self.requires_grad = requires_grad

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


# ----------------------------------------------------------------------------------------
# Module


class _IncompatibleKeys(NamedTuple):
    """What ``load_state_dict`` returns (as torch): keys the model wanted but did not get, and
    keys it got but does not have."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _addindent(text: str, spaces: int) -> str:
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    return lines[0] + "\n" + "\n".join(" " * spaces + line for line in lines[1:])


class Module:
    """Base class of all layers and models. Subclasses call ``super().__init__()`` first, assign
    parameters / submodules as attributes, and implement ``forward``."""

    training: bool

    def __init__(self) -> None:
        # object.__setattr__ skips our own __setattr__, which needs these tables to exist.
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent_buffers", set())
        object.__setattr__(self, "_modules", {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward() method")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ---- registration
    def _tables(self) -> tuple[dict, dict, dict]:
        try:
            d = self.__dict__
            return d["_parameters"], d["_buffers"], d["_modules"]
        except KeyError:
            raise AttributeError(
                f"cannot assign module attributes before {type(self).__name__}.__init__() "
                "has called super().__init__()"
            ) from None

    def _forget(self, name: str) -> None:
        params, buffers, modules = self._tables()
        for table in (params, buffers, modules, self.__dict__):
            table.pop(name, None)
        self._non_persistent_buffers.discard(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Parameter):
            self._forget(name)
            self._tables()[0][name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._tables()[2][name] = value
        elif "_parameters" in self.__dict__ and name in self._parameters:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} as parameter {name!r} of "
                    f"{type(self).__name__} (a handgrad.nn.Parameter or None is expected)"
                )
            self._parameters[name] = None
        elif "_modules" in self.__dict__ and name in self._modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} as child module {name!r} of "
                    f"{type(self).__name__} (a Module or None is expected)"
                )
            self._modules[name] = None
        elif "_buffers" in self.__dict__ and name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"cannot assign {type(value).__name__} as buffer {name!r} of "
                    f"{type(self).__name__} (a Tensor or None is expected)"
                )
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, i.e. for registered names.
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if name in d.get(table, {}):
                del d[table][name]
                self._non_persistent_buffers.discard(name)
                return
        object.__delattr__(self, name)

    def _check_name(self, name: str, kind: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"{kind} name must be a non-empty string without '.', got {name!r}")
        params, buffers, modules = self._tables()
        registered = name in params or name in buffers or name in modules
        if hasattr(self, name) and not registered:
            raise KeyError(f"attribute {name!r} already exists on {type(self).__name__}")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        self._check_name(name, "parameter")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"cannot register {type(param).__name__} as parameter {name!r} "
                "(a handgrad.nn.Parameter or None is expected)"
            )
        self._forget(name)
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Register a non-trained tensor. ``persistent=False`` keeps it out of ``state_dict()``."""
        self._check_name(name, "buffer")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(
                f"cannot register {type(tensor).__name__} as buffer {name!r} (a Tensor is expected)"
            )
        self._forget(name)
        self._buffers[name] = tensor
        if not persistent:
            self._non_persistent_buffers.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        self._check_name(name, "module")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._forget(name)
        self._modules[name] = module

    register_module = add_module

    # ---- traversal
    def named_modules(
        self, memo: set[int] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Module]]:
        """This module and all below it, pre-order (a parent before its children)."""
        memo = set() if memo is None else memo
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is None:
                continue
            sub = f"{prefix}.{name}" if prefix else name
            yield from module.named_modules(memo, sub, remove_duplicate)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, Module]]:
        seen: set[int] = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def _named_members(self, table: str, prefix: str, recurse: bool, remove_duplicate: bool):
        seen: set[int] = set()
        modules = (
            self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
            if recurse
            else [(prefix, self)]
        )
        for mod_prefix, module in modules:
            for name, value in getattr(module, table).items():
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), value

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) pairs in registration order. A parameter shared by two
        modules (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is yielded once,
        under the first name it is reached by."""
        yield from self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        yield from self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def get_submodule(self, target: str) -> Module:
        module: Module = self
        for part in target.split(".") if target else []:
            child = module._modules.get(part)
            if child is None:
                raise AttributeError(
                    f"{type(module).__name__} has no submodule {part!r} ({target!r})"
                )
            module = child
        return module

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Call ``fn`` on every submodule (children first) and then on this module, as torch."""
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    # ---- state dict
    def _state_entries(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """Every (name, tensor) that belongs in a state dict, shared tensors under every name."""
        for name, p in self._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers:
                yield prefix + name, b
        for name, module in self._modules.items():
            if module is not None:
                yield from module._state_entries(f"{prefix}{name}.")

    def state_dict(self) -> dict[str, Tensor]:
        """Dotted name -> detached Tensor (sharing the parameter's array), parameters then
        persistent buffers of each module, depth first. As in torch, a tied parameter appears
        under each of its names."""
        return {name: t.detach() for name, t in self._state_entries()}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> _IncompatibleKeys:
        """Copy ``state_dict`` values (Tensors or NumPy arrays) into this module's parameters
        and buffers, in place (optimizers keep their references), cast to each one's dtype.

        Every problem is collected before anything is written, and reported in one error: keys
        missing from ``state_dict``, unexpected keys (both only when ``strict``) and shape
        mismatches (always). Returns ``(missing_keys, unexpected_keys)``.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"load_state_dict: expected a mapping of name -> array, got {type(state_dict).__name__}"
            )
        own = dict(self._state_entries())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors: list[str] = []
        arrays: dict[str, Any] = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            try:
                array = value.data if isinstance(value, Tensor) else B.asarray(value)
            except (TypeError, ValueError) as e:
                errors.append(f"value for {key!r} is not an array ({type(value).__name__}: {e})")
                continue
            if array.dtype.kind not in "biuf" and array.dtype != B.bfloat16:
                errors.append(f"value for {key!r} has non-numeric dtype {array.dtype}")
            elif tuple(array.shape) != tuple(target.shape):
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(array.shape)} "
                    f"from checkpoint, the shape in current model is {tuple(target.shape)}"
                )
            else:
                arrays[key] = array
        if strict:
            if missing:
                errors.insert(0, "Missing key(s) in state_dict: " + ", ".join(map(repr, missing)))
            if unexpected:
                errors.insert(
                    1 if missing else 0,
                    "Unexpected key(s) in state_dict: " + ", ".join(map(repr, unexpected)),
                )
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                + "\n\t".join(errors)
            )
        for key, array in arrays.items():
            target = own[key]
            target.data[...] = B.from_host(array, like=target.data).astype(target.dtype, copy=False)
        return _IncompatibleKeys(missing, unexpected)

    # ---- modes, grads, dtypes
    def train(self, mode: bool = True) -> Module:
        if not isinstance(mode, bool):
            raise ValueError(f"train(mode): mode must be a bool, got {mode!r}")
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.data[...] = 0

    def to(self, *args: Any, **kwargs: Any) -> Module:
        """Move parameters and buffers (and their grads) to a device and/or cast the floating
        point ones to a dtype, in place, as torch's ``Module.to``: ``m.to('cuda')``,
        ``m.to(hg.bfloat16)``, ``m.to('cuda:1', 'bf16')``. The Parameter objects stay the
        same (an optimizer built on them keeps working); only their arrays change."""
        target, dtype = parse_to(args, kwargs)
        if dtype is not None:
            dtype = B.to_dtype(dtype)
            if not B.is_floating(dtype):
                raise TypeError(
                    f"Module.to: only floating dtypes are allowed, got {B.dtype_name(dtype)}"
                )
        for t in [*self.parameters(), *self.buffers()]:
            if dtype is not None and B.is_floating(t.dtype) and t.dtype != dtype:
                t.data = t.data.astype(dtype)
                if t.grad is not None:
                    t.grad.data = t.grad.data.astype(B.compute_dtype(dtype))
            if target is not None:
                t.data = to_device(t.data, target)
                if t.grad is not None:
                    t.grad.data = to_device(t.grad.data, target)
        return self

    def cuda(self, device: Any = None) -> Module:
        """Parameters and buffers on a CUDA GPU (``device``: its index or name)."""
        return self.to("cuda" if device is None else device)

    def cpu(self) -> Module:
        return self.to("cpu")

    def float(self) -> Module:
        return self.to(B.float32)

    def double(self) -> Module:
        return self.to(B.float64)

    def bfloat16(self) -> Module:
        return self.to(B.bfloat16)

    def half(self) -> Module:
        return self.to(B.float16)

    # ---- printing
    def extra_repr(self) -> str:
        """One line of settings shown inside ``Name(...)``; subclasses override."""
        return ""

    def _get_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = [
            f"({name}): " + _addindent(repr(module), 2) for name, module in self._modules.items()
        ]
        lines = extra_lines + child_lines
        body = ""
        if lines:
            if len(extra_lines) == 1 and not child_lines:
                body = extra_lines[0]
            else:
                body = "\n  " + "\n  ".join(lines) + "\n"
        return f"{self._get_name()}({body})"


# ----------------------------------------------------------------------------------------
# containers


class Sequential(Module):
    """Modules called one after another: ``Sequential(a, b)(x) == b(a(x))``."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def forward(self, x: Any) -> Any:
        for module in self._modules.values():
            x = module(x)
        return x

    def __getitem__(self, idx: int | slice) -> Module:
        items = list(self._modules.values())
        if isinstance(idx, slice):
            return Sequential(*items[idx])
        return items[_check_index(idx, len(items), "Sequential")]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self


def _check_index(idx: int, n: int, kind: str) -> int:
    if not -n <= idx < n:
        raise IndexError(f"index {idx} is out of range for a {kind} of length {n}")
    return idx % n


class ModuleList(Module):
    """A list of modules whose parameters are registered (a plain Python list's are not)."""

    def __init__(self, modules: Iterable[Module] | None = None) -> None:
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def __getitem__(self, idx: int | slice) -> Any:
        items = list(self._modules.values())
        if isinstance(idx, slice):
            return ModuleList(items[idx])
        return items[_check_index(idx, len(items), "ModuleList")]

    def __setitem__(self, idx: int, module: Module) -> None:
        self.add_module(str(_check_index(idx, len(self), "ModuleList")), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> ModuleList:
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        for module in modules:
            self.append(module)
        return self

    def __repr__(self) -> str:
        # Runs of identical children print once, as torch does: "(0-11): 12 x Block(...)".
        reprs = [repr(m) for m in self]
        if not reprs:
            return self._get_name() + "()"
        runs: list[list[Any]] = []
        for i, r in enumerate(reprs):
            if runs and runs[-1][2] == r:
                runs[-1][1] = i
            else:
                runs.append([i, i, r])
        lines = []
        for start, end, r in runs:
            line = (
                f"({start}): {r}" if start == end else f"({start}-{end}): {end - start + 1} x {r}"
            )
            lines.append(_addindent(line, 2))
        return self._get_name() + "(\n  " + "\n  ".join(lines) + "\n)"


class ModuleDict(Module):
    """A dict of modules whose parameters are registered, keeping insertion order."""

    def __init__(self, modules: Mapping[str, Module] | None = None) -> None:
        super().__init__()
        if modules is not None:
            for name, module in modules.items():
                self[name] = module

    def __getitem__(self, key: str) -> Module:
        if key not in self._modules:
            raise KeyError(f"ModuleDict has no key {key!r}; keys: {list(self._modules)}")
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        self.add_module(key, module)

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def keys(self) -> Iterable[str]:
        return self._modules.keys()

    def values(self) -> Iterable[Module]:
        return self._modules.values()

    def items(self) -> Iterable[tuple[str, Module]]:
        return self._modules.items()
