"""The repository stands alone: a clone in an empty folder (nothing beside it) runs the parity
tests and plans the whole workflow, so a dependence on anything outside the repository fails CI.

It clones the committed HEAD of this checkout; uncommitted edits are not part of the check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def lone_clone(tmp_path_factory) -> Path:
    empty = tmp_path_factory.mktemp("alone")
    clone = empty / "vlnflow"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    assert sorted(p.name for p in empty.iterdir()) == ["vlnflow"], "the clone must have nothing beside it"
    return clone


def _env(clone: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(clone / "src"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], clone: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=clone, env=_env(clone), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed in a lone clone ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_clone_names_no_path_outside_itself(lone_clone):
    outside = ".." + "/shared"  # spelt in two parts, so this file does not match itself
    found = subprocess.run(["git", "grep", "-n", "-F", outside], cwd=lone_clone, capture_output=True, text=True)
    assert found.returncode == 1 and not found.stdout, f"the repository names a folder beside itself:\n{found.stdout}"


@pytest.mark.slow
def test_parity_tests_pass_in_a_lone_clone(lone_clone):
    where = _run([sys.executable, "-c", "import vlnflow; print(vlnflow.__file__)"], lone_clone).stdout.strip()
    assert Path(where).is_relative_to(lone_clone), f"the clone imported vlnflow from {where}"
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_spatial_parity.py", "tests/test_spatial_causal.py"], lone_clone)
    assert " passed" in proc.stdout and " failed" not in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_workflow_plans_in_a_lone_clone(lone_clone):
    proc = _run([str(BIN / "snakemake"), "-n", "-c", "1", "all"], lone_clone)
    assert "This was a dry-run" in proc.stdout and "validate_cache" in proc.stdout, proc.stdout[-2000:]
