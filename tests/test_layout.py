"""The layout holds: each concern in its room, found by name (README, "Layout").

Read from the source with ``ast`` (every import, at module level or inside a function), so a lazy import that
closes a cycle counts as much as a top-level one."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "phi1_ray"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The phi1_ray modules ``path`` imports (``from phi1_ray.x import y`` counts ``phi1_ray.x.y`` if that is a
    module, else ``phi1_ray.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("phi1_ray") and target != name and target != "phi1_ray":
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_model_code_knows_nothing_of_distribution():
    code = "import sys, phi1_ray.model; print(sorted({'ray', 'deepspeed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    graph = import_graph()
    seen, todo = set(), ["phi1_ray.model"]
    while todo:  # everything model.py reaches, lazily or not
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    for module in seen:
        text = _modules()[module].read_text()
        assert not re.search(r"^\s*(import|from)\s+(ray|deepspeed)\b", text, re.MULTILINE), module


def _offenders(pattern: str, allowed: set[str]) -> list[str]:
    hits = []
    for name, path in _modules().items():
        if name in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(pattern, line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return hits


def test_only_storage_knows_uri_schemes():
    """No module but phi1_ray.storage tests a path for ``://`` or for a scheme such as ``s3://``."""
    pattern = r"""["']://["']|\.startswith\(\s*\(?["'](s3|gs|gcs|file|hdfs|abfss?)(://)?["']|split\(["']://"""
    assert _offenders(pattern, {"phi1_ray.storage"}) == []


def test_only_tracking_imports_mlflow():
    assert _offenders(r"^\s*(import mlflow|from mlflow)", {"phi1_ray.tracking"}) == []


def test_no_function_longer_than_a_screen():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_every_module_opens_with_a_docstring():
    missing = [
        str(path.relative_to(ROOT))
        for path in _modules().values()
        if path.read_text().strip() and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []


def test_the_readme_layout_names_every_room():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for path in sorted(PACKAGE.iterdir()):
        if path.name.startswith(("_", ".")) or path.name == "__pycache__":
            continue
        room = f"phi1_ray/{path.name}" + ("/" if path.is_dir() else "")
        assert f"`{room}`" in layout or f"`{room.rstrip('/')}`" in layout, f"README's Layout does not name {room}"


def test_no_private_name_crosses_a_module_boundary():
    """What one module uses of another has a public name (``from phi1_ray.x import _y`` is a hidden coupling)."""
    hits = []
    for sub in ("phi1_ray", "jobs", "serve_apps", "benchmarks"):
        for path in sorted((ROOT / sub).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phi1_ray"):
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    if private:
                        hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {', '.join(private)}")
    assert hits == []
