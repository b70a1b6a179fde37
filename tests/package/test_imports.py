"""The package's own imports: every module imports on its own, in any order, and the
import graph (module-level and function-level ``from``/``import`` of sparseforge modules,
read from the AST) has no cycle and never points back up the pipeline."""
from __future__ import annotations

import ast
import importlib
import pathlib
import random
import subprocess
import sys

import pytest

import sparseforge

ROOT = pathlib.Path(sparseforge.__file__).parent

#: The pipeline, in order: a package may import only from its own stage or the ones before it.
STAGES = ["version", "compat", "envvars", "atomic", "dsl", "lower", "codegen", "backends", "autotune", "runtime",
          "distributed", "api", "nn",
          "viz", "bench", "cli", "integrations", "__init__", "__main__"]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str) -> str | None:
    """The sparseforge module that ``name`` (a module, or a module's attribute) refers to."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the sparseforge modules it imports (anywhere in its body, TYPE_CHECKING-only
    imports excluded), a package's ``__init__`` counted as importing what it names."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        typing_only = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only.update(id(n) for n in ast.walk(node))
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path.name == "__init__.py", node)
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                t = _target(n)
                if t is not None and t != module and not module.startswith(t + "."):
                    edges.add(t)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _stage(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return STAGES.index(name)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_points_back_up_the_pipeline():
    backwards = sorted(f"{m} -> {t}" for m, ts in import_graph().items() for t in ts
                       if t != "sparseforge" and _stage(t) > _stage(m))
    assert backwards == []


def test_every_module_has_a_stage():
    for module in MODULES:
        if module != "sparseforge":
            _stage(module)  # raises ValueError for a folder outside STAGES


@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_in_any_order(seed):
    """A fresh interpreter imports every module, in a shuffled order."""
    names = [m for m in MODULES if not m.endswith("__main__")]
    random.Random(seed).shuffle(names)
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
