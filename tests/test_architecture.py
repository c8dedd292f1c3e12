"""The package's shape: no import circles, imports only go down the layers, and the compute
modules leave NumPy to the backend.

Imports are read with ``ast`` from every module of ``handgrad/``, function-level imports
included; imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "handgrad"

# Lowest first; a module may import its own layer or a lower one. A module's layer is found
# by its name under handgrad (``ops.shape`` -> "ops"); see ``layer_of``.
LAYERS = [
    # backend: the array namespace, devices, CUDA; kernels: array functions, no Tensor
    {"backend", "fileio", "manifest", "diskspace", "kernels"},
    {"tokenizer"},  # tokenizer/ and data/ never import the tensor library
    {"data"},
    {
        "grad_mode",
        "amp",
        "random",
        "function",
        "engine",
        "ops",
        "tensor",
        "creation",
        "serialization",
    },
    {"nn.functional"},  # nn's functions; Module and the layers built on them are "nn"
    {"nn", "optim", "distributed"},
    {"models", "checkpoint", "parallel"},  # parallel: the run modes (how a step is spread)
    {"train", "eval"},
    {"cli", "verify", "__main__"},
]
NN_BLOCKS = {"nn", "nn.module", "nn.layers", "nn.init", "nn.utils"}

# Compute modules work on arrays of any registered namespace (NumPy, CuPy), so they must not
# import NumPy; host code (files, tokenizers, data loading, metrics, sampling) may.
COMPUTE = {
    "grad_mode",
    "amp",
    "function",
    "engine",
    "ops",
    "tensor",
    "creation",
    "nn",
    "optim",
    "models",
}
HOST = {
    "backend", "fileio", "manifest", "diskspace", "kernels", "random", "verify", "serialization", "tokenizer", "data",
    "distributed", "parallel", "checkpoint", "train", "eval", "cli", "__main__",
}  # fmt: skip

# Compute modules with a host-side part that uses NumPy by name: GPT-2's sampling works on
# logits copied to the host (``sample_next``). Any other compute module importing NumPy fails.
PENDING = {
    "models.gpt2",
}
# Import circles tolerated: none.
PENDING_CIRCLES: set[str] = set()


@cache
def _modules() -> dict[str, Path]:
    """Module names relative to handgrad ("" for the package, "ops.shape", ...) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@cache
def _imported(path: Path, name: str) -> frozenset[str]:
    """Every absolute module name ``path`` imports (``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    package = ("handgrad." + name if name else "handgrad").split(".")
    if path.name != "__init__.py":
        package.pop()
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(out)


@cache
def _graph() -> dict[str, set[str]]:
    """handgrad's modules -> the handgrad modules each imports. Importing an ancestor package
    (``from handgrad import backend``) is no edge: the ancestor is loaded first anyway."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {t.removeprefix("handgrad").removeprefix(".") for t in _imported(path, name)}
        graph[name] = {
            t
            for t in targets
            if t in modules and t != name and not (t == "" or name.startswith(t + "."))
        }
    return graph


def _head(name: str, heads: set[str]) -> str | None:
    """The longest entry of ``heads`` that is ``name`` or a package above it."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in heads:
            return ".".join(parts[:n])
    return None


def layer_of(name: str) -> int:
    if name.split(".")[0] == "nn" and name not in NN_BLOCKS:
        name = "nn.functional"
    head = _head(name, set().union(*LAYERS))
    assert head is not None, f"handgrad.{name} has no layer: add it to LAYERS in {__file__}"
    return next(i for i, layer in enumerate(LAYERS) if head in layer)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import path per circle found by a depth-first search (a back edge closes one)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found = []

    def visit(v: str) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                found.append(path[path.index(w) :] + [w])
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


def test_no_import_circles() -> None:
    circles = [c for c in _circles(_graph()) if not all(_head(m, PENDING_CIRCLES) for m in c)]
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_imports_only_go_down_the_layers() -> None:
    upward = [
        f"handgrad.{m} imports handgrad.{t}"
        for m, targets in _graph().items()
        if m  # the package itself re-exports from every layer
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_compute_modules_do_not_import_numpy() -> None:
    offenders = []
    for name, path in _modules().items():
        if not name:
            continue
        kind = _head(name, COMPUTE | HOST)
        assert kind is not None, f"handgrad.{name}: add it to COMPUTE or HOST in {__file__}"
        if kind in COMPUTE and name not in PENDING:
            numpy = {i for i in _imported(path, name) if i.split(".")[0] == "numpy"}
            if numpy:
                offenders.append(f"handgrad.{name} imports {', '.join(sorted(numpy))}")
    assert not offenders, "compute modules importing NumPy:\n" + "\n".join(offenders)


# Only the transports and the run modes know ranks, process groups and ZeRO-1: everything
# else (the training loop, evaluation, the commands) asks its run mode.
RANK_AWARE = {"distributed", "parallel"}
RANK_ATTRIBUTES = {"rank", "world_size", "get_rank", "get_world_size", "zero"}
RANK_NAMES = {"world_size", "zero", "ZeroAdamW", "get_rank", "get_world_size"}


def _rank_tests(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, source) of every branch (if, while, conditional expression) on a rank, a world
    size, a process group being None or ZeRO, and of every use of a rank attribute. A bare
    name ``rank`` is left alone: BPE has merge ranks."""

    def about_ranks(node: ast.AST) -> bool:
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and n.attr in RANK_ATTRIBUTES:
                return True
            if isinstance(n, ast.Name) and n.id in RANK_NAMES:
                return True
            if isinstance(n, ast.Compare) and any(isinstance(o, ast.Is | ast.IsNot) for o in n.ops):
                side = n.left
                name = side.attr if isinstance(side, ast.Attribute) else getattr(side, "id", "")
                if name.endswith("group"):
                    return True
        return False

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.While | ast.IfExp) and about_ranks(node.test):
            found.append((node.test.lineno, ast.unparse(node.test)))
        elif isinstance(node, ast.Attribute) and node.attr in {"rank", "world_size"}:
            found.append((node.lineno, ast.unparse(node)))
    return sorted(set(found))


def test_only_the_run_modes_know_ranks_groups_and_zero() -> None:
    offenders = [
        f"handgrad/{path.relative_to(PACKAGE)}:{line}: {text}"
        for name, path in _modules().items()
        if name and _head(name, RANK_AWARE) is None
        for line, text in _rank_tests(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not offenders, "tests on ranks, groups or ZeRO outside the run modes:\n" + "\n".join(
        offenders
    )


def test_the_checks_see_what_they_check() -> None:
    # guards against a parser that finds nothing and so passes everything
    graph = _graph()
    assert "engine" in graph["tensor"] and "function" in graph["ops.shape"]
    assert "numpy" in _imported(PACKAGE / "backend" / "__init__.py", "backend")
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert layer_of("nn.functional") < layer_of("nn.layers") < layer_of("models.gpt2")
    sample = "if group is None or rank == 0:\n    pass\nx = a if t.zero else b\nn = g.world_size"
    assert [line for line, _ in _rank_tests(ast.parse(sample))] == [1, 3, 4]
    assert _rank_tests(ast.parse("if rank_of_merge < best:\n    pass")) == []
    assert _rank_tests(ast.parse((PACKAGE / "parallel" / "modes.py").read_text()))
