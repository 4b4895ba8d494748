"""Which files the monitor follows: a log file, a run directory, or the newest run under results/train.

A run directory (results/train/{run}/) holds metrics.jsonl (one JSON object per
logging step), train.log (text) and, once a step is done, attempts.jsonl (one record per
attempt event: start, checkpoint, end; vlnflow.train.attempts). Steps come from metrics.jsonl
when the run has one, otherwise from train.log (a Hugging Face Trainer / tqdm log); train.log
is then still read for its cache status lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlnflow.errors import UserError
from vlnflow.train.attempts import ATTEMPTS_NAME

METRICS_NAME = "metrics.jsonl"
TEXT_LOG_NAME = "train.log"


@dataclass(frozen=True)
class RunSource:
    step_log: Path  # the file steps are read from
    status_log: Path | None = None  # a text log read only for cache status lines
    attempts_log: Path | None = None  # the run's attempts.jsonl (read whole at each report; may not exist yet)


def source_for_run_dir(run_dir: Path) -> RunSource:
    metrics, text_log, attempts = run_dir / METRICS_NAME, run_dir / TEXT_LOG_NAME, run_dir / ATTEMPTS_NAME
    if metrics.exists() or not text_log.exists():
        return RunSource(metrics, text_log, attempts)  # a run that has written nothing yet will write metrics.jsonl
    return RunSource(text_log, attempts_log=attempts)


def _last_write(run_dir: Path) -> float | None:
    times = [p.stat().st_mtime for p in (run_dir / METRICS_NAME, run_dir / TEXT_LOG_NAME) if p.is_file()]
    return max(times) if times else None


def newest_run_dir(results: Path) -> Path:
    """The run under `results`/train whose metrics.jsonl or train.log was written last."""
    train_dir = results / "train"
    runs = [(t, d) for d in (train_dir.iterdir() if train_dir.is_dir() else ()) if d.is_dir()
            if (t := _last_write(d)) is not None]
    if not runs:
        raise UserError(
            f"no training run under {train_dir} (a run directory holds {METRICS_NAME} or {TEXT_LOG_NAME}); "
            "pass a LOG file or RUN_DIR, or --results DIR"
        )
    return max(runs, key=lambda run: (run[0], run[1].name))[1]


def resolve_source(target: str | None, results: Path) -> RunSource:
    """`vlnflow monitor [LOG | RUN_DIR]` -> the files to follow."""
    if target is None:
        return source_for_run_dir(newest_run_dir(results))
    path = Path(target)
    if path.is_dir():
        return source_for_run_dir(path)
    if path.is_file():
        attempts = path.with_name(ATTEMPTS_NAME) if path.name == METRICS_NAME else None
        return RunSource(path, attempts_log=attempts)
    raise UserError(f"no such log file or run directory: {path}")
