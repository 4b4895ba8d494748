"""Route a workflow script's logging (and uncaught errors) to the rule's `log:` file and stderr."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(log_path: str | Path | None, level: int = logging.INFO) -> logging.Logger:
    """Log to the rule's log file and to stderr; returns the root logger."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    sys.excepthook = _log_uncaught  # the error that ends the job belongs in the log Snakemake points to
    return logging.getLogger()


def _log_uncaught(exc_type, exc, tb) -> None:
    logging.getLogger().critical("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))


def process_started_at(pid: int | None = None) -> float | None:
    """Epoch seconds at which a process (default: this one) started, from /proc (Linux); None elsewhere.

    A job's stats measure its set-up from here, so the interpreter start and its imports count too."""
    import os

    try:
        ticks = int(Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
