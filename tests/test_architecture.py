"""The shape of the package, checked (docs/architecture.md).

- the static import graph of ``core/src/encapfwd`` has no cycle;
- the lab never imports the live runtime, and the control socket module imports only the standard library
  and ``encapfwd.errors``;
- docs/architecture.md's module table lists exactly the modules of the tree;
- the old import paths (``encapfwd._moved``) still give the moved modules, with a DeprecationWarning.

The graph: every ``import`` and ``from … import`` statement anywhere in a module (inside functions and
``if TYPE_CHECKING:`` blocks too), plus ``importlib.import_module("literal")`` calls, resolved to modules of
the package. A package's ``__init__`` is a node of its own. Importing ``a.b.c`` implicitly imports ``a`` and
``a.b`` first; those implicit parent-package imports are not edges, but an explicit ``from a.b import name``
(where ``name`` is not a submodule) is an edge to ``a.b``. Old paths (``encapfwd.engines.live``) are
resolved through ``encapfwd._moved.MOVED`` to the module they give.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "core" / "src"
PACKAGE = "encapfwd"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


# --------------------------------------------------------------------------------------------- the graph


def modules_of(src: Path, package: str) -> Dict[str, Path]:
    """dotted name -> file, for every ``.py`` file of *package* under *src* (``__init__`` → the package)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def moved_paths(src: Path, package: str) -> Dict[str, str]:
    """The ``MOVED`` table of ``<package>/_moved.py``, read statically (old dotted path -> new)."""
    path = src / package / "_moved.py"
    if not path.exists():
        return {}
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if any(isinstance(t, ast.Name) and t.id == "MOVED" for t in targets):
            return ast.literal_eval(value)
    return {}


