"""Shared fixtures: a small demo data set and a throw-away copy of the workflow to run Snakemake in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "rules", "workflow_scripts", "envs")
BIN = Path(sys.executable).parent
DEMO_SIZE = (96, 72)  # small frames keep the tests quick; the format is the same as 640x480
DEMO_EPISODES = 14  # the tests' demo: fewer episodes than `vlnflow demo-data` writes, same generator


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A demo data set (both formats, 14 episodes, 96x72 frames) shared by the session: treat it as read-only.

    <demo>/episodes is an episode-format root, <demo> itself an annotations-format root. Copy it
    (shutil.copytree) before changing anything.
    """
    from vlnflow.data.demo import make_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    make_demo(str(out), n_episodes=DEMO_EPISODES, size=DEMO_SIZE)
    return out


class WorkflowCopy:
    """The workflow files copied into a temporary folder, with config overrides and a Snakemake runner."""

    def __init__(self, path: Path):
        self.path = path

    def configure(self, overrides: dict) -> None:
        """Deep-merge overrides into the copy's config.yaml."""
        from vlnflow.config import deep_merge

        config_path = self.path / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) or {}
        config_path.write_text(yaml.safe_dump(deep_merge(config, overrides), sort_keys=False))

    def snakemake(self, *args: str, check: bool = True, cores: int = 1) -> subprocess.CompletedProcess:
        """Run `snakemake -c <cores> ARGS` in the copy; on failure with check=True the assertion shows the output."""
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
        cmd = [str(BIN / "snakemake"), "-c", str(cores), *args]
        proc = subprocess.run(cmd, cwd=self.path, env=env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


def copy_workflow(dest: Path) -> WorkflowCopy:
    """Copy Snakefile, config.yaml, rules/, workflow_scripts/ and envs/ into the new folder `dest`; its config.yaml
    gets train_helpers.TEST_SETTINGS (the sizes the workflow tests were written for)."""
    from train_helpers import TEST_SETTINGS

    dest.mkdir()
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    copy = WorkflowCopy(dest)
    copy.configure(TEST_SETTINGS)
    return copy


@pytest.fixture
def workflow_copy(tmp_path) -> WorkflowCopy:
    """A fresh copy of the workflow under tmp_path/workflow."""
    return copy_workflow(tmp_path / "workflow")
