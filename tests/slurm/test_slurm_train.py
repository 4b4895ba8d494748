"""The real workflow on the local two-node Slurm (issue 6): `snakemake --profile slurm_h800 precompute_all train`.

On a small demo (3 episodes, 64x48 frames, 2 cache shards, tiny models, gloo) through a test
copy of the site profile: each shard's precompute is its own Slurm job; train is ONE Slurm
job on n1 and n2 whose world is 2 nodes x 1 process; every rank logs its node, host and rank;
the run finishes. Then the warned stop (issue 23): Slurm's warning signal to a running train
job stops it at a step boundary after a checkpoint there, the job requeues itself (no retry
used), and its next run resumes and matches the uninterrupted run's losses step for step.
Then the fault test: rank 1 is SIGKILLed after step 3 (test-only hook
VLNFLOW_TEST_KILL_RANK_AT_STEP, checkpoint step 2 complete): the Slurm job fails with a line
naming the node, the profile's `retries` resubmits it, and the new job resumes from step 2.

The Slurm tests share one workflow copy (module scope) and run in file order: the later ones
reuse the cache the first one built and compare with its run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import WorkflowCopy, copy_workflow
from vlnflow.report.attempts import attempts_markdown
from vlnflow.train import dist_check, launch
from vlnflow.train.attempts import read_attempts
from vlnflow.train.trainer import TEST_KILL_ENV

from .cluster import free_ports

NODES, PROCS_PER_NODE = 2, 1
MAX_STEPS = 8  # the uninterrupted run (first test) and the warned one train the same steps
SHARDS = ["shard_00000", "shard_00001"]
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
ATTEMPT = re.compile(r"^# train attempt in Slurm job (\d+) on \S+$", re.M)
RANK_LINE = re.compile(r"\[rank (\d)\] INFO vlnflow\.train: rank \1/(\d) local_rank 0 node (n\d) node_rank (\d) "
                       r"host (\S+) pid \d+")


def submitted_jobs(proc: subprocess.CompletedProcess, cluster) -> dict[str, dict]:
    """sacct rows of the Slurm jobs this Snakemake run submitted, by job id."""
    ids = set(SUBMITTED.findall(proc.stdout + proc.stderr))
    assert ids, proc.stderr[-3000:]
    rows = {row["JobID"]: row for row in cluster.sacct() if row["JobID"] in ids}
    assert set(rows) == ids, (ids, rows)
    return rows


def by_rule(jobs: dict[str, dict], rule: str) -> list[dict]:
    """Jobs of one rule in submission order (the plugin's --comment: rule_<rule>[_wildcards_<values>])."""
    hits = [row for row in jobs.values() if re.fullmatch(rf"rule_{rule}(_wildcards_.*)?", row["Comment"])]
    return sorted(hits, key=lambda row: int(row["JobID"]))


def rank_lines(log: str) -> list[tuple[int, int, str, int, str]]:
    """(rank, world, node, node_rank, host) of every 'rank R/W ... node ... host ...' line the trainer logged."""
    return [(int(r), int(w), node, int(nr), host) for r, w, node, nr, host in RANK_LINE.findall(log)]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def wf(slurm_cluster, tmp_path_factory) -> WorkflowCopy:
    """Workflow copy with a small demo, cluster.nodes 2 x 1 process (gloo), and the test Slurm profile."""
    copy = copy_workflow(tmp_path_factory.mktemp("slurm_train") / "workflow")
    dest = copy.path
    subprocess.run([str(Path(sys.executable).parent / "vlnflow"), "demo-data", str(dest / "data" / "demo"),
                    "--episodes", "3", "--size", "64x48"], check=True, capture_output=True, text=True)
    (port,) = free_ports(1)
    copy.configure({
        "dataset": {"root": "data/demo/episodes"},
        "shards": {"count": len(SHARDS)},
        "cache": {"spot_check": 1},
        "cluster": {"nodes": NODES, "gpus_per_node": PROCS_PER_NODE, "backend": "gloo", "rdzv_port": port,
                    "rdzv_timeout_s": 120},
        "train": {"max_steps": MAX_STEPS, "save_every": 2, "loader": {"workers": 0}},
    })
    slurm_cluster.write_profile(dest / "slurm_h800")  # found by name from the workflow root
    return copy


@pytest.mark.slurm
@pytest.mark.slow
def test_precompute_shards_and_one_two_node_train_job(slurm_cluster, wf):
    proc = slurm_cluster.snakemake(wf.path, "--profile", "slurm_h800", "precompute_all", "train", timeout=900)
    jobs = submitted_jobs(proc, slurm_cluster)

    # Each cache shard: its own single-node Slurm job.
    shard_jobs = by_rule(jobs, "precompute_shard")
    assert len(shard_jobs) == len(SHARDS), shard_jobs
    assert sorted(SHARDS[[s in row["Comment"] for s in SHARDS].index(True)] for row in shard_jobs) == SHARDS
    for row in shard_jobs:
        assert row["State"] == "COMPLETED" and row["NNodes"] == "1", row

    # Training: ONE Slurm job spanning n1 and n2.
    (train_job,) = by_rule(jobs, "train")
    assert train_job["State"] == "COMPLETED", train_job
    assert train_job["NNodes"] == "2" and train_job["NodeList"] == "n[1-2]", train_job
    log = (wf.path / "results/logs/train/demo.log").read_text()
    assert ATTEMPT.findall(log) == [train_job["JobID"]], log[-3000:]
    assert "slurm: 2 node(s) x 1 process(es)" in log and "nodes n1,n2" in log, log[-3000:]

    # Every rank logged its rank, node and host; node ranks follow the Slurm nodes.
    ranks = rank_lines(log)
    assert sorted(r[0] for r in ranks) == [0, 1] and {r[1] for r in ranks} == {NODES * PROCS_PER_NODE}, ranks
    assert sorted(r[2] for r in ranks) == ["n1", "n2"], ranks
    assert all(node_rank == {"n1": 0, "n2": 1}[node] and host for _, _, node, node_rank, host in ranks), ranks

    # The run finished with world size = nodes x processes per node.
    run_dir = wf.path / "results/train/demo"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert {m["world_size"] for m in metrics} == {NODES * PROCS_PER_NODE}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == summary["max_steps"] == MAX_STEPS and summary["world_size"] == 2


def wait_for(what: str, check, timeout: float, poll: float = 0.2):
    """Poll `check()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def last_step(metrics_path: Path) -> int:
    try:
        lines = metrics_path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


@pytest.mark.slurm
@pytest.mark.slow
def test_warning_signal_stops_at_a_saved_step_and_the_requeued_job_resumes_exactly(slurm_cluster, wf):
    """Mid-run, the job gets USR1 as `--signal=USR1@T` sends it (to its job steps): the ranks stop together
    after a step, save there (save_every is far off), the job requeues itself under the same id with
    `retries: 0` (a stop is no failure), and its next run resumes: every step once in metrics.jsonl, the
    losses and lr equal the uninterrupted run's step for step, and the monitor and report show both attempts."""
    (port,) = free_ports(1)
    wf.configure({"cluster": {"rdzv_port": port}, "train": {"run": "warned", "save_every": 100, "keep_last": 2}})
    run_dir = wf.path / "results/train/warned"
    with ThreadPoolExecutor(1) as pool:
        snakemake = pool.submit(slurm_cluster.snakemake, wf.path, "--profile", "slurm_h800", "train", "--retries", "0",
                                "--slurm-keep-successful-logs", timeout=900)
        wait_for("step 2 in metrics.jsonl", lambda: snakemake.done() or last_step(run_dir / "metrics.jsonl") >= 2, 600)
        assert not snakemake.done(), snakemake.result()
        (job,) = slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()
        signalled_after = last_step(run_dir / "metrics.jsonl")
        slurm_cluster.run(["scancel", "--signal=USR1", job])  # to the job steps, as --signal=USR1@T does
        # The requeued job waits cred_expire (15 s on the test cluster, 120 s by default) before it runs again.
        proc = snakemake.result()
    assert re.findall(r"has been submitted with SLURM jobid (\d+)", proc.stdout + proc.stderr) == [job]  # no resubmission

    # One Slurm job, run twice: REQUEUED, then COMPLETED.
    history = slurm_cluster.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "State"]).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history

    # The first run stopped at a step boundary after saving there; the second resumed from that checkpoint.
    first, second = read_attempts(run_dir / "attempts.jsonl")
    stop_step = first.last_step
    assert signalled_after <= stop_step < MAX_STEPS, (signalled_after, stop_step)
    assert (first.job_id, first.reason, first.resumed_step) == (job, "stop_request", 0)
    assert re.fullmatch(r"SIGUSR1 on node n[12]", first.why), first.why
    assert (second.job_id, second.reason, second.resumed_step, second.last_step) == (job, "done", stop_step, MAX_STEPS)
    assert second.restart_lost_s > 0
    train_log = (run_dir / "train.log").read_text()
    stop_line = f"stopping after step {stop_step} of {MAX_STEPS}: stop_request (SIGUSR1 on node n"
    saved_line = f"checkpoint step_{stop_step:07d} saved"
    assert stop_line in train_log and saved_line in train_log.split(stop_line, 1)[1], train_log[-3000:]
    assert f"resumed from results/train/warned/checkpoints/step_{stop_step:07d}" in train_log
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_{stop_step:07d}",
                                                                               f"step_{MAX_STEPS:07d}"]
    slurm_log = (wf.path / f".snakemake/slurm_logs/rule_train/{job}.log").read_text()  # both runs (open-mode append)
    assert f"training stopped on request after step {stop_step} (stop_request: SIGUSR1 on node n" in slurm_log
    assert f"requeued Slurm job {job} (requeue 1 of at most 20, train.max_requeues)" in slurm_log

    # Every step once, and the same numbers as the uninterrupted run (gloo on CPU: bit for bit).
    metrics = read_metrics(run_dir)
    reference = read_metrics(wf.path / "results/train/demo")
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert [(m["loss"], m["lr"]) for m in metrics] == [(m["loss"], m["lr"]) for m in reference]
    assert (run_dir / "summary.json").exists()

    # vlnflow monitor and the benchmark report's section show both attempts.
    monitor = subprocess.run([str(Path(sys.executable).parent / "vlnflow"), "monitor", "--once", str(run_dir)],
                             capture_output=True, text=True, check=True).stdout
    assert "attempts: 2, restarts lost" in monitor, monitor
    assert f"#1 job {job}: steps 1-{stop_step} ({stop_step} done), stop_request: SIGUSR1 on node n" in monitor
    assert f"#2 job {job}: steps {stop_step + 1}-{MAX_STEPS} ({MAX_STEPS - stop_step} done), done; restart lost" in monitor
    report = attempts_markdown([str(run_dir / "metrics.jsonl")])
    assert f"| 1 | {job} |" in report and f"| 2 | {job} |" in report and "stop_request (SIGUSR1 on node n" in report


