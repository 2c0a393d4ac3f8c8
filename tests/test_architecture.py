"""The import graph keeps its shape: no cycle between modules, no import from a lower stage folder into a
higher one (build/ included), the shared contract (core/) imports no stage, and the client library
imports without torch or DALI. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what each stage folder may import, besides itself; lowest first
ALLOWED = {
    "core": set(),
    "clients": {"core"},
    "training": {"core"},
    "build": {"core", "training"},
    "serve": {"core", "clients", "training", "build"},
    "perf": {"core", "clients", "training", "build", "serve"},
}


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for folder in ALLOWED:
        for path in (root / folder).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(filter(None, (resolve(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update(filter(None, (resolve(f"{node.module}.{a.name}") for a in node.names)))
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} imports {b}" for a, bs in edges.items() for b in bs
                  if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]])


def test_the_graph_sees_build_and_every_stage():
    edges = graph()
    assert {"build.render_repo", "build.layouts", "core.stages", "perf.load.wrk", "serve.publish"} <= set(edges)
    assert "build.settings" in edges["build.render_repo"]
    assert "core.metadata" in edges["build.render_repo"]


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_upward_or_sideways_import_between_stage_folders():
    assert upward(graph()) == []


def test_the_checks_catch_what_they_guard_against(tmp_path):
    """A cycle and an upward import planted in a copy of two modules are found."""
    for folder in ALLOWED:
        (tmp_path / folder).mkdir()
    (tmp_path / "core" / "a.py").write_text("from core.b import x\n")
    (tmp_path / "core" / "b.py").write_text("def f():\n    from core import a\n")
    (tmp_path / "build" / "c.py").write_text("import perf.d\n")
    (tmp_path / "perf" / "d.py").write_text("")
    edges = graph(tmp_path)
    assert cycles(edges) == [["core.a", "core.b"]]
    assert upward(edges) == ["build.c imports perf.d"]


def test_clients_import_without_torch_or_dali():
    code = ("import sys, clients, clients.client, clients.cli, clients.admin, core.protocol\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nvidia', 'onnxruntime'))\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
