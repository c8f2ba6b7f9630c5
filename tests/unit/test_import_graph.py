"""The package graph runs one way (folders are layers, README "Layout"), lazy imports included;
no module-level cycle; imports of raydetr modules sit at the top of modules; only the registry
imports MLflow; every module imports on its own in a fresh interpreter.

    python tests/unit/test_import_graph.py      # prints the package edges and the lazy imports
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "raydetr"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> raydetr modules it imports anywhere in its body (TYPE_CHECKING included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__
                    graph[mod].add(t)
    return graph


# Top to bottom: a package may import only packages on a lower line (same line: no cycle).
LAYERS = [
    ("commands", "api"),
    ("fit",),
    ("registry",),
    ("serve",),
    ("train",),
    ("stopping",),
    ("record",),
    ("model",),
    ("loss", "data", "eval"),
    ("ops", "artifacts", "config"),
    ("ema", "errors"),
]
# Function-level imports of raydetr modules that are not there to hide a cycle:
# pyfunc.py is loaded by MLflow as model code; the package is on sys.path only when it runs.
LAZY_ALLOWED = {("raydetr.registry.pyfunc", "raydetr.serve.detector")}
# import_module(...) tables: the CLI's commands and the package face (PEP 562).
_IMPORT_MODULE_STR = re.compile(r"""["'](raydetr(?:\.\w+)+)["']""")


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "raydetr"


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        a = package_of(mod)
        out.setdefault(a, set())
        for t in targets:
            b = package_of(t)
            if a != b and b != "raydetr":
                out[a].add(b)
    return out


def lazy_imports() -> list[tuple[str, str]]:
    """(module, raydetr module) for every import statement inside a function."""
    found = []
    for mod, path in _modules().items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [(mod, n) for n in names if n == "raydetr" or n.startswith("raydetr.")]
    return sorted(set(found))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_in_a_fresh_interpreter():
    """All modules, in sorted order, in one fresh interpreter (no hidden order dependency)."""
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n"
                                            for m in sorted(_modules()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_no_module_over_400_lines():
    long = {m: n for m, p in _modules().items()
            if (n := len(p.read_text().splitlines())) > 425}
    assert not long, f"modules over ~400 lines: {long}"


def test_packages_depend_one_way():
    rank = {pkg: i for i, line in enumerate(LAYERS) for pkg in line}
    pkgs = package_graph(import_graph())
    unknown = sorted(set(pkgs) - set(rank) - {"raydetr"})
    assert not unknown, f"packages missing from LAYERS: {unknown}"
    upward = sorted((a, b) for a, deps in pkgs.items() for b in deps
                    if a in rank and rank[b] < rank[a])
    assert not upward, f"imports that run up the layers: {upward}"
    assert find_cycle(pkgs) is None, "package cycle: " + " -> ".join(find_cycle(pkgs))


def test_layer_check_finds_an_upward_import():
    rank = {pkg: i for i, line in enumerate(LAYERS) for pkg in line}
    assert rank["train"] > rank["fit"] and rank["config"] > rank["model"]
    assert find_cycle(package_graph({"raydetr.fit.a": {"raydetr.train.b"},
                                     "raydetr.train.b": {"raydetr.fit.a"}})) is not None


def test_imports_of_raydetr_modules_are_at_the_top():
    lazy = [e for e in lazy_imports() if e not in LAZY_ALLOWED]
    assert not lazy, f"function-level imports of raydetr modules: {lazy}"


def test_only_the_registry_imports_mlflow():
    users = sorted(mod for mod, path in _modules().items()
                   if re.search(r"^\s*(import mlflow|from mlflow)", path.read_text(), re.M)
                   and not mod.startswith("raydetr.registry"))
    assert not users, f"modules outside raydetr.registry that import mlflow: {users}"


if __name__ == "__main__":
    g = import_graph()
    for a, deps in sorted(package_graph(g).items()):
        for b in sorted(deps):
            print(f"{a} -> {b}")
    print(f"function-level imports of raydetr modules: {len(lazy_imports())}")
    for m, n in lazy_imports():
        print(f"  {m} -> {n}")
