"""Where a measured number comes from: commit, dirty flag, command, card, versions, date, repetitions.

Every bench/ script puts `provenance(...)` at the top of its results JSON, so a figure in
docs/benchmarks.md can be traced to the code that produced it and re-run from the same commit.

The commit comes from VLNFLOW_COMMIT and VLNFLOW_DIRTY when whoever copied the tree set them
(a lent GPU machine gets a copy of the working tree, whose .git may be stale), else from git:

    VLNFLOW_COMMIT=$(git rev-parse HEAD) VLNFLOW_DIRTY=$(git status --porcelain -uno | grep -q . && echo 1 || echo 0)

(`python -m vlnflow.provenance` prints those two assignments for the current checkout).
`commit_source` says which was used: "git", "env", or "unknown" when neither was available.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMIT_ENV, DIRTY_ENV = "VLNFLOW_COMMIT", "VLNFLOW_DIRTY"
# distribution name -> key in the JSON; flash-attn-4 is optional (the gpu extra)
PACKAGES = {"torch": "torch", "transformers": "transformers", "deepspeed": "deepspeed", "flash-attn-4": "flash_attn_4"}


def _git(*args: str, repo: Path = REPO) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _flag(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no", ""):
        return False
    raise ValueError(f"{name}={value!r}: expected 1/0, true/false or yes/no")


def commit_info(repo: Path = REPO, environ: dict | None = None) -> dict:
    """{"commit", "dirty", "commit_source"}: VLNFLOW_COMMIT / VLNFLOW_DIRTY when set, else git.

    The variables win because whoever sets them copied the tree and knows its commit, while a copy can carry
    a stale .git (the lent GPU machine's copy reported the session's first commit on 2026-12-07). dirty counts
    changes to tracked files only (results written into an untracked folder do not count).
    """
    env = os.environ if environ is None else environ
    if env.get(COMMIT_ENV):
        dirty = _flag(env[DIRTY_ENV], DIRTY_ENV) if DIRTY_ENV in env else None
        return {"commit": env[COMMIT_ENV].strip(), "dirty": dirty, "commit_source": "env"}
    if (repo / ".git").exists():
        commit = _git("rev-parse", "HEAD", repo=repo)
        status = _git("status", "--porcelain", "--untracked-files=no", repo=repo)
        if commit is not None and status is not None:
            return {"commit": commit, "dirty": bool(status), "commit_source": "git"}
    return {"commit": None, "dirty": None, "commit_source": "unknown"}


def versions() -> dict:
    """python, torch, transformers, deepspeed, flash-attn-4 (None where not installed), CUDA / cuDNN of torch."""
    out = {"python": platform.python_version()}
    for dist, key in PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    try:
        import torch

        out["torch"] = torch.__version__  # the build string (+cu130 / +cpu), which metadata may lack
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except ImportError:
        out["cuda"] = out["cudnn"] = None
    return out


def card(device=None) -> dict:
    """{"card": GPU name or "cpu", "gpus": visible GPU count}; `device` picks the GPU (default: current)."""
    try:
        import torch
    except ImportError:
        return {"card": "cpu", "gpus": 0}
    if device is not None and torch.device(device).type != "cuda":
        return {"card": "cpu", "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if not torch.cuda.is_available():
        return {"card": "cpu", "gpus": 0}
    return {"card": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count()}


def command(argv: list[str] | None = None) -> str:
    """The command line as typed: interpreter name + script + arguments (shell-quoted)."""
    argv = sys.argv if argv is None else argv
    return shlex.join([Path(sys.executable).name, *argv])


def provenance(repetitions, *, argv: list[str] | None = None, device=None) -> dict:
    """The block every results JSON starts with.

    `repetitions`: the timed repetitions per case (an int when every case has the same count, else
    {case: count}); a figure with fewer than 10 should carry its spread (vlnflow.timing).
    """
    return {
        **commit_info(),
        "command": command(argv),
        **card(device),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repetitions": repetitions,
    }


def main() -> int:
    info = commit_info()
    if info["commit_source"] != "git":
        print(f"no git checkout at {REPO}", file=sys.stderr)
        return 1
    print(f"{COMMIT_ENV}={info['commit']} {DIRTY_ENV}={int(info['dirty'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
