"""Import hygiene: every module of the package imports on its own, and no two modules import each
other at module level (a cycle makes the result depend on which of them is imported first)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import supanalysis

PACKAGE_DIR = Path(supanalysis.__file__).parent
ENTRY_POINTS = ("supanalysis.cli", "supanalysis.commands")


def module_names(package_dir: Path, package: str) -> list[str]:
    """Dotted names of every ``.py`` module under ``package_dir`` (packages by their ``__init__``)."""
    names = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join([package, *parts]))
    return names


def _module_path(package_dir: Path, package: str, name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    init = package_dir / rel / "__init__.py"
    return init if init.is_file() else (package_dir / rel).with_suffix(".py")


def _top_level_imports(tree: ast.Module, include_lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported; with ``include_lazy`` also those in functions.

    ``if TYPE_CHECKING:`` blocks never run and are skipped.
    """
    found = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not include_lazy:
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that one import statement in module ``here`` imports."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:
        base = here.split(".") if is_package else here.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = {f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known}
    if node.module or not found:
        found |= {source} & known
    return found


def import_graph(package_dir: Path, package: str, include_lazy: bool = False) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at module level, or anywhere with ``include_lazy``)."""
    names = module_names(package_dir, package)
    known = set(names)
    graph = {}
    for name in names:
        path = _module_path(package_dir, package, name)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _top_level_imports(tree, include_lazy):
            edges |= _targets(node, name, path.name == "__init__.py", known)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []

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
    return sorted(found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


# ----------------------------------------------------------------------------- the checker itself
def test_cycle_finder_sees_module_level_cycles_only(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from .b import f\n",
            "b.py": "from . import c\n",
            "c.py": "from .a import g\n",
            "lazy.py": "def f():\n    from .a import g\n",
            "d.py": "from .lazy import f\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import x\n",
            "e.py": "from .d import y\n",
            "sub/__init__.py": "from .inner import z\n",
            "sub/inner.py": "from .. import a\n",
        },
    )
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.lazy"] == set()
    assert graph["pkg.d"] == {"pkg.lazy"}
    assert graph["pkg.sub.inner"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert import_graph(pkg, "pkg", include_lazy=True)["pkg.lazy"] == {"pkg.a"}


# ----------------------------------------------------------------------------- the package
def test_no_import_cycles_at_module_level():
    found = cycles(import_graph(PACKAGE_DIR, "supanalysis"))
    assert not found, "import cycles among supanalysis modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_nothing_imports_the_command_line():
    """The command line depends on the library, never the reverse (not even inside a function)."""
    graph = import_graph(PACKAGE_DIR, "supanalysis", include_lazy=True)
    users = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if not name.startswith(ENTRY_POINTS)
        for target in targets
        if target.startswith(ENTRY_POINTS)
    }
    assert not users, sorted(users)


_IMPORT_EACH = """
import importlib, os, sys, traceback
import numpy, torch  # what every module needs first; loaded once, then shared by the forks
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_every_module_imports_alone():
    """Each module imported first, in an interpreter where no other supanalysis module is loaded."""
    names = module_names(PACKAGE_DIR, "supanalysis")
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
