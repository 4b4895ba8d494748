"""A tiny Snakemake workflow on the local cluster through `--profile slurm_h800` (test copy of the site profile).

Proves what the real workflow relies on: single-task rules become separate Slurm jobs,
a failed job is resubmitted (profile `retries`), and a rule with nodes=2, mpi="srun",
tasks=2 is ONE Slurm job whose `vlnflow launch` starts one torchrun per node that join
into one world (2 nodes x 1 process, gloo) with a correct all-reduce. On one node
(slurm_resources: mpi="") the launch's own srun step is the job's only step, the one Slurm's
warning signal reaches (issue 23).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

import vlnflow.train.dist_check as dist_check

from .cluster import free_ports

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SNAKEFILE = textwrap.dedent('''
    from vlnflow.train.launch import slurm_resources

    HELLO = range(3)

    rule all:
        input: expand("out/hello_{i}.txt", i=HELLO), "out/flaky.txt", "out/dist_check.json", "out/one_node.json"

    rule hello:
        output: "out/hello_{i}.txt"
        log: "logs/hello_{i}.log"
        shell: "echo job=$SLURM_JOB_ID node=$SLURMD_NODENAME > {output} 2> {log}"

    rule flaky:  # fails on its first attempt: the profile's retries must resubmit it
        output: "out/flaky.txt"
        log: "logs/flaky.log"
        shell:
            """
            echo "attempt job=$SLURM_JOB_ID" >> attempts.txt
            if [ ! -e first_attempt_done ]; then touch first_attempt_done; exit 1; fi
            echo job=$SLURM_JOB_ID > {output}
            """

    rule dist_check:
        output: "out/dist_check.json"
        log: "logs/dist_check.log"
        params: script=config["dist_check"]
        resources: **slurm_resources({"nodes": 2})  # nodes=2, tasks=2, mpi="srun"
        shell:
            "(echo job=$SLURM_JOB_ID; vlnflow launch --config cluster.yaml -- {params.script} --out {output}) "
            "> {log} 2>&1"

    rule one_node:  # one node, two processes
        output: "out/one_node.json"
        log: "logs/one_node.log"
        params: script=config["dist_check"]
        resources: **slurm_resources({"nodes": 1})  # nodes=1, tasks=1, mpi="": not wrapped in a step
        shell:
            "(echo job=$SLURM_JOB_ID; vlnflow launch --config cluster.yaml --nodes 1 --gpus-per-node 2 "
            "-- {params.script} --out {output}) > {log} 2>&1"
''')


def test_profile_runs_jobs_and_one_two_node_launch(slurm_cluster, tmp_path: Path):
    work = tmp_path / "wf"
    work.mkdir()
    (work / "Snakefile").write_text(SNAKEFILE)
    (port,) = free_ports(1)
    (work / "cluster.yaml").write_text(yaml.safe_dump({"cluster": {
        "nodes": 2, "gpus_per_node": 1, "backend": "gloo", "rdzv_port": port, "rdzv_timeout_s": 120}}))
    slurm_cluster.write_profile(work / "slurm_h800")  # found by name from the workflow root

    slurm_cluster.snakemake(work, "all", "--profile", "slurm_h800", "--config", f"dist_check={dist_check.__file__}",
                            timeout=900)
    jobs = {row["JobID"]: row for row in slurm_cluster.sacct()}

    # Single-task rules: each its own Slurm job, on one node, completed.
    hello_jobs = [re.search(r"job=(\d+)", (work / f"out/hello_{i}.txt").read_text()).group(1) for i in range(3)]
    assert len(set(hello_jobs)) == 3, hello_jobs
    for job in hello_jobs:
        assert jobs[job]["State"] == "COMPLETED" and jobs[job]["NNodes"] == "1", jobs[job]

    # retries: the first attempt failed in its own job, the resubmitted one completed.
    attempts = re.findall(r"job=(\d+)", (work / "attempts.txt").read_text())
    assert len(attempts) == 2 and attempts[0] != attempts[1], attempts
    assert jobs[attempts[0]]["State"] == "FAILED" and jobs[attempts[1]]["State"] == "COMPLETED"

    # The two-node rule: ONE Slurm job spanning n1 and n2, world = 2 nodes x 1 process.
    log = (work / "logs/dist_check.log").read_text()
    dist_job = re.search(r"job=(\d+)", log).group(1)
    assert jobs[dist_job]["State"] == "COMPLETED", jobs[dist_job]
    assert jobs[dist_job]["NNodes"] == "2" and jobs[dist_job]["NodeList"] == "n[1-2]", jobs[dist_job]
    report = json.loads((work / "out/dist_check.json").read_text())
    assert report["world_size"] == 2 and report["nnodes"] == 2 and report["backend"] == "gloo"
    assert report["all_reduce"] == {"value": 3.0, "expected": 3.0, "ok": True}
    assert sorted(r["node"] for r in report["ranks"]) == ["n1", "n2"]
    assert sorted(r["node_rank"] for r in report["ranks"]) == [0, 1]
    for rank in report["ranks"]:  # the node rank each agent got from srun matches its node
        assert rank["node_rank"] == {"n1": 0, "n2": 1}[rank["node"]], rank
    # One node: the launch's srun step is the job's only step (the plugin did not wrap the rule in one).
    one_log = (work / "logs/one_node.log").read_text()
    one_job = re.search(r"job=(\d+)", one_log).group(1)
    one = json.loads((work / "out/one_node.json").read_text())
    assert (one["world_size"], one["nnodes"]) == (2, 1) and "slurm: 1 node(s) x 2 process(es)" in one_log, one_log
    assert one["all_reduce"]["ok"], one
    steps = slurm_cluster.run(["sacct", "-j", one_job, "-n", "-P", "-o", "JobID"]).stdout.split()
    assert sorted(steps) == sorted([one_job, f"{one_job}.batch", f"{one_job}.0"]), steps

    # Every rank logged its rank and host, and the launch said which nodes it spans.
    logged = set(re.findall(r"\[dist_check\] rank (\d)/2 local_rank 0 node (n\d) node_rank \d host \S+", log))
    assert {node for _, node in logged} == {"n1", "n2"} and {rank for rank, _ in logged} == {"0", "1"}, log
    assert "slurm: 2 node(s) x 1 process(es)" in log and "nodes n1,n2" in log, log
