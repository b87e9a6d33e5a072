"""Packaging: every third-party module src/skain imports is a declared dependency, and both licences (the code's
Apache-2.0, the shipped weights' CC BY-NC 4.0) travel with the package and its metadata."""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "skain"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[\s\[<>=!~;(@]", requirement.strip(), maxsplit=1)[0])


def declared(project: dict) -> set[str]:
    """Distributions named in [project] dependencies or any optional extra (the package itself excluded)."""
    own = normalise(project["name"])
    reqs = list(project.get("dependencies", []))
    reqs += [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return {requirement_name(r) for r in reqs} - {own}


def imported_modules(root: Path) -> dict[str, str]:
    """Top-level names of every absolute import under `root` (`import a.b`, `from a.b import c`, also inside
    functions) -> the first file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(root)))
    return found


def undeclared(root: Path, project: dict, own: str = "skain") -> list[str]:
    """Third-party modules imported under `root` that no declared distribution provides (a module no installed
    distribution provides counts as undeclared too)."""
    providers = packages_distributions()
    allowed = declared(project)
    problems = []
    for module, where in sorted(imported_modules(root).items()):
        if module == own or module in sys.stdlib_module_names or module == "__future__":
            continue
        dists = {normalise(d) for d in providers.get(module, [])}
        if not dists & allowed:
            problems.append(f"{module} (imported in {where}; provided by {', '.join(sorted(dists)) or 'nothing installed'})")
    return problems


def test_every_third_party_import_is_declared():
    assert undeclared(SRC, PYPROJECT["project"]) == []


def test_scipy_is_a_core_dependency():
    """scipy is imported by the scoring and calibration code every install runs."""
    assert "scipy" in {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}


@pytest.mark.parametrize("source, culprit, fix", [
    ("import jinja2\n", "jinja2", "Jinja2>=3"),                    # installed (through Flask), not declared here
    ("from yaml import safe_load\n", "yaml", "PyYAML"),            # the import name is not the distribution's
    ("def f():\n    import not_a_real_module_xyz\n", "not_a_real_module_xyz", None),  # nothing provides it
])
def test_an_undeclared_import_is_caught(tmp_path, source, culprit, fix):
    pkg = tmp_path / "skain"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import os\nimport numpy as np\nfrom skain import fileio\nfrom . import ok\n")
    (pkg / "bad.py").write_text(source)
    project = {"name": "skain", "dependencies": ["numpy>=1.24"],
               "optional-dependencies": {"dev": ["skain[web]", "pytest>=8"]}}
    problems = undeclared(pkg, project)
    assert len(problems) == 1 and problems[0].startswith(f"{culprit} (imported in bad.py")
    if fix:  # declaring the distribution (in an extra) clears it
        assert undeclared(pkg, {**project, "optional-dependencies": {"extra": [fix]}}) == []


def test_licences_are_declared_the_pep_639_way_and_shipped():
    project = PYPROJECT["project"]
    assert isinstance(project["license"], str), "PEP 639: an SPDX expression, not the deprecated table"
    assert "Apache-2.0" in project["license"] and "CC-BY-NC-4.0" in project["license"]
    files = project["license-files"]
    assert "LICENSE" in files and "src/skain/models/LICENSE" in files
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    weights = (SRC / "models" / "LICENSE").read_text()
    assert "CC BY-NC 4.0" in weights and "Tschandl" in weights and "NON-COMMERCIAL" in weights
    assert "models/LICENSE" in PYPROJECT["tool"]["setuptools"]["package-data"]["skain"]
    requires = PYPROJECT["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77 for r in requires)


def test_readmes_say_which_licence_covers_what():
    readme = (ROOT / "README.md").read_text()
    model_readme = (SRC / "models" / "README.md").read_text()
    for text in (readme, model_readme):
        assert "Apache-2.0" in text and "CC BY-NC 4.0" in text
    assert "[LICENSE](LICENSE)" in readme and "src/skain/models/LICENSE" in readme
