"""The rooms of DESIGN.md are a checked contract (import-linter, ``[tool.importlinter]`` in pyproject.toml).

The tree keeps every contract; and each contract is known to bite: on a copy of the code with one
forbidden import or one cycle added, ``lint-imports`` fails and names the broken contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import REPO

PACKAGES = ("daemon", "storage", "pipeline", "vocabulary")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` (dev extra) on the code under ``root``, imported from there."""
    tool = Path(sys.executable).parent / "lint-imports"
    assert tool.exists(), f"{tool} is missing: install the dev extra (pip install -e '.[dev]')"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(tool), "--no-cache", "--no-logo", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def python_only(directory: str, names: list[str]) -> set[str]:
    """copytree filter: packages and their modules, nothing else (no bundles, no caches)."""
    return {
        name
        for name in names
        if name == "__pycache__" or (not name.endswith(".py") and not (Path(directory) / name).is_dir())
    }


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the code and its contracts to break."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=python_only)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    for contract in ("Rooms", "daemon: cli over", "the pipelines know", "pipeline: demo", "No import cycles"):
        assert status_of(result.stdout, contract) == "KEPT"


def test_the_copy_keeps_every_contract(tree: Path) -> None:
    """The control for the cases below: the copy alone passes, so their failure is the added import."""
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr


# (module to add, its source, the contract that must break)
VIOLATIONS = {
    "storage imports pipeline": (
        "storage/_violation.py",
        "import pipeline.errors\n",
        "Rooms: daemon over pipeline | storage",
    ),
    "pipeline imports daemon": (
        "pipeline/_violation.py",
        "import daemon.config\n",
        "Rooms: daemon over pipeline | storage",
    ),
    "vocabulary imports storage": (
        "vocabulary/_violation.py",
        "import storage.errors\n",
        "Rooms: daemon over pipeline | storage",
    ),
    "dicom imports service": (
        "daemon/dicom/_violation.py",
        "import daemon.service.serve\n",
        "daemon: cli over http | demo over service",
    ),
    "service imports cli": (
        "daemon/service/_violation.py",
        "import daemon.cli.main\n",
        "daemon: cli over http | demo over service",
    ),
    "pipelines import the SCU": (
        "daemon/pipelines/_violation.py",
        "import daemon.dicom.scu\n",
        "daemon: the pipelines know nothing of DICOM networking",
    ),
    "writers import the runner": (
        "pipeline/writers/_violation.py",
        "import pipeline.runner\n",
        "pipeline: demo over runner over writers",
    ),
    "a cycle between two storage modules": (
        "storage/spool_helpers.py",
        "import storage.queue\n",
        "No import cycles",
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_a_violation_breaks_its_contract(tree: Path, case: str) -> None:
    path, source, contract = VIOLATIONS[case]
    (tree / path).write_text(source)
    if case.startswith("a cycle"):
        # storage.queue imports storage.spool_helpers, which imports storage.queue back.
        queue = tree / "storage" / "queue.py"
        queue.write_text("import storage.spool_helpers  # noqa: F401\n" + queue.read_text())
    result = lint_imports(tree)
    assert result.returncode != 0, f"{case}: lint-imports passed\n{result.stdout}"
    assert status_of(result.stdout, contract) == "BROKEN", result.stdout


def status_of(report: str, contract: str) -> str:
    """KEPT or BROKEN: the first verdict after the contract's name in the summary (names may wrap)."""
    assert contract in report, f"no contract named {contract!r} in:\n{report}"
    rest = report[report.index(contract) :]
    kept, broken = rest.find("KEPT"), rest.find("BROKEN")
    return "BROKEN" if broken != -1 and (kept == -1 or broken < kept) else "KEPT"
