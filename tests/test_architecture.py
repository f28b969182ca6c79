"""Layering: the package's import graph has no cycles, and test modules do not import one another
(issue #18).

Every ``import`` / ``from ... import`` counts, including those inside functions: an import deferred
to call time still ties the two modules together."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import distributed_ir

ROOT = Path(distributed_ir.__file__).parent
TESTS = Path(__file__).resolve().parent
SHARED_TEST_MODULES = {"tests.conftest", "tests.public_fixtures"}  # what test modules may import from tests/


def module_name(path: Path) -> str:
    parts = ("distributed_ir",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of this package it imports}`` (a name resolves to its longest module)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}

    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = ours(name)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_import_graph_has_no_cycles():
    graph = import_graph()
    assert "distributed_ir.models.reranker_base" in graph and graph["distributed_ir.cli"]  # the walk sees modules
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")"
                       for c in found)
    assert not found, f"import cycles: {detail}"


def test_the_config_imports_the_models_settings_alone():
    """config -> models.settings (the `reranker:` section is the models' RerankerSettings): importing the
    config first, in a fresh interpreter, must not pull torch in, nor run models.embedder (which imports
    the config back) while the config is half-initialised."""
    code = ("import sys, distributed_ir.config\n"
            "assert 'torch' not in sys.modules and 'distributed_ir.models.embedder' not in sys.modules\n"
            "import distributed_ir.models.embedder, distributed_ir.train.tasks")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert res.returncode == 0, res.stderr[-2000:]


def test_models_never_import_the_app_config():
    """Models own their settings (``models/settings.py``); the app's config builds on them, never
    the other way round (DESIGN.md: models never import recipe config)."""
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items()
                       if m.startswith("distributed_ir.models") and "distributed_ir.config" in deps)
    assert offenders == []


def imported_test_modules(path: Path) -> set[str]:
    """The ``tests.*`` modules that ``path`` (a file in tests/) imports, in any form: ``import
    tests.x``, ``from tests.x import y``, ``from tests import x``, ``from .x import y``, ``from . import x``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tests.")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: tests/ is the package
                module = "tests" + (f".{module}" if module else "")
            if module == "tests":
                found |= {f"tests.{a.name}" for a in node.names}
            elif module.startswith("tests."):
                found.add(module)
    return found


def cross_test_imports(folder: Path) -> dict[str, set[str]]:
    """``{file: tests.* modules it imports besides conftest and public_fixtures}``, over ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        bad = imported_test_modules(path) - SHARED_TEST_MODULES
        if bad:
            out[str(path.relative_to(folder))] = bad
    return out


def test_cross_test_import_finder_finds_planted_imports(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "import tests.test_b\nfrom tests.test_c import helper\nfrom tests import test_d, conftest\n"
        "def f():\n    from .test_e import x\n    from . import test_f, public_fixtures\n"
        "from tests.conftest import triplets\nimport os.path\n")
    (tmp_path / "test_ok.py").write_text("from tests.conftest import run_cli\nfrom tests.public_fixtures import EN\n")
    assert cross_test_imports(tmp_path) == {
        "test_a.py": {"tests.test_b", "tests.test_c", "tests.test_d", "tests.test_e", "tests.test_f"}}


def test_test_modules_share_helpers_only_through_conftest():
    """Shared test helpers live in conftest.py (or public_fixtures.py), not in another test module."""
    assert imported_test_modules(TESTS / "test_train_loop.py")  # the walk sees the tests' imports
    assert not cross_test_imports(TESTS), f"test modules importing other test modules: {cross_test_imports(TESTS)}"
