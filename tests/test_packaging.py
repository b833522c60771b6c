"""Every third-party module the test suite imports is installed by ``pip install -e ".[test]"``: it
belongs to a distribution named in pyproject.toml's dependencies or its ``test`` extra.

Scanned: every import in tests/ (function-level ones too), and the module-level imports of the
benchmark modules the tests load (benchmarks/harness.py imports every bench_*.py); imports inside
benchmark functions are optional baselines or plots guarded by the harness (FlashInfer, matplotlib).
"""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCAL = {"flashtile", "benchmarks"}


def _requirement_name(req: str) -> str:
    """Normalized distribution name of a requirement string ("scipy>=1.9" -> "scipy")."""
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _imported_names(path: pathlib.Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module name -> files importing it, for the non-stdlib, non-local imports."""
    tests = ROOT / "tests"
    local = LOCAL | {p.stem for p in tests.rglob("*.py")} | {p.name for p in tests.rglob("*") if p.is_dir()}
    files = [(p, False) for p in tests.rglob("*.py")]
    files += [(ROOT / "benchmarks" / "harness.py", True)]
    files += [(p, True) for p in (ROOT / "benchmarks").glob("bench_*.py")]
    found: dict[str, set[str]] = {}
    for path, module_level_only in files:
        for name in _imported_names(path, module_level_only) - local - set(sys.stdlib_module_names):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_test_imports_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in sorted(_third_party_imports().items()):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = (sorted(dists) or "not installed", sorted(files))
    assert not missing, f"imported by the tests but in no dependency or test extra of pyproject.toml: {missing}"


def test_scan_sees_the_known_imports():
    """The scan itself: it finds imports at module level and inside functions (scipy in oracles.py)."""
    found = _third_party_imports()
    assert {"torch", "pytest", "numpy", "scipy", "hypothesis"} <= set(found)
    assert "tests/oracles.py" in found["scipy"]
