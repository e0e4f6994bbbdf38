"""orthofx.graph's layout (issue 24): two engines under one entry, imports only downward.

``graph/analysis.py`` (``analyze``) sits above ``graph/recorded/`` and ``graph/symbolic/``; both
sit above the shared level (``config``, ``result``, ``state``); nothing under ``orthofx/graph``
imports an upper floor of orthofx (report, pipeline, rewrite, ...), the two engines never import
each other, the graph's modules form no import cycle, and the package loads its names lazily.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

import orthofx

ROOT = Path(orthofx.__file__).parent
GRAPH = ROOT / "graph"

#: what orthofx.graph may import outside itself: modules that import nothing of orthofx but
#: each other (checked below, so that this really is a floor)
LOWER_FLOOR = ("orthofx.errors", "orthofx.vocab", "orthofx.checks", "orthofx._log", "orthofx._optional",
               "orthofx.syncs", "orthofx.linalg")
SHARED = ("orthofx.graph.config", "orthofx.graph.result", "orthofx.graph.draw", "orthofx.graph.state")
ENGINES = ("orthofx.graph.recorded", "orthofx.graph.symbolic")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """The statements that run (or type-check) when the module loads: its body, into ``if``
    (``if TYPE_CHECKING:``) and ``try`` blocks, not into functions and classes."""
    out: list[ast.AST] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                     *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return out


def _orthofx_imports(path: Path, *, module_level: bool = False) -> set[str]:
    """Every orthofx module ``path`` imports: import statements anywhere in the file (also inside
    functions and ``if TYPE_CHECKING:``) and ``importlib.import_module("orthofx...")`` calls;
    ``module_level``: only the imports made when the module loads or is type-checked."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in (_module_level(tree) if module_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            # ``from orthofx.graph.symbolic import patterns``: the submodule is imported too
            out |= {f"{node.module}.{a.name}" for a in node.names
                    if (ROOT.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out.add(node.args[0].value)
    return {m for m in out if m == "orthofx" or m.startswith("orthofx.")}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _graph_files() -> list[Path]:
    files = sorted(GRAPH.rglob("*.py"))
    assert len(files) > 10  # the walk found the package
    return files


def _lower_floor_files() -> list[Path]:
    out = []
    for m in LOWER_FLOOR:
        rel = ROOT / m.split(".", 1)[1]
        out += sorted(rel.rglob("*.py")) if rel.is_dir() else [rel.with_suffix(".py")]
    assert all(f.exists() for f in out)
    return out


def test_graph_imports_downward_only() -> None:
    """Outside itself, orthofx.graph imports only the lower floor (which imports only itself);
    inside, the shared level imports only itself and each engine only itself and the shared
    level (analysis.py, the entry, and the package's lazy names sit on top)."""
    bad = {f"{_module_name(f)} imports {m}" for f in _lower_floor_files() for m in _orthofx_imports(f)
           if not _within(m, LOWER_FLOOR)}
    for f in _graph_files():
        name = _module_name(f)
        for m in _orthofx_imports(f):
            if not _within(m, ("orthofx.graph", *LOWER_FLOOR)):
                bad.add(f"{name} imports {m}")
            if not _within(m, ("orthofx.graph",)):
                continue
            if _within(name, SHARED) and not _within(m, SHARED):
                bad.add(f"shared {name} imports {m}")
            for engine in ENGINES:
                if _within(name, (engine,)) and not _within(m, (engine, *SHARED)):
                    bad.add(f"{name} ({engine.rsplit('.', 1)[1]}) imports {m}")
    assert not bad, sorted(bad)


def test_graph_modules_are_small_and_form_no_import_cycle() -> None:
    """At most 600 lines a module; module-level imports (``if TYPE_CHECKING:`` ones too: a type
    import is a dependency) form a DAG; an import deferred into a function
    (``AnalysisReport.to_dot`` → ``graph.draw``) is not an edge."""
    big = {_module_name(f): n for f in _graph_files() if (n := len(f.read_text().splitlines())) > 600}
    assert not big, big
    g = nx.DiGraph()
    for f in _graph_files():
        name = _module_name(f)
        g.add_node(name)
        for m in _orthofx_imports(f, module_level=True):
            if _within(m, ("orthofx.graph",)) and m != "orthofx.graph" and m != name:
                g.add_edge(name, m)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_config_loads_no_engine() -> None:
    """orthofx.config reads AnalysisConfig (orthofx.graph.config): that loads the package's
    __init__ and config alone, not the analysis, the engines nor orthofx.report."""
    out = _run(
        "import sys, orthofx.config as c\n"
        "c.OrthoConfig(analysis={'strict': True})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('orthofx.graph', 'orthofx.report'))))"
    )
    assert out.strip() == "['orthofx.graph', 'orthofx.graph.config']"


def test_graph_names_resolve_lazily_and_are_never_shadowed_by_submodules() -> None:
    """``import orthofx.graph`` loads no submodule; each public name resolves to its object, also
    after every submodule was imported first (a submodule import sets a package attribute)."""
    out = _run(
        "import importlib, pkgutil, sys, types, orthofx.graph as g\n"
        "print(sorted(m for m in sys.modules if m.startswith('orthofx.graph.')))\n"
        "for info in pkgutil.walk_packages(g.__path__, prefix='orthofx.graph.'):\n"
        "    importlib.import_module(info.name)\n"
        "bad = [n for n in g._LAZY if isinstance(getattr(g, n), types.ModuleType)]\n"
        "print(bad, set(g.__all__) <= set(dir(g)), g.analyze.__module__, g.trace.__module__)"
    )
    loaded, resolved = out.strip().splitlines()
    assert loaded == "[]"
    assert resolved == "[] True orthofx.graph.analysis orthofx.graph.symbolic.trace"


def test_graph_public_names_are_unchanged() -> None:
    import orthofx.graph as g
    import orthofx.report as report
    from orthofx.graph import result

    assert g.__all__ == ["analyze", "analyze_graph", "trace", "function_leaf", "AnalysisConfig", "MetaSpec",
                         "AnalysisReport", "MetaLayerEntry", "SkippedEntry"]
    for name in ("AnalysisReport", "MetaLayerEntry", "SkippedEntry", "ProducerInfo", "CovarianceInfo", "ChainStep",
                 "meta_layer_name", "ROOT_NAME"):
        assert getattr(report, name) is getattr(result, name)
    for name in ("AnalysisReport", "MetaLayerEntry", "SkippedEntry", "ProducerInfo", "CovarianceInfo", "ChainStep"):
        assert getattr(g, name) is getattr(result, name)
    assert orthofx.AnalysisReport is result.AnalysisReport and orthofx.analyze is g.analyze
