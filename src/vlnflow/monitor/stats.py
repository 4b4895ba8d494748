"""Turn the stream of log updates into what the monitor shows: s/it, steps/s, ETA and the latest values.

s/it is the median over the last N logged steps, so one slow step (a checkpoint save,
an evaluation pass) does not swing the ETA. A step's s/it is the value its log line
carries (`s_per_it` in metrics.jsonl, the rate of a tqdm bar); where a line has none it
is derived from the time between two logged steps.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from vlnflow.monitor.readers import Update


@dataclass(frozen=True)
class StepPoint:
    step: int
    t: float | None  # unix time (metrics.jsonl) or elapsed seconds (tqdm); only differences are used
    s_per_it: float | None
    data_wait_s: float | None


class RunState:
    """The last `window` + 1 distinct steps of one run plus the newest value of every key."""

    def __init__(self, window: int = 20):
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        self.window = window
        self.points: deque[StepPoint] = deque(maxlen=window + 1)
        self.latest: dict[str, Any] = {}
        self.restarts = 0  # times the step went backwards under the same max_steps (resume/new run)

    def update(self, update: Update) -> None:
        step = update.get("step")
        if step is not None:
            point = StepPoint(
                step=step,
                t=update.get("time", update.get("elapsed_s")),
                s_per_it=update.get("s_per_it"),
                data_wait_s=update.get("data_wait_s"),
            )
            last = self.points[-1] if self.points else None
            new_total = update.get("max_steps", self.latest.get("max_steps")) != self.latest.get("max_steps")
            if last is not None and (step < last.step or new_total):
                # another progress bar (a larger total) or the run restarted: start the window again
                if not new_total:
                    self.restarts += 1
                self.points.clear()
                last = None
            if last is not None and step == last.step:
                self.points[-1] = point  # the same step logged again (tqdm redraws): keep the newest
            else:
                self.points.append(point)
        self.latest.update(update)


@dataclass(frozen=True)
class Summary:
    step: int | None
    max_steps: int | None
    s_per_it: float | None  # median over the last `steps_in_median` steps
    steps_in_median: int
    steps_per_s: float | None
    eta_s: float | None
    data_wait_frac: float | None  # median share of a step spent waiting on the DataLoader
    latest: dict[str, Any]  # newest value of every key (loss, lr, cached_samples, ...)

    @property
    def finished(self) -> bool:
        return bool(self.latest.get("finished")) or (
            self.step is not None and self.max_steps is not None and self.step >= self.max_steps
        )


def step_durations(points: list[StepPoint]) -> list[float | None]:
    """Seconds per step at each point: its own s_per_it, else the time since the previous point per step."""
    durations: list[float | None] = []
    for i, p in enumerate(points):
        value = p.s_per_it
        if value is None and i > 0:
            prev = points[i - 1]
            if p.t is not None and prev.t is not None and p.step > prev.step:
                value = (p.t - prev.t) / (p.step - prev.step)
        durations.append(value)
    return durations


def summarize(state: RunState) -> Summary:
    points = list(state.points)
    durations = step_durations(points)
    recent = [(p, d) for p, d in zip(points, durations)][-state.window :]
    known = [d for _, d in recent if d is not None and d > 0]
    s_per_it = statistics.median(known) if known else None
    waits = [p.data_wait_s / d for p, d in recent if p.data_wait_s is not None and d]
    step = points[-1].step if points else None
    max_steps = state.latest.get("max_steps")
    eta = None
    if step is not None and max_steps is not None and s_per_it is not None:
        eta = max(0, max_steps - step) * s_per_it
    return Summary(
        step=step,
        max_steps=max_steps,
        s_per_it=s_per_it,
        steps_in_median=len(known),
        steps_per_s=1.0 / s_per_it if s_per_it else None,
        eta_s=eta,
        data_wait_frac=statistics.median(waits) if waits else None,
        latest=dict(state.latest),
    )


def format_duration(seconds: float) -> str:
    """Seconds -> `h:mm:ss` with unbounded hours (tqdm's style: 440:39:57)."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
