"""After a clean stop inside a Slurm job: put the same job back in the queue instead of failing it.

Why: a stop at the time limit or on preemption is not a crash, so it must not use up the
profile's `retries` (each one a new job that Snakemake counts). `scontrol requeue $SLURM_JOB_ID`
sends the job back to PENDING under the same job id; the Slurm executor plugin reads REQUEUED
and PENDING as "still running" and waits, and the job's next run resumes from the stop's
checkpoint. This process then exits at once: Snakemake inside this run of the job reports a failed
job and removes its outputs (the next run rebuilds metrics.jsonl from the checkpoint), which the
requeue overrides. Waiting for Slurm's SIGTERM instead is no safer: where Slurm tracks processes
by parentage (proctrack/linuxproc), a waiting process whose parents died escapes the SIGKILL and
would act later, beside the next run. Slurm holds a requeued job for AuthInfo's cred_expire
(120 s by default, Reason=BeginTime) before it can start again.

The bound: `train.max_requeues` requeues of one Slurm job (its `Restarts` count, which also
counts Slurm's own requeues after a node failure or preemption). Past it, or outside Slurm, or
where the site refuses the requeue, the job exits 75: a failed job, which Snakemake's retries
resubmit and which resumes from the same checkpoint.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import TextIO

from vlnflow.train.stop import EXIT_STOPPED

def _scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)


def slurm_restarts(job_id: str) -> int | None:
    """How often Slurm job `job_id` was requeued so far (`scontrol show job`'s Restarts), None if unknown."""
    try:
        proc = _scontrol("show", "job", "-o", job_id)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bRestarts=(\d+)", proc.stdout)
    return int(match.group(1)) if proc.returncode == 0 and match else None


def requeue_after_stop(job_id: str | None, max_requeues: int, log: TextIO, stopped: str = "") -> int:
    """Requeue Slurm job `job_id` after the trainer stopped cleanly (`stopped` says where and why);
    returns the exit code to end with: EXIT_STOPPED, which fails this run of the job (overridden by a
    requeue; without one, Snakemake's retries take over)."""

    def say(line: str) -> None:  # the rule log (cleared by Snakemake before the next run) and the Slurm log
        for out in (log, sys.stderr):
            out.write(f"[vlnflow train job] {line}\n")
            out.flush()

    say(f"training stopped on request{' ' + stopped if stopped else ''}; its checkpoint is complete")
    if not job_id:
        say(f"stopped on request; not in a Slurm job, so exiting {EXIT_STOPPED}: run it again to resume")
        return EXIT_STOPPED
    restarts = slurm_restarts(job_id)
    if restarts is None:
        say(f"cannot read Slurm job {job_id}'s restart count (scontrol show job); not requeueing, exiting "
            f"{EXIT_STOPPED} (Snakemake's retries resume the run)")
        return EXIT_STOPPED
    if restarts >= max_requeues:
        say(f"Slurm job {job_id} was requeued {restarts} time(s), train.max_requeues is {max_requeues}: not "
            f"requeueing again, exiting {EXIT_STOPPED} (Snakemake's retries resume the run)")
        return EXIT_STOPPED
    proc = _scontrol("requeue", job_id)
    if proc.returncode != 0:
        say(f"scontrol requeue {job_id} failed ({proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}); "
            f"exiting {EXIT_STOPPED} (Snakemake's retries resume the run; submit with --requeue, the profile's "
            f"slurm-requeue: true, where the site does not allow requeueing by default)")
        return EXIT_STOPPED
    say(f"requeued Slurm job {job_id} (requeue {restarts + 1} of at most {max_requeues}, train.max_requeues); "
        f"its next run resumes from the stop's checkpoint. Snakemake in this run reports the job as failed "
        f"(exit {EXIT_STOPPED}): the requeue overrides that, no retry is used.")
    return EXIT_STOPPED
