"""The layout stays true: surgeon's packages form layers, every import (module-level or inside a function)
points down them or within one package, and no modules import each other in a circle.

    python -m pytest -q tests/test_layers.py

The layers, lowest first, are the order of LAYERS; surgeon/<package>/__init__.py says what each owns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "surgeon"
LAYERS = [  # lowest first: a module may import only from its own package or a package listed before it
    ("surgeon.errors", "surgeon.version", "surgeon.options"),  # the vocabulary every layer shares
    ("surgeon.format",),
    ("surgeon.linalg",),
    ("surgeon.model",),
    ("surgeon.methods",),
    ("surgeon.engine",),
    ("surgeon.runtime",),
    ("surgeon.commands",),
    ("surgeon.cli",),
    ("surgeon", "surgeon.__main__"),
]


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The surgeon modules `name` imports anywhere in its file (as import-linter reads `from pkg import mod`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package
                for _ in range(node.level - 1):
                    up = up.rpartition(".")[0]
                base = f"{up}.{base}" if base else up
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer_of(name: str) -> int:
    best, level = -1, None
    for i, members in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and len(m) > best and not (m == "surgeon" and name != "surgeon"):
                best, level = len(m), i
    assert level is not None, f"{name} belongs to no layer: add its package to LAYERS and give it an __init__ docstring"
    return level


def package_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2])


GRAPH = {n: imports(n, p, modules()) for n, p in modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down(name):
    beside = lambda t: layer_of(t) == layer_of(name) > 0 and package_of(t) != package_of(name)  # noqa: E731 - the base layer's modules may use each other
    up = [t for t in GRAPH[name] if layer_of(t) > layer_of(name) or beside(t)]
    assert not up, f"{name} imports {sorted(up)} from a layer above (or beside) its own; move the code down instead"


def test_no_import_cycle():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_package_states_its_layer():
    for init in ROOT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 12 and "TODO" not in doc, f"{init} needs a docstring saying what the package owns and may import"


def test_top_level_stays_small():
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert loose == ["__main__.py", "errors.py", "options.py", "version.py"], loose
