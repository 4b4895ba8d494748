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
