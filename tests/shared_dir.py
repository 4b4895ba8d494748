"""Where ../shared (read-only project material: parity fixtures) is for this checkout.

CI keeps a copy of shared/ beside the clone; a clone made elsewhere for a local check
(`git clone . $(mktemp -d)`) finds it beside the checkout it was cloned from (its origin).
VLNFLOW_SHARED overrides both. A missing folder is the test's failure, never a skip.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    candidates = []
    if os.environ.get("VLNFLOW_SHARED"):
        candidates.append(Path(os.environ["VLNFLOW_SHARED"]))
    candidates.append(REPO.parent / "shared")
    try:
        origin = subprocess.run(["git", "-C", str(REPO), "remote", "get-url", "origin"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared")
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[0]  # the tests then fail naming this path
