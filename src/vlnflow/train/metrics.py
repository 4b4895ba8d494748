"""Per-step training metrics as JSON lines (read by `vlnflow monitor` and the benchmark report)."""

from __future__ import annotations

import contextlib
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

    def __init__(self, path: str | Path, enabled: bool = True, append: bool = False):
        """`append` continues a resumed run's log; a fresh run starts a new file."""
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if append else "w")

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self.enabled:
            self._fh.close()


class PhaseTimer:
    """Seconds per step spent in forward / backward / optimizer step, for finding what limits a step.

    Off by default: timing a phase means synchronising the GPU at its edges, which costs a little.
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict:
        """{"forward_s": ..., ...} accumulated since the last call (empty when disabled)."""
        out = {f"{k}_s": v for k, v in self.totals.items()}
        self.totals = {}
        return out
