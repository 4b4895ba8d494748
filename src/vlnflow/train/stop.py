"""Stopping a training run cleanly before Slurm ends it: the request, the ranks' agreement, the exit status.

Why: a job that Slurm ends at its time limit (or preempts) loses every step since the last
periodic checkpoint. Instead, a warning asks the run to stop; every rank finishes its optimizer
step, the ranks agree on one step (one all-reduce per step, so ranks that see the request at
different moments never wait on each other), save a complete checkpoint there and exit with
EXIT_STOPPED ("stopped on request, resume me").

How a request arrives:
- a stop-request file (`stop_request` in the run directory). `vlnflow launch --stop-file PATH`
  writes it when it (or, under Slurm, its node agent on any node) gets SIGUSR1, and exports its
  path to every rank as VLNFLOW_STOP_FILE; anyone may also create it by hand. The launch makes
  torchrun and the ranks ignore SIGUSR1 (an ignored signal stays ignored across fork and exec),
  so the Slurm warning, which reaches every process of the job step, kills nothing.
- SIGUSR1 to a trainer run on its own (`python -m vlnflow.train.run`, no launch).
- train.max_hours: the run stops at the last step boundary from which one more step and a
  checkpoint save still fit in its budget, counted from VLNFLOW_LAUNCHED_AT (set by the launch)
  or from the trainer's start.

After the stop's checkpoint, rank 0 writes `stopped.json` beside the request file. Under a launch
the ranks then exit 0 (torchrun and srun treat any other exit as a crash and kill the siblings)
and the launch, finding stopped.json, exits EXIT_STOPPED; a trainer run on its own exits
EXIT_STOPPED itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vlnflow.train")

EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: stopped on request after a complete checkpoint; run again to resume
STOP_SIGNAL = signal.SIGUSR1
STOP_FILE_ENV = "VLNFLOW_STOP_FILE"
LAUNCHED_AT_ENV = "VLNFLOW_LAUNCHED_AT"
REQUEST_NAME = "stop_request"
STOPPED_NAME = "stopped.json"

# Why a run stops: agreed with an all-reduce MAX of these codes, so any rank's reason wins.
REASONS = {0: None, 1: "stop_request", 2: "max_hours"}
CODES = {name: code for code, name in REASONS.items() if name}


def request_path(run_dir: str | Path) -> Path:
    """Where a run's stop request lives (the workflow passes it to `vlnflow launch --stop-file`)."""
    return Path(run_dir) / REQUEST_NAME


def stopped_path(request_file: str | Path) -> Path:
    """The marker the trainer leaves beside the request file after a stop's checkpoint is complete."""
    return Path(request_file).with_name(STOPPED_NAME)


def _write_json(path: Path, record: dict) -> None:
    """Write whole or not at all (a reader on another node never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def write_request(path: str | Path, why: str) -> None:
    _write_json(Path(path), {"why": why, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})


def read_record(path: str | Path) -> dict | None:
    """A request or stopped marker as a dict; None when absent; {} when unreadable (still a request)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


# ---- the launch side: turn SIGUSR1 into a request file -----------------------------------------------


def clear_stale(request_file: str | Path) -> None:
    """Before starting the ranks: a request or marker left by an earlier attempt must not stop this one."""
    for path in (Path(request_file), stopped_path(request_file)):
        if path.exists():
            print(f"[vlnflow launch] removing {path} left by an earlier attempt", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)


def catch_stop_signal(request_file: str | Path, where: str) -> None:
    """From now on SIGUSR1 writes the stop request (the launch and each node agent call this)."""
    def on_signal(signum, _frame):
        why = f"{signal.Signals(signum).name} on {where}"
        write_request(request_file, why)
        print(f"[vlnflow launch] {why}: asked the ranks to stop at the next step ({request_file})",
              file=sys.stderr, flush=True)

    signal.signal(STOP_SIGNAL, on_signal)


class ChildrenIgnoreStopSignal:
    """`with ChildrenIgnoreStopSignal(): Popen(...)`: children start with SIGUSR1 ignored (inherited by
    torchrun, the ranks and their DataLoader workers, whatever their start method); this process's own
    handler is put back afterwards."""

    def __enter__(self):
        self._previous = signal.signal(STOP_SIGNAL, signal.SIG_IGN)
        return self

    def __exit__(self, *exc):
        signal.signal(STOP_SIGNAL, self._previous)


# ---- the trainer side ---------------------------------------------------------------------------------


