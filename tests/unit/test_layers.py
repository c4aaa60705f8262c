"""The layers of docs/architecture.md, read from the code: the contract layer at the bottom,
`db/` beside it, producer and worker side by side above, operator tools on top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contract", "db", "producer", "worker", "listing_vision", "bench")
# What each top-level package may import of ours (the operator tools may import everything).
ALLOWED = {
    "contract": set(),
    "db": {"contract"},
    "producer": {"contract", "db"},
    "worker": {"contract", "db"},
    "listing_vision": {"contract", "db", "producer", "worker"},
    "bench": {"contract", "db", "producer", "worker", "listing_vision"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Our top-level packages each module of `package` imports, lazily imported ones too."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = (names & set(PACKAGES)) - {package}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        module: sorted(imports - ALLOWED[package])
        for module, imports in imported_packages(package).items()
        if imports - ALLOWED[package]
    }

    assert wrong == {}


def test_the_top_level_import_graph_has_no_cycle() -> None:
    graph = {package: set().union(*imported_packages(package).values()) for package in PACKAGES}
    visiting: list[str] = []

    def visit(package: str) -> None:
        assert package not in visiting, " -> ".join([*visiting, package])
        visiting.append(package)
        for child in graph[package]:
            visit(child)
        visiting.pop()

    for package in PACKAGES:
        visit(package)


def test_the_producer_loads_neither_torch_nor_the_worker() -> None:
    probe = (
        "import sys, producer\n"
        "from producer.enqueue import Producer\n"
        "print(sorted(m for m in ('torch', 'worker', 'open_clip', 'transformers')"
        " if m in sys.modules))"
    )

    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()

    assert loaded == "[]"
