"""The house rules that CI checks with the tests: the layer contract (import-linter, configured in
pyproject.toml), ruff and mypy. Each check also runs once against a copy of the source with one rule broken,
so a checker that silently passes everything would fail here."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it is part of skain's dev extra (pip install -e '.[dev]')")
    return path


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the package under root/src, with root's pyproject.toml contracts."""
    env = {"PYTHONPATH": str(root / "src"), "PATH": str(BIN), "HOME": str(root)}
    return subprocess.run([tool("lint-imports"), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_tree(tmp_path: Path) -> Path:
    """src/ and pyproject.toml in a scratch folder (named skain, as a user's clone is), to break on purpose."""
    copy = tmp_path / "skain"
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("*.safetensors", "__pycache__",
                                                                              "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_every_package_imports_only_from_the_layers_below_it():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path):
    copy = copy_tree(tmp_path)
    low = copy / "src" / "skain" / "modelfile" / "bundle.py"  # the model file layer must not know the Predictor
    low.write_text(low.read_text() + "\nfrom skain.inference.predictor import Predictor  # noqa: E402,F401\n")
    out = lint_imports(copy)
    assert out.returncode != 0
    assert "skain.modelfile.bundle -> skain.inference.predictor" in out.stdout


def test_ruff_finds_nothing():
    out = subprocess.run([tool("ruff"), "check", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_reports_an_unused_import(tmp_path):
    copy = copy_tree(tmp_path)
    (copy / "src" / "skain" / "fileio.py").write_text("import os\n")
    out = subprocess.run([tool("ruff"), "check", "src"], cwd=copy, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "F401" in out.stdout


@pytest.mark.slow
def test_mypy_finds_no_type_error():
    out = subprocess.run([tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