def agree(dist, local_code: int, device) -> int:
    """The stop code every rank acts on: the largest any rank holds (one all-reduce, every rank calls it
    at every step boundary, so a rank that saw nothing still takes part and nobody waits)."""
    import torch

    flag = torch.tensor([local_code], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


@dataclass
class TimeBudget:
    """train.max_hours: is there room for one more step and a checkpoint save?

    `observe` is fed the time between two step boundaries and whether a checkpoint was saved in it;
    the reserve is the longest plain step plus the longest extra a save added (unknown until the
    attempt's first save: leave the job's time limit one save above max_hours).
    """

    budget_s: float
    started: float
    longest_step: float = 0.0
    longest_save: float = 0.0

    def observe(self, interval: float, saved: bool) -> None:
        if saved:
            self.longest_save = max(self.longest_save, interval - self.longest_step)
        else:
            self.longest_step = max(self.longest_step, interval)

    def exhausted(self, now: float) -> bool:
        return now - self.started + self.longest_step + self.longest_save >= self.budget_s


def launched_at(environ=os.environ) -> float:
    """When this attempt began: the launch's start (shared by all ranks) or now."""
    value = environ.get(LAUNCHED_AT_ENV)
    return float(value) if value else time.time()


@dataclass
class StopControl:
    """Per-rank stop state; `check` at every step boundary (all ranks) says whether to stop there."""

    dist: object
    device: object
    total: int
    request_file: Path | None  # from VLNFLOW_STOP_FILE (set by vlnflow launch); None when run alone
    budget: TimeBudget | None
    reason: str | None = None  # the agreed reason once stopping
    why: str | None = None  # what this rank knows about it ("SIGUSR1 on node n1 ...")
    _signalled: str | None = None
    _last: float | None = None  # the previous step boundary (the first step, with the warm-up, is not timed)

    @classmethod
    def for_run(cls, tcfg: dict, dist, device, total: int, environ=os.environ) -> StopControl:
        request = environ.get(STOP_FILE_ENV)
        hours = tcfg.get("max_hours")
        budget = TimeBudget(hours * 3600.0, launched_at(environ)) if hours else None
        control = cls(dist, device, total, Path(request) if request else None, budget)
        control._catch_signal_when_alone()
        return control

    def _catch_signal_when_alone(self) -> None:
        """Run on its own (SIGUSR1 at its default, deadly action) the trainer catches the signal itself;
        under vlnflow launch it is ignored and the request file is the only way in."""
        if signal.getsignal(STOP_SIGNAL) is not signal.SIG_DFL:
            return

        def on_signal(signum, _frame):
            self._signalled = f"{signal.Signals(signum).name} to pid {os.getpid()}"

        signal.signal(STOP_SIGNAL, on_signal)

    @property
    def stopped_file(self) -> Path | None:
        return stopped_path(self.request_file) if self.request_file else None

    def local_code(self, now: float) -> int:
        """What this rank alone sees now: a request (signal or file) or an exhausted budget."""
        if self._signalled:
            self.why = self._signalled
            return CODES["stop_request"]
        if self.request_file is not None:
            record = read_record(self.request_file)
            if record is not None:
                self.why = record.get("why") or f"{self.request_file} exists"
                return CODES["stop_request"]
        if self.budget is not None and self.budget.exhausted(now):
            self.why = f"train.max_hours {self.budget.budget_s / 3600:g} h: no room for another step and a save"
            return CODES["max_hours"]
        return 0

    def check(self, step: int, saved: bool) -> bool:
        """True when the ranks agreed to stop after `step` (never at the last step: that one ends the run)."""
        now = time.time()
        if self.budget is not None and self._last is not None:
            self.budget.observe(now - self._last, saved)
        self._last = now
        if step >= self.total:
            return False
        code = agree(self.dist, self.local_code(now), self.device)
        if code:
            self.reason = REASONS[code]
            self.why = self.why or "another rank saw it"
            log.info("stopping after step %d of %d: %s (%s)", step, self.total, self.reason, self.why)
        return bool(code)

    def finish(self, step: int, is_rank0: bool) -> None:
        """After the stop's checkpoint is complete on every rank: rank 0 leaves the marker for the launch
        and consumes the request, so a resumed attempt does not stop at once."""
        if self.reason is None or not is_rank0 or self.request_file is None:
            return  # the run ended at its last step (or this rank has nothing to write)
        _write_json(self.stopped_file, {"step": step, "reason": self.reason, "why": self.why, "time": time.time()})
        self.request_file.unlink(missing_ok=True)


def exit_code_after(summary: dict, environ=os.environ) -> int:
    """A rank's exit status: EXIT_STOPPED after a stop when run alone; 0 under vlnflow launch, which
    reports the stop itself (a non-zero rank would make torchrun kill the others)."""
    if summary.get("stopped") and not environ.get(STOP_FILE_ENV):
        return EXIT_STOPPED
    return 0
