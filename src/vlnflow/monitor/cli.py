"""`vlnflow monitor [LOG | RUN_DIR]`: follow a training run and print s/it, steps/s, ETA, loss, cache counts,
its attempts (stop reasons, restart time lost) and GPU memory."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from vlnflow.errors import UserError
from vlnflow.monitor.gpu import GpuReading, read_gpu_memory
from vlnflow.monitor.readers import LogFollower
from vlnflow.monitor.report import format_report
from vlnflow.monitor.sources import RunSource, resolve_source
from vlnflow.monitor.stats import RunState, Summary, summarize
from vlnflow.train.attempts import Attempt, read_attempts

STATUS_KEYS = ("cache_manifest", "cached_batches")  # what the status log contributes next to metrics.jsonl


class RunFollower:
    """The followers and statistics of one run source."""

    def __init__(self, source: RunSource, window: int):
        self.source = source
        self.steps = LogFollower(source.step_log)
        self.status = LogFollower(source.status_log) if source.status_log else None
        self.state = RunState(window)

    def poll(self) -> Summary:
        for update in self.steps.poll():
            self.state.update(update)
        if self.status is not None:
            for update in self.status.poll():
                kept = {k: v for k, v in update.items() if k in STATUS_KEYS}
                if kept:
                    self.state.update(kept)
        return summarize(self.state)

    def attempts(self) -> list[Attempt]:
        """The run's attempts (a small file, read whole each time)."""
        return read_attempts(self.source.attempts_log) if self.source.attempts_log else []

    def problems(self) -> list[str]:
        found = []
        for follower in (self.steps, self.status):
            if follower is None:
                continue
            if follower.bad_lines:
                found.append(f"{follower.bad_lines} unreadable line(s) in {follower.path} (first: {follower.first_bad})")
            if follower.restarts:
                found.append(f"{follower.path} shrank or was replaced {follower.restarts} time(s); read again from the start")
        if self.state.restarts:
            found.append(f"step went backwards {self.state.restarts} time(s) (new run or resume); s/it restarted")
        return found


def monitor(
    target: str | None,
    *,
    results: str | Path = "results",
    interval: float = 10.0,
    window: int = 20,
    once: bool = False,
    iterations: int | None = None,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    read_gpus: Callable[[], GpuReading] = read_gpu_memory,
) -> int:
    """Print a report every `interval` s; `once` prints one (raising UserError if there is no step yet).

    `iterations` bounds the number of reports (None: until interrupted); `clock`, `sleep`
    and `read_gpus` are parameters so tests can drive the loop without waiting.
    """
    if not interval > 0:
        raise UserError(f"--interval must be > 0 seconds, got {interval}")
    if window < 1:
        raise UserError(f"--window must be >= 1 step, got {window}")
    out = out or sys.stdout
    results = Path(results)
    run = RunFollower(resolve_source(target, results), window)
    reports = 0
    while True:
        if target is None or not run.source.step_log.exists():
            # the newest run may change; a run dir may start a train.log instead of metrics.jsonl
            source = resolve_source(target, results)
            if source != run.source:
                run = RunFollower(source, window)
        summary = run.poll()
        log = run.source.step_log
        print(
            format_report(summary, read_gpus(), log=log, now=clock(), log_exists=log.exists(), problems=run.problems(),
                          attempts=run.attempts()),
            file=out,
            flush=True,
        )
        if once:
            if summary.step is None:
                raise UserError(f"nothing to read yet: {log} has no complete training step")
            return 0
        reports += 1
        if iterations is not None and reports >= iterations:
            return 0
        sleep(interval)


def _run(args: argparse.Namespace) -> int:
    try:
        return monitor(args.target, results=args.results, interval=args.interval, window=args.window, once=args.once)
    except BrokenPipeError:  # `vlnflow monitor | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="follow a training run: s/it, steps/s, ETA, loss, cached/live samples, GPU memory",
        description=__doc__,
    )
    parser.add_argument(
        "target",
        nargs="?",
        metavar="LOG | RUN_DIR",
        help="metrics.jsonl, a Trainer/tqdm text log, or a run directory (default: newest run under RESULTS/train)",
    )
    parser.add_argument("--results", default="results", help="results directory searched for runs (default: results)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between reports (default: 10)")
    parser.add_argument("--window", type=int, default=20, help="s/it is the median of the last N logged steps (default: 20)")
    parser.add_argument("--once", action="store_true", help="print one report and exit (non-zero if no step yet)")
    parser.set_defaults(func=_run)
