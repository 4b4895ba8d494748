"""Per-step training metrics as JSON lines (read by `vlnflow monitor` and the benchmark report)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def gpu_memory_gib() -> list[float]:
    """Peak allocated memory of each local GPU since the last reset, GiB; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]


class MetricsLog:
    """Append-only metrics.jsonl; each line is flushed so a follower never waits on a buffer."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a")

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
