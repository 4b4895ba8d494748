"""The attempts of one training run: attempts.jsonl in the run directory, one JSON line per event.

Why: a long run on a time-limited or preempted partition is several Slurm job runs (attempts).
To judge what the stops cost, `vlnflow monitor` and the benchmark report show each attempt: the
steps it did, why it ended, and the time the restart lost (from the previous attempt's end to this
attempt's first step: requeue wait, job start, model build, checkpoint load).

Rank 0 appends, never rewrites (Snakemake does not know this file, so it is never deleted):

    {"event": "start", "attempt": 2, "time": <first step done>, "launched": <launch began>,
     "resumed_step": 120, "job_id": "41", "host": "gpu01", "world_size": 16}
    {"event": "checkpoint", "attempt": 2, "step": 200, "time": ...}
    {"event": "end", "attempt": 2, "step": 240, "reason": "max_hours", "why": "...", "time": ...}

`reason` is "done" (the run reached its last step), "stop_request" or "max_hours"
(vlnflow.train.stop). An attempt with no end record crashed or was killed (or is still running,
when it is the last one). A run that restores no checkpoint starts the file anew.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

ATTEMPTS_NAME = "attempts.jsonl"


class AttemptLog:
    """Rank 0's writer for the current attempt (the other ranks hold a disabled one)."""

    def __init__(self, path: Path, enabled: bool, attempt: int, resumed_step: int, launched: float):
        self.path, self.enabled = path, enabled
        self.attempt, self.resumed_step, self.launched = attempt, resumed_step, launched
        self._started = False

    @classmethod
    def begin(cls, run_dir: str | Path, *, enabled: bool, resumed_step: int, fresh: bool, launched: float) -> AttemptLog:
        path = Path(run_dir) / ATTEMPTS_NAME
        if enabled and fresh:
            path.unlink(missing_ok=True)
        earlier = [r for r in read_records(path) if r.get("event") == "start"] if enabled else []
        return cls(path, enabled, len(earlier) + 1, resumed_step, launched)

    def _write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "attempt": self.attempt, **fields, "time": time.time()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def step_done(self, world_size: int) -> None:
        """Called after every optimizer step; the first one writes the attempt's start record."""
        if self._started:
            return
        self._started = True
        self._write("start", launched=self.launched, resumed_step=self.resumed_step,
                    job_id=os.environ.get("SLURM_JOB_ID") or None, host=socket.gethostname(), world_size=world_size)

    def checkpoint(self, step: int) -> None:
        self._write("checkpoint", step=step)

    def end(self, step: int, reason: str, why: str | None = None) -> None:
        self._write("end", step=step, reason=reason, why=why)


def read_records(path: str | Path) -> list[dict]:
    """The JSON objects of an attempts file (missing file: none; unreadable lines are skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("attempt"), int):
            records.append(record)
    return records


@dataclass(frozen=True)
class Attempt:
    """One attempt as the monitor and the report show it."""

    number: int
    job_id: str | None
    host: str | None
    launched: float | None
    first_step_time: float | None
    resumed_step: int
    last_step: int | None  # the end record's step, else the last checkpoint's (a lower bound)
    ended: float | None  # the end record's time
    reason: str | None  # done / stop_request / max_hours; None without an end record
    why: str | None
    last_seen: float | None  # the newest record's time
    restart_lost_s: float | None  # first step - the previous attempt's end (or last record, if it crashed)

    @property
    def steps_done(self) -> int | None:
        return None if self.last_step is None else self.last_step - self.resumed_step

    def outcome(self, is_last: bool) -> str:
        if self.reason:
            return self.reason
        return "running (or killed)" if is_last else "crashed or killed (no end record)"


def summarize(records: list[dict]) -> list[Attempt]:
    """Group the records by attempt (in file order) into Attempts, with the restart time each lost."""
    by_number: dict[int, list[dict]] = {}
    for record in records:
        by_number.setdefault(record["attempt"], []).append(record)
    attempts: list[Attempt] = []
    for number in sorted(by_number):
        rows = by_number[number]
        start = next((r for r in rows if r.get("event") == "start"), {})
        end = next((r for r in rows if r.get("event") == "end"), None)
        checkpoints = [r["step"] for r in rows if r.get("event") == "checkpoint" and isinstance(r.get("step"), int)]
        last_step = end.get("step") if end else (max(checkpoints) if checkpoints else None)
        times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
        previous = attempts[-1] if attempts else None
        lost = None
        if previous is not None and start.get("time") is not None:
            since = previous.ended if previous.ended is not None else previous.last_seen
            lost = start["time"] - since if since is not None else None
        attempts.append(Attempt(
            number=number, job_id=start.get("job_id"), host=start.get("host"), launched=start.get("launched"),
            first_step_time=start.get("time"), resumed_step=int(start.get("resumed_step") or 0), last_step=last_step,
            ended=end.get("time") if end else None, reason=end.get("reason") if end else None,
            why=end.get("why") if end else None, last_seen=max(times) if times else None, restart_lost_s=lost,
        ))
    return attempts


def read_attempts(path: str | Path) -> list[Attempt]:
    return summarize(read_records(path))