@pytest.mark.slurm
@pytest.mark.slow
def test_killed_rank_fails_the_job_and_the_retry_resumes(slurm_cluster, wf):
    kill_rank, kill_step, save_every, max_steps = 1, 3, 2, 5
    (port,) = free_ports(1)
    wf.configure({"cluster": {"rdzv_port": port},
                  "train": {"run": "fault", "max_steps": max_steps, "save_every": save_every, "keep_last": 2}})
    proc = slurm_cluster.snakemake(wf.path, "--profile", "slurm_h800", "train", timeout=900,
                                   env={TEST_KILL_ENV: f"{kill_rank}:{kill_step}"})
    jobs = submitted_jobs(proc, slurm_cluster)
    assert set(row["Comment"] for row in jobs.values()) == {"rule_train"}, jobs  # the cache was reused

    # Two Slurm jobs of two nodes each: the killed attempt FAILED, the resubmitted one COMPLETED.
    first, second = by_rule(jobs, "train")
    assert (first["State"], second["State"]) == ("FAILED", "COMPLETED"), (first, second)
    assert first["NodeList"] == second["NodeList"] == "n[1-2]", (first, second)

    # The failed job's own Slurm log (kept by the executor; Snakemake deletes the rule log before the retry)
    # names the Slurm job, the node and the rank that died, and how.
    failed_log = (wf.path / f".snakemake/slurm_logs/rule_train/{first['JobID']}.log").read_text()
    assert f"train failed in Slurm job {first['JobID']} (exit " in failed_log, failed_log[-4000:]
    died = re.search(rf"vlnflow launch: error: node (n[12]) \(node rank (\d) of 2\): rank {kill_rank} \(local rank 0\) "
                     r"exited with code -9 \(SIGKILL\), torchrun exited with code", failed_log)
    assert died and {"n1": "0", "n2": "1"}[died.group(1)] == died.group(2), failed_log[-4000:]
    assert f"training failed in Slurm job {first['JobID']} on nodes n1,n2" in failed_log
    assert f"killing rank {kill_rank}" in failed_log and f"after step {kill_step}" in failed_log

    # The retry resumed from the last checkpoint completed before the kill, losing only the steps after it.
    run_dir = wf.path / "results/train/fault"
    log = (wf.path / "results/logs/train/fault.log").read_text()  # the successful attempt's
    assert ATTEMPT.findall(log) == [second["JobID"]], log[-3000:]
    assert sorted(r[0] for r in rank_lines(log)) == [0, 1] and sorted(r[2] for r in rank_lines(log)) == ["n1", "n2"]
    last_complete = kill_step // save_every * save_every
    assert f"resumed from results/train/fault/checkpoints/step_{last_complete:07d}" in log, log[-4000:]
    assert f"resuming at optimizer step {last_complete}" in log
    # Rank 0's train.log spans both attempts: what the first one reached and saved before the kill.
    before, after = (run_dir / "train.log").read_text().split(f"resuming at optimizer step {last_complete}")
    assert re.findall(r"step (\d+)/\d+ loss", before)[-1] == str(kill_step), before[-3000:]
    assert re.findall(r"checkpoint step_(\d+) saved", before)[-1] == f"{last_complete:07d}", before[-3000:]
    assert kill_step - last_complete < save_every
    assert re.findall(r"step (\d+)/\d+ loss", after) == [str(s) for s in range(last_complete + 1, max_steps + 1)]
    # Final metrics: every step once. Snakemake removed the failed job's metrics.jsonl; the resumed run put
    # it back from the checkpoint's copy (steps 1..2) and wrote the rest, step 3 only once.
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, max_steps + 1))
    assert {m["world_size"] for m in metrics} == {NODES * PROCS_PER_NODE}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == max_steps and summary["world_size"] == 2


