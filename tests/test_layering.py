"""The package's structure, checked from the source: layers only import downwards, no import circles, and no
model name in the engine (models describe themselves by registry tags and class traits instead).

Imports are read with `ast` from every module, including the ones made inside functions (lazy imports
are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qgmil
from qgmil.models.registry import _ARCHITECTURES

PACKAGE = Path(qgmil.__file__).parent

#: each top-level module or subpackage of qgmil and its layer: a module may import its own layer or lower ones
LAYERS = {
    "__init__": 0, "atomic": 0, "locks": 0, "numbers": 0, "plotting": 0, "task_specs": 0,
    "layers": 1,
    "models": 2,
    "checkpoint": 3, "convert": 3,
    "data": 4,
    "runtime": 5,
    "extract": 6, "rundir": 6, "slurm": 6,
    "evaluate": 7, "tasks": 7,
    "explain": 8,
    "train": 9,
    "tune": 10,
    "bench": 11,
    "cli": 12, "__main__": 12,
}
ENGINE = ("train", "tune", "evaluate", "explain", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the qgmil modules (or packages) `path` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "qgmil"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "qgmil":
                target = node.module
            else:
                continue
            # `from . import x` / `from .pkg import mod`: x may be a module of its own, which is then what
            # is imported (the package's __init__ is already loading when its own module does this)
            modules = {f"{target}.{a.name}" for a in node.names if _path_of(f"{target}.{a.name}") is not None}
            found |= modules
            if len(modules) < len(node.names):
                found.add(target)
    return found - {name}


def _path_of(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert {_top(m) for m in GRAPH} <= set(LAYERS), "add the new top-level module to LAYERS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    up = sorted(t for t in GRAPH[module] if LAYERS[_top(t)] > LAYERS[_top(module)])
    assert not up, f"{module} (layer {_top(module)}) imports higher layers: {up}"


def test_no_import_circles():
    """No strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


NAME_CHECKS = ("startswith", "endswith", "fnmatch", "fnmatchcase", "filter")


def _string_constants(path: Path) -> list[tuple[int, str, str | None]]:
    """Every string literal of a module that is not a docstring: (line, text, how it is tested), where the
    test is "compare" (==, in) or "pattern" (an argument of startswith/endswith/fnmatch), else None."""
    tree = ast.parse(path.read_text())
    docstrings, tested = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
        if isinstance(node, ast.Compare):
            tested.update({id(n): "compare" for n in [node.left, *node.comparators]})
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in NAME_CHECKS:
                tested.update({id(n): "pattern" for n in ast.walk(node)})
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value, tested.get(id(node))))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            out.append((node.lineno, text, None))
    return out


@pytest.mark.parametrize("stage", ENGINE)
def test_no_model_name_in_the_engine(stage):
    """The engine reads traits and tags, never names: no registered model or architecture name appears in a
    string (a name list, a name in a message, a name check) in train/, evaluate/, explain/ or bench/.

    "qgmil" is also the package, the command and a tag, so it may appear as a word ("`qgmil data check`",
    a column named qgmil) but not in a test (`startswith("qgmil")`, `== "qgmil"`, `"qgmil" in tags`: ask
    the registry, `models.is_qgmil(name)`)."""
    import re

    names = set(qgmil.list_models()) | set(_ARCHITECTURES)
    found = []
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        for line, text, tested in _string_constants(path):
            hits = sorted(set(re.findall(r"[A-Za-z0-9_]+", text)) & (names - {"qgmil"}))
            word = text.strip("*?[]_ ")
            if (tested == "compare" and word in names) or (
                    tested == "pattern" and len(word) >= 3 and any(word in n for n in names)):
                hits.append(f"tested {text!r}")
            if hits:
                found.append(f"{path.relative_to(PACKAGE)}:{line}: {hits} in {text!r}")
    assert not found, "\n".join(found)
