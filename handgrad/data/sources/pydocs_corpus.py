"""Build the `pydocs` corpus: English prose that ships with every CPython, no download needed.

Documents, in a fixed order:
  1. one per topic of `pydoc_data.topics.topics` (the language reference pages `help()` shows);
  2. one per standard-library module: its docstring, then the docstrings of the public classes,
     methods and functions it defines (own docstrings only, so inherited text is not repeated).

Modules come from the sorted `sys.stdlib_module_names` plus their public submodules (sorted), minus
a deny list of modules with side effects on import (`antigravity` opens a browser, `this` prints,
GUIs, `__main__` entry points that run things) and a few without prose. Signatures are left out on
purpose: default values such as `object()` sentinels repr with memory addresses, which would make
the corpus differ between runs.

This file runs as a script in a fresh isolated interpreter (`python -I pydocs_corpus.py OUT.json`)
so that whatever importing the standard library does (threads, warnings, printing, changed global
state) cannot touch the process that prepares the data. It imports nothing from handgrad.
"""

import importlib
import inspect
import json
import pkgutil
import sys
import warnings

# Importing these has side effects, needs a display, runs code, or has no prose worth keeping.
DENY = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "distutils",
    "encodings",
    "ensurepip",
    "pydoc_data",
    "site",
}


def _module_names() -> list[str]:
    names: list[str] = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in DENY:
            continue
        names.append(top)
        spec = importlib.util.find_spec(top) if _safe_find(top) else None
        if spec is None or not spec.submodule_search_locations:
            continue
        sub = pkgutil.walk_packages(spec.submodule_search_locations, prefix=top + ".")
        for info in sorted(sub, key=lambda m: m.name):
            parts = info.name.split(".")
            if any(p.startswith("_") for p in parts[1:]) or "test" in parts or "tests" in parts:
                continue
            names.append(info.name)
    return names


def _safe_find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False


def _own_doc(obj: object) -> str | None:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def _module_document(name: str, module: object) -> str:
    parts = [f"Module {name}"]
    doc = _own_doc(module)
    if doc:
        parts.append(doc)
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            class_doc = _own_doc(obj)
            if class_doc:
                parts.append(f"class {name}.{attr}\n\n{class_doc}")
            for meth_name, meth in sorted(vars(obj).items()):
                if meth_name.startswith("_") and meth_name != "__init__":
                    continue
                if not callable(meth) and not isinstance(
                    meth, (property, classmethod, staticmethod)
                ):
                    continue
                meth_doc = _own_doc(meth)
                if meth_doc and meth_doc != class_doc:
                    parts.append(f"{name}.{attr}.{meth_name}\n\n{meth_doc}")
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            func_doc = _own_doc(obj)
            if func_doc:
                parts.append(f"function {name}.{attr}\n\n{func_doc}")
    return "\n\n".join(parts)


def build() -> list[dict]:
    """Return the documents as [{"title": ..., "text": ...}] in a fixed order."""
    from pydoc_data.topics import topics

    documents = [{"title": f"topic {key}", "text": topics[key]} for key in sorted(topics)]
    warnings.simplefilter("ignore")
    for name in _module_names():
        if name.endswith(".__main__"):
            continue
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: B036 - a module may even call sys.exit on import
            continue
        text = _module_document(name, module)
        if "\n" in text:  # more than the bare title line
            documents.append({"title": f"module {name}", "text": text})
    return documents


if __name__ == "__main__":
    docs = build()
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump({"python": sys.version, "documents": docs}, f, ensure_ascii=False)
