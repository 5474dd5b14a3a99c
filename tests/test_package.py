"""The house rules of the gptviz package, read from its source with ``ast``: imports point one
way (no cycle, also none through ``if TYPE_CHECKING:``), modules and functions stay readable,
the model file is the book's, and the package's top level stays small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gptviz

PACKAGE = Path(gptviz.__file__).resolve().parent


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its file (top level, inside
    functions, and under ``if TYPE_CHECKING:`` alike); ``from pkg import mod`` counts ``pkg.mod``."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    found.add(f"{source}.{alias.name}")
                elif source in known:
                    found.add(source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    found.discard(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_type_checking_imports(tmp_path):
    """The walker on a made-up package shaped like the two cycles the package had (a runtime
    import one way, a TYPE_CHECKING import back), so the test below can fail."""
    pkg = tmp_path / "gptviz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("from .kv_cache import KVCache\n")
    (pkg / "kv_cache.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .model import GPTModel\n")
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..sub.a import g\n")
    (pkg / "sub" / "c.py").write_text("from ..model import GPTModel\n")
    graph = import_graph(pkg)
    assert graph["gptviz.sub.c"] == {"gptviz.model"}
    assert cycles(graph) == [["gptviz.kv_cache", "gptviz.model"], ["gptviz.sub.a", "gptviz.sub.b"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "gptviz.model" in graph["gptviz.generation.session"]  # the walker sees the real imports
    assert cycles(graph) == []


# Who may import whom: a floor may import the floors below it, never one above it.
FLOORS = [
    {"gptviz.tools"},
    {"gptviz.ui"},
    {"gptviz.files"},
    {"gptviz.plots"},
    {"gptviz.analysis"},
    {"gptviz.train"},  # chapter 5: its sample continuation is the app's greedy generation
    {"gptviz.generation"},
]


def floor(name: str) -> int:
    """0 for tools … 6 for generation; 7 for the other top-level modules (model, config, …)."""
    for i, rooms in enumerate(FLOORS):
        if any(name == r or name.startswith(r + ".") for r in rooms):
            return i
    return len(FLOORS)


def test_every_import_points_down_a_floor():
    climbs = [
        f"{name} -> {dep}"
        for name, deps in import_graph().items()
        if name != "gptviz"  # the public API gathers names from every floor
        for dep in deps
        if dep != "gptviz" and floor(dep) < floor(name)
    ]
    assert climbs == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_under_450_lines_and_functions_under_80(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 450
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []


def test_model_py_is_the_books_model_without_the_machine_room():
    text = (PACKAGE / "model.py").read_text()
    assert len(text.splitlines()) <= 400
    assert "torch.ops" not in text and "mkldnn" not in text and "perf_counter" not in text
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    assert classes == ["GELU", "FeedForward", "MultiHeadAttention", "LayerNorm", "TransformerBlock", "GPTModel"]


def test_the_top_level_holds_at_most_14_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, top
    rooms = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert rooms == ["analysis", "files", "generation", "plots", "tools", "train", "ui"]
