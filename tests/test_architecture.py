"""The import graph keeps its shape: no cycle between modules, no import from a lower stage folder into a
higher one (build/ included), the shared contract (core/) imports no stage, the code that runs inside
Triton (served/) imports nothing of the project but itself and nothing outside the engines' and Triton's
packages, and the client library imports without torch or DALI. Every import counts, also those inside
functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what each stage folder may import, besides itself; lowest first
ALLOWED = {
    "served": set(),
    "core": {"served"},
    "clients": {"served", "core"},
    "training": {"served", "core"},
    "build": {"served", "core", "training"},
    "serve": {"served", "core", "clients", "training", "build"},
    "perf": {"served", "core", "clients", "training", "build", "serve"},
}
# what the served package (copied alone into the rendered repository, loaded by Triton's Python backend and
# DALI) may import besides the standard library and itself: NumPy, the engines (torch: runners, imported
# lazily) and what Triton's Python backend provides
SERVED_MAY_IMPORT = {"numpy", "nvidia", "onnxruntime", "openvino", "tensorrt", "torch",
                     "triton_python_backend_utils", "served"}


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


def foreign_imports(package: Path) -> list[str]:
    """Every import of the package's files (also inside functions) outside the standard library and
    SERVED_MAY_IMPORT, as "file imports name"; a relative import is the package's own. ``nvidia`` only as
    nvidia.dali."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (top in sys.stdlib_module_names or top in SERVED_MAY_IMPORT) and (
                    top != "nvidia" or name == "nvidia.dali" or name.startswith("nvidia.dali."))
                if not ok:
                    found.append(f"{path.relative_to(package.parent)} imports {name}")
    return found


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
    assert {"build.render_repo", "build.layouts", "served.stages", "perf.load.wrk", "serve.publish"} <= set(edges)
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


def test_the_served_package_imports_only_the_standard_library_numpy_and_the_engines():
    assert (ROOT / "served" / "models" / "fused.py").is_file()
    assert foreign_imports(ROOT / "served") == []


def test_the_served_import_check_catches_a_foreign_import(tmp_path):
    """Imports of the project, of a package the served copy lacks, or of another nvidia package, also inside a
    function, are found; the standard library, the allowed packages and the package itself are not."""
    (tmp_path / "served" / "models").mkdir(parents=True)
    (tmp_path / "served" / "ok.py").write_text(
        "import json, os.path\nimport numpy as np\nfrom nvidia.dali import fn\nfrom served import engines\n"
        "from . import stages\nimport triton_python_backend_utils as pb_utils\n"
        "def f():\n    import onnxruntime, openvino, tensorrt, torch\n")
    (tmp_path / "served" / "bad.py").write_text("from core import protocol\ndef f():\n    import PIL.Image\n")
    (tmp_path / "served" / "models" / "m.py").write_text("import build.layouts\nfrom nvidia import cuda\n")
    assert foreign_imports(tmp_path / "served") == [
        "served/bad.py imports core", "served/bad.py imports PIL.Image",
        "served/models/m.py imports build.layouts", "served/models/m.py imports nvidia"]


def test_clients_import_without_torch_or_dali():
    code = ("import sys, clients, clients.client, clients.cli, clients.admin, core.protocol\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nvidia', 'onnxruntime'))\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_client_command_line_imports_without_prometheus_client():
    """The GPU container's locked packages have no prometheus_client: `python3 -m clients` must still start
    there (the served metrics' exporter is imported only when --metrics-file asks for it)."""
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import clients.cli\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
