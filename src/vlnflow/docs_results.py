"""The committed measurements under docs/results, each with where it came from.

Code that needs a measured default (the cache decision's rates, the memory plan's calibration)
reads it here from the results JSON a benchmark wrote, never from a literal copied out of
docs/benchmarks.md. A file's commit and date come from its own `provenance` block (written by
vlnflow.provenance), or, for files written before the scripts recorded it, from
docs/results/provenance.json (the commit they were committed in, and the later commits that
changed the code path they measure).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlnflow.errors import UserError

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
INDEX = "provenance.json"


@dataclass(frozen=True)
class Result:
    """One results file: its JSON, and the commit / date / card it was measured at."""

    name: str
    data: dict
    commit: str | None
    date: str | None
    card: str | None
    committed_in: str | None = None  # files without their own provenance: the commit that added them
    stale_since: tuple = field(default_factory=tuple)  # ({"commit", "what"}, ...) changes after the measurement

    @property
    def label(self) -> str:
        """e.g. 'docs/results/x.json (commit 1a2b3c4, 2026-12-02, NVIDIA H200)'."""
        if self.commit:
            at = f"commit {self.commit[:7]}"
        elif self.committed_in:
            at = f"tree committed in {self.committed_in[:7]}"
        else:
            at = "commit unknown"
        later = [s["commit"][:7] for s in self.stale_since]
        stale = f"; STALE: {', '.join(later[:2])}{f' +{len(later) - 2} more' if len(later) > 2 else ''} changed its code path" if later else ""
        return f"docs/results/{self.name} ({at}, {self.date or 'date unknown'}, {self.card or 'card unknown'}{stale})"


def load(name: str, root: Path | str | None = None) -> Result:
    """docs/results/`name` with its provenance; a missing or unreadable file is a UserError naming it."""
    root = Path(root) if root is not None else RESULTS
    path = root / name
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the committed results file {path}: {exc}") from None
    own = data.get("provenance")
    if own:
        return Result(name, data, own.get("commit"), own.get("date"), own.get("card"), stale_since=tuple(data.get("stale_since", ())))
    index = root / INDEX
    entry = json.loads(index.read_text()).get("files", {}).get(name) if index.exists() else None
    if entry is None:
        return Result(name, data, None, data.get("date"), data.get("device"))
    return Result(name, data, None, entry.get("date") or data.get("date"), entry.get("card") or data.get("device"),
                  committed_in=entry.get("committed_in"), stale_since=tuple(entry.get("stale_since", ())))  # fmt: skip


def available(root: Path | str | None = None) -> list[str]:
    """Names of the results JSON files (the provenance index left out)."""
    root = Path(root) if root is not None else RESULTS
    return sorted(p.name for p in root.glob("*.json") if p.name != INDEX)