def test_launch_names_the_rank_that_died(capfd):
    """torchrun's root-cause block becomes part of the launch's one-line failure message."""
    block = ("Root Cause (first observed failure):\n[0]:\n  host      : localhost\n"
             "  rank      : 3 (local_rank: 1)\n  exitcode  : -9 (pid: 42)  (SIGKILL)\n")
    code, rdzv_error, root_cause = launch.run_forwarding_stderr(
        [sys.executable, "-c", f"import sys; sys.stderr.write({block!r}); sys.exit(1)"], {})
    assert (code, rdzv_error, root_cause) == (1, None, "rank 3 (local rank 1) exited with code -9 (SIGKILL)")
    assert "rank      : 3" in capfd.readouterr().err  # still forwarded
    line = launch.describe_failure("gpu02", 1, 2, "gpu01:29500", 1, None, 900, root_cause)
    assert line.startswith("node gpu02 (node rank 1 of 2): rank 3 (local rank 1) exited with code -9 (SIGKILL), "
                           "torchrun exited with code 1")


class FakeDist:
    """all_gather_object over pre-set per-rank objects (what every rank would receive)."""

    def __init__(self, others: list[dict]):
        self.others = others

    def get_world_size(self) -> int:
        return 1 + len(self.others)

    def all_gather_object(self, out: list, mine) -> None:
        out[:] = [mine, *self.others]