def _is_package(name: str, modules: Mapping[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(name: str, modules: Mapping[str, Path], moved: Mapping[str, str]) -> Optional[str]:
    """The module of the package that importing *name* gives (walking up to the longest existing prefix)."""
    while name:
        if name in modules:
            return name
        if name in moved:
            return moved[name]
        name = name.rpartition(".")[0]
    return None


def _absolute(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _literal_import_module(node: ast.Call) -> Optional[str]:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


def import_graph(src: Path, package: str) -> Dict[str, Set[str]]:
    """module -> the modules of the package it imports (see the module docstring for what counts)."""
    modules = modules_of(src, package)
    moved = moved_paths(src, package)
    prefix = package + "."
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    for current, path in modules.items():
        is_package = _is_package(current, modules)
        targets: List[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, current, is_package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    # a submodule (``from encapfwd.selection import maglev``): an edge to it only; otherwise
                    # the names come from *base* itself
                    targets.append(sub if (sub in modules or sub in moved) else base)
            elif isinstance(node, ast.Call):
                literal = _literal_import_module(node)
                if literal:
                    targets.append(literal)
        for target in targets:
            if target != package and not target.startswith(prefix):
                continue
            resolved = _resolve(target, modules, moved)
            if resolved and resolved != current:
                edges[current].add(resolved)
    return edges


def find_cycle(edges: Mapping[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the graph as ``[a, b, …, a]``, or None (iterative DFS, deterministic order)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {v: WHITE for v in edges}
    for start in sorted(edges):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        colour[start] = GREY
        path = [start]
        while stack:
            node, children = stack[-1]
            for child in children:
                if colour.get(child, BLACK) == GREY:
                    return path[path.index(child):] + [child]
                if colour.get(child) == WHITE:
                    colour[child] = GREY
                    path.append(child)
                    stack.append((child, iter(sorted(edges[child]))))
                    break
            else:
                colour[node] = BLACK
                path.pop()
                stack.pop()
    return None


def test_import_graph_has_no_cycle():
    edges = import_graph(SRC, PACKAGE)
    assert len(edges) > 50, "the package was not found"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ------------------------------------------------------------------------------------------------ layers


def test_lab_does_not_import_the_runtime():
    edges = import_graph(SRC, PACKAGE)
    bad = sorted(
        (module, target)
        for module, targets in edges.items()
        if module == "encapfwd.lab" or module.startswith("encapfwd.lab.")
        for target in targets
        if target == "encapfwd.runtime" or target.startswith("encapfwd.runtime.")
    )
    assert not bad, "encapfwd.lab imports the runtime: " + ", ".join(f"{m} -> {t}" for m, t in bad)


def stdlib_or_errors_only(path: Path) -> List[str]:
    """The imports of *path* that are neither the standard library nor ``encapfwd.errors``."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names = ["." * node.level + (node.module or "")]
            elif node.module == PACKAGE:
                names = [f"{PACKAGE}.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            if name == "encapfwd.errors" or name.startswith("encapfwd.errors."):
                continue
            if name.split(".")[0] in sys.stdlib_module_names:
                continue
            bad.append(name)
    return bad


def test_control_imports_only_the_standard_library_and_errors():
    bad = stdlib_or_errors_only(SRC / PACKAGE / "control.py")
    assert not bad, f"encapfwd.control imports {bad}"


# ------------------------------------------------------------------------------------- the module table


def documented_modules(text: str) -> List[str]:
    """The first cell of every row of the table under ``## Modules`` in docs/architecture.md: a path
    relative to core/src/encapfwd, in backticks (``datapath/dispatcher.py``)."""
    section = re.search(r"^## Modules\b.*?$(.*?)(?=^## )", text + "\n## end", re.M | re.S)
    assert section, "docs/architecture.md has no '## Modules' section"
    out = []
    for line in section.group(1).splitlines():
        match = re.match(r"\|\s*`([^`]+\.py)`\s*\|", line)
        if match:
            out.append(match.group(1))
    return out


def tree_modules(src: Path, package: str) -> List[str]:
    return sorted(str(p.relative_to(src / package)) for p in modules_of(src, package).values())


def table_mismatch(documented: List[str], tree: List[str]) -> List[str]:
    problems = [f"not in docs/architecture.md's module table: {m}" for m in sorted(set(tree) - set(documented))]
    problems += [f"in the table but not in the tree: {m}" for m in sorted(set(documented) - set(tree))]
    problems += [f"listed twice: {m}" for m in sorted({m for m in documented if documented.count(m) > 1})]
    return problems


def test_architecture_table_matches_the_tree():
    problems = table_mismatch(documented_modules(ARCHITECTURE.read_text()), tree_modules(SRC, PACKAGE))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ moved paths


def test_old_path_is_the_new_module_with_a_deprecation_warning():
    new = importlib.import_module("encapfwd.runtime.controller")
    saved = sys.modules.pop("encapfwd.engines.live", None)
    try:
        with pytest.warns(DeprecationWarning, match=r"encapfwd\.engines\.live moved to encapfwd\.runtime\.controller"):
            import encapfwd.engines.live as old
        assert old is new
        assert sys.modules["encapfwd.engines.live"] is new
    finally:
        if saved is not None:
            sys.modules["encapfwd.engines.live"] = saved


def test_every_moved_path_still_imports():
    from encapfwd._moved import MOVED

    for old, new in sorted(MOVED.items()):
        saved = sys.modules.pop(old, None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                assert importlib.import_module(old) is importlib.import_module(new), old
        finally:
            if saved is not None:
                sys.modules[old] = saved


def test_plugin_names_still_import_from_hookspecs():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from encapfwd.hookspecs import AdvisorType, Egress, Forwarder, ProbeResult, SetupTarget, Template

    for record in (AdvisorType, Egress, Forwarder, ProbeResult, SetupTarget, Template):
        assert isinstance(record, type), record


# ----------------------------------------------- the checks can fail: the same functions on a made-up tree


def _tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    for name, body in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return tmp_path


def test_a_cycle_is_found_and_printed(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "import pkg.b\n",
        "sub/__init__.py": "from pkg.sub.c import thing\n",
        "sub/c.py": "def f():\n    from pkg.a import x\n",           # inside a function: still an edge
        "b.py": "from .sub import name\n",                               # relative, an attribute of sub
        "d.py": "import os\nfrom pkg import a\n",
    })
    edges = import_graph(src, "pkg")
    assert edges["pkg.sub.c"] == {"pkg.a"}  # the implicit import of pkg.sub is not an edge
    assert edges["pkg.d"] == {"pkg.a"}
    cycle = find_cycle(edges)
    assert cycle == ["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.a"]


def test_no_cycle_through_implicit_parent_imports(tmp_path):
    src = _tree(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "import importlib\n\ndef __getattr__(n):\n    return importlib.import_module('pkg.sub.s')\n",
        "sub/s.py": "from pkg.sub import t\n",  # t is a submodule: an edge to pkg.sub.t, not to pkg.sub
        "sub/t.py": "",
    })
    edges = import_graph(src, "pkg")
    assert edges["pkg.sub"] == {"pkg.sub.s"} and edges["pkg.sub.s"] == {"pkg.sub.t"}
    assert find_cycle(edges) is None


def test_layer_and_table_checks_can_fail(tmp_path):
    control = tmp_path / "control.py"
    control.write_text("import json\nfrom encapfwd.errors import EncapfwdError\nfrom encapfwd import plan\n"
                       "import pyroute2\n")
    assert stdlib_or_errors_only(control) == ["encapfwd.plan", "pyroute2"]
    doc = "## Modules\n\n| module | concern |\n| --- | --- |\n| `a.py` | a |\n| `gone.py` | old |\n\n## Next\n"
    problems = table_mismatch(documented_modules(doc), ["a.py", "new/__init__.py"])
    assert problems == ["not in docs/architecture.md's module table: new/__init__.py",
                        "in the table but not in the tree: gone.py"]
