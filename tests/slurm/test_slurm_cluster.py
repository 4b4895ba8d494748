"""The local cluster itself: two idle nodes with 8 GPUs each, multi-node steps, accounting."""

from __future__ import annotations

import os
import time

import pytest

@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_with_eight_gpus_each(slurm_cluster):
    assert slurm_cluster.node_states() == {"n1": "idle", "n2": "idle"}
    out = slurm_cluster.run(
        ["srun", "--nodes=2", "--ntasks-per-node=1", "--gres=gpu:8",
         "bash", "-c", 'echo "$SLURMD_NODENAME $SLURM_NODEID $CUDA_VISIBLE_DEVICES"'],
    ).stdout.split("\n")
    rows = sorted(line.split() for line in out if line.strip())
    assert rows == [["n1", "0", "0,1,2,3,4,5,6,7"], ["n2", "1", "0,1,2,3,4,5,6,7"]]


@pytest.mark.slurm
@pytest.mark.slow
def test_batch_jobs_are_accounted(slurm_cluster, tmp_path):
    job = slurm_cluster.run(["sbatch", "--parsable", "--nodes=2", "--ntasks=2", f"--chdir={tmp_path}",
                             "--wrap", "srun hostname"]).stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    record = None
    while time.monotonic() < deadline:
        record = next((r for r in slurm_cluster.sacct() if r["JobID"] == job), None)
        if record and record["State"] == "COMPLETED":
            break
        time.sleep(1)
    assert record is not None, f"sacct never listed job {job}"
    assert record["State"] == "COMPLETED" and record["NNodes"] == "2" and record["NodeList"] == "n[1-2]"


@pytest.mark.slurm
@pytest.mark.slow
def test_job_processes_that_escape_slurm_are_killed_at_stop(slurm_cluster, tmp_path):
    """With proctrack/linuxproc a job's process whose parent exits first outlives the job (as Snakemake
    inside a requeued job can); the fixture's clean-up finds it by the job's SLURM_* variables."""
    pid_file = tmp_path / "orphan.pid"
    job = slurm_cluster.run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--wrap",
                             f"setsid sleep 300 & echo $! > {pid_file}"]).stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(r["JobID"] == job and r["State"] == "COMPLETED" for r in slurm_cluster.sacct()):
            break
        time.sleep(1)
    orphan = int(pid_file.read_text())
    assert os.path.exists(f"/proc/{orphan}"), "the orphan did not outlive its job"
    assert orphan in slurm_cluster._kill_escaped_job_processes()
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{orphan}") or "Z" in open(f"/proc/{orphan}/stat").read().split()[2]


def test_missing_binaries_give_a_not_run_reason(monkeypatch):
    """Without Slurm the fixture skips (reported as not run) with a reason naming what is missing."""
    from . import cluster

    real = cluster.find_binary
    monkeypatch.setattr(cluster, "find_binary", lambda name: None if name == "slurmdbd" else real(name))
    reason = cluster.why_not_runnable()
    assert reason and "missing slurmdbd" in reason and ".ci/install-slurm" in reason