def test_ranks_must_see_the_same_manifest(tmp_path, monkeypatch):
    """verify_manifest: a rank that cannot read the manifest, or sees another one, fails naming node and path."""
    monkeypatch.setenv("VLNFLOW_NODE_NAME", "gpu01")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"manifest_version": 1, "encoder_fingerprint": "abc", "samples": 10}))
    me = dist_check.manifest_facts(manifest)
    assert (me["encoder_fingerprint"], me["samples"], me["error"]) == ("abc", 10, None)
    assert dist_check.verify_manifest(manifest, FakeDist([{**me, "rank": 1, "node": "gpu02"}]))["samples"] == 10

    missing = {**dist_check.manifest_facts(tmp_path / "nope.json"), "rank": 1, "node": "gpu02"}
    with pytest.raises(dist_check.CacheMismatchError) as err:
        dist_check.verify_manifest(manifest, FakeDist([missing]))
    assert f"node gpu02 (host {me['host']}, rank 1) cannot read the feature cache manifest {tmp_path}/nope.json" \
        in str(err.value) and "shared filesystem" in str(err.value)

    other = {**me, "rank": 1, "node": "gpu02", "samples": 9}
    with pytest.raises(dist_check.CacheMismatchError, match=r"node gpu02 .* 9 samples, but node gpu01 .* 10 samples"):
        dist_check.verify_manifest(manifest, FakeDist([other]))
