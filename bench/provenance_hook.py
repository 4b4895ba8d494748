"""PROVENANCE HOOK for the issue-21 benchmarks (bench_precompute.py, bench_decode.py): commit, machine and versions.

Another branch adds `vlnflow.provenance` (commit/card/versions in every results JSON). Until it is merged this
falls back to a minimal record of its own; when it is, `provenance()` returns that module's record (called as
`vlnflow.provenance.collect(argv)` if it has such a function; adapt the one call below when merging).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def provenance(argv: list[str] | None = None) -> dict:
    argv = sys.argv if argv is None else argv
    try:
        from vlnflow import provenance as shared  # noqa: F401 - the other branch's module, once merged
    except ImportError:
        shared = None
    if shared is not None and hasattr(shared, "collect"):
        return {"source": "vlnflow.provenance", **shared.collect(argv)}
    return {"source": "bench/provenance_hook.py (fallback)", **_fallback(argv)}


def _fallback(argv: list[str]) -> dict:
    import torch

    info = {
        "command": " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    for name in ("snakemake", "PIL", "h5py", "transformers"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    if os.environ.get("VLNFLOW_COMMIT"):  # set by whoever copied the tree (a copy's .git can be stale)
        info.update(commit=os.environ["VLNFLOW_COMMIT"], dirty=os.environ.get("VLNFLOW_DIRTY"), commit_source="environment")
    else:
        try:
            run = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
            info.update(commit=run("rev-parse", "HEAD"), dirty=bool(run("status", "--porcelain")), commit_source="git")
        except (OSError, subprocess.CalledProcessError):
            info.update(commit=None, dirty=None, commit_source="unknown: no git and no VLNFLOW_COMMIT")
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def card_slug(card: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', 'cpu' -> 'cpu': for result file names."""
    for word in card.lower().replace("-", " ").split():
        if word[:1] in "habl" and word[1:2].isdigit():
            return word
    return "cpu" if card == "cpu" else "".join(c for c in card.lower() if c.isalnum())[:16]
