"""What the `train` rule runs: freeze the effective config into the run dir, then `vlnflow launch`.

The config file written here is what every rank (on every node) reads, so `--config`
overrides given to Snakemake reach training exactly as the workflow saw them. The launch gets
the run's stop-request file (vlnflow.train.stop); when the training stopped on request (exit 75)
the Slurm job is requeued (vlnflow.workflow.requeue) rather than failed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from vlnflow.train.stop import EXIT_STOPPED, read_record, request_path, stopped_path
from vlnflow.workflow.requeue import requeue_after_stop


def run_train_job(config: dict, run_dir: str | Path, log_path: str | Path, *, use_cache: bool = True,
                  max_steps: int | None = None) -> int:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / ("config.live.yaml" if not use_cache else "config.yaml")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "vlnflow.cli", "launch", "--config", str(config_path),
            "--stop-file", str(request_path(run_dir)), "-m", "vlnflow.train.run",
            "--config", str(config_path), "--run-dir", str(run_dir)]
    if not use_cache:
        argv.append("--no-cache")
    if max_steps:
        argv += ["--max-steps", str(max_steps)]
    job = os.environ.get("SLURM_JOB_ID")
    where = f" in Slurm job {job}" if job else ""
    with open(log_path, "a") as log:
        log.write(f"# train attempt{where} on {socket.gethostname()}\n")
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        start = log.tell()
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
        if code == EXIT_STOPPED:
            marker = read_record(stopped_path(request_path(run_dir))) or {}
            where = f"after step {marker.get('step')} ({marker.get('reason')}: {marker.get('why')})" if marker else ""
            return requeue_after_stop(job, config["train"]["max_requeues"], log, where)
    if code != 0:
        # Snakemake deletes the rule log before a retry: repeat the error lines on stderr, which lands in the
        # failed job's own Slurm log (kept by the executor) and in Snakemake's output.
        with open(log_path, errors="replace") as log:
            log.seek(start)
            errors = [line for line in log if "vlnflow launch: error:" in line or " ERROR vlnflow" in line]
        sys.stderr.write(f"train failed{where} (exit {code}); full output in {log_path} (a retry replaces it)\n{''.join(errors[-20:])}")
    return code
