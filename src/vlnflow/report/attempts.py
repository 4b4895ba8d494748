"""Report section "Training attempts": each Slurm job run of the training, why it ended, what the restart cost.

Read from the run's attempts.jsonl (vlnflow.train.attempts), which lies beside its metrics.jsonl;
a run without one (trained before attempts were recorded) gets no section. Restart lost = the
previous attempt's end (its last record, when it crashed) to this attempt's first optimizer step:
requeue wait, job start, model build and checkpoint load, plus any steps a crash made it redo.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from vlnflow.train.attempts import ATTEMPTS_NAME, Attempt, read_attempts


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def attempt_row(a: Attempt, is_last: bool) -> list[str]:
    first = a.resumed_step + 1
    steps = f"{first}-{a.last_step}" if a.last_step is not None else f"{first}-"
    done = "" if a.steps_done is None or a.reason is None else str(a.steps_done)
    lost = "" if a.restart_lost_s is None else f"{a.restart_lost_s:,.0f}"
    why = f" ({a.why})" if a.why and a.reason != "done" else ""
    return [str(a.number), a.job_id or "", a.host or "", steps, done, _when(a.ended), f"{a.outcome(is_last)}{why}", lost]


def attempts_markdown(metrics_paths: list[str]) -> str:
    """The section for the run whose metrics.jsonl is first in `metrics_paths`; "" without attempts."""
    if not metrics_paths:
        return ""
    path = Path(metrics_paths[0]).with_name(ATTEMPTS_NAME)
    attempts = read_attempts(path)
    if not attempts:
        return ""
    header = ["attempt", "Slurm job", "host", "steps", "steps done", "ended (UTC)", "stop reason", "restart lost s"]
    rows = [attempt_row(a, a is attempts[-1]) for a in attempts]
    lines = ["", "## Training attempts", "",
             f"From `{path}`: one row per run of the training job (a Slurm requeue or a Snakemake retry starts a new "
             "one). Stop reasons: done, stop_request (Slurm's warning signal or a stop_request file), max_hours "
             "(train.max_hours); an attempt without an end record crashed or was killed. Restart lost: from the "
             "previous attempt's end (or its last record) to this attempt's first step.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lost = [a.restart_lost_s for a in attempts if a.restart_lost_s is not None]
    if lost:
        lines += ["", f"Restarts lost {sum(lost):,.0f} s in all over {len(lost)} restart(s)."]
    return "\n".join(lines) + "\n"
