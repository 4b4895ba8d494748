"""vlnflow launch: the command builder, the Slurm node-list recovery, the world check, the profile.

Fast tests need no Slurm. The `slow` ones start real torchrun processes on this host as
two hand-launched "nodes" (MASTER_ADDR / NODE_RANK / NNODES), gloo on CPU; the Slurm
path itself is tested in tests/slurm/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import vlnflow.train.dist_check as dist_check
from vlnflow.cli import main as vlnflow_main
from vlnflow.config import ConfigError, load_config, validate_config
from vlnflow.train.dist_check import check_world
from vlnflow.train.launch import (
    LaunchError,
    SlurmAllocation,
    describe_failure,
    nccl_env,
    plan_launch,
    slurm_allocation,
    slurm_resources,
    visible_gpu_problem,
)

REPO = Path(__file__).resolve().parents[1]


def cluster_cfg(**overrides) -> dict:
    """The cluster section as load_config fills it, with overrides."""
    cfg = validate_config({"cluster": overrides})["cluster"]
    return cfg


def two_nodes(job_id="77", cpus=64) -> SlurmAllocation:
    return SlurmAllocation(job_id, ("gpu01", "gpu02"), "10.0.0.1", cpus)


# ----------------------------------------------------------------------------- config + NCCL
def test_cluster_section_defaults_and_bad_value():
    cfg = cluster_cfg()
    assert cfg["nodes"] == 1 and cfg["gpus_per_node"] == 8 and cfg["backend"] == "nccl"
    assert cfg["rdzv_backend"] == "c10d" and cfg["nccl"]["nvls_enable"] == 0
    assert load_config(REPO / "config.yaml")["cluster"]["rdzv_port"] >= 1024  # the demo config validates
    with pytest.raises(ConfigError, match="cluster.backend"):
        cluster_cfg(backend="mpi")


def test_nccl_env_from_config_and_environment_wins():
    cfg = cluster_cfg(nccl={"ib_gid_index": 3, "socket_ifname": "ib0", "net_gdr_level": "PHB", "ib_hca": "mlx5"})
    env = nccl_env(cfg, {})
    assert env == {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5", "NCCL_IB_GID_INDEX": "3",
                   "NCCL_NET_GDR_LEVEL": "PHB", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0",
                   "NCCL_NVLS_ENABLE": "0"}
    assert "NCCL_SOCKET_IFNAME" not in nccl_env(cfg, {"NCCL_SOCKET_IFNAME": "bond0"})


# ----------------------------------------------------------------------------- plan_launch
def test_single_node_outside_slurm_is_plain_torchrun():
    plan = plan_launch(cluster_cfg(), "train.py", ["--lr", "1e-5"], environ={})
    assert plan.mode == "local" and plan.nnodes == 1 and plan.nproc_per_node == 8
    assert plan.argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=1" in plan.argv and "--nproc-per-node=8" in plan.argv
    assert "--rdzv-backend=c10d" in plan.argv and "--rdzv-endpoint=127.0.0.1:29500" in plan.argv
    assert not any(a.startswith("--node-rank") for a in plan.argv)  # c10d ignores it
    assert plan.argv[-3:] == ["train.py", "--lr", "1e-5"]
    assert plan.env["NCCL_NVLS_ENABLE"] == "0" and plan.env["VLNFLOW_DIST_BACKEND"] == "nccl"


def test_slurm_two_nodes_srun_starts_one_agent_per_node():
    cfg = cluster_cfg(nodes=2, rdzv_port=29555)
    plan = plan_launch(cfg, "train.py", ["--x"], environ={"SLURM_JOB_ID": "77"}, slurm=two_nodes())
    assert plan.mode == "slurm" and plan.nodes == ("gpu01", "gpu02") and plan.rdzv_endpoint == "10.0.0.1:29555"
    argv = plan.argv
    assert argv[0] == "srun"
    for flag in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1"):
        assert flag in argv, flag
    agent = argv[argv.index("vlnflow.train.launch") + 1:]
    assert agent[0] == "--node-agent"
    for flag in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-endpoint=10.0.0.1:29555", "--rdzv-backend=c10d",
                 "--rdzv-id=vlnflow-77", "--first-node-hosts"):
        assert flag in agent, flag
    assert agent[-3:] == ["--", "train.py", "--x"]
    assert plan.env["VLNFLOW_NNODES"] == "2" and plan.env["VLNFLOW_NPROC_PER_NODE"] == "8"


def test_slurm_master_addr_and_port_override_the_first_node():
    cfg = cluster_cfg(nodes=2)
    plan = plan_launch(cfg, "t.py", [], environ={"MASTER_ADDR": "ib-gpu01", "MASTER_PORT": "30001"},
                       slurm=two_nodes())
    assert plan.rdzv_endpoint == "ib-gpu01:30001"
    assert "--first-node-hosts" not in plan.argv  # the host is the user's choice: torchrun decides who serves it


def test_slurm_node_count_must_match_config():
    with pytest.raises(LaunchError, match=r"cluster.nodes' is 2 but Slurm job 9 has 1 node\(s\) \(gpu07\)"):
        plan_launch(cluster_cfg(nodes=2), "t.py", [], environ={}, slurm=SlurmAllocation("9", ("gpu07",), "gpu07"))
    with pytest.raises(LaunchError, match="cluster.nodes' is 1 but Slurm job 77 has 2"):
        plan_launch(cluster_cfg(nodes=1), "t.py", [], environ={}, slurm=two_nodes())


def test_one_node_slurm_job_also_runs_its_ranks_in_a_job_step_of_their_own():
    """Slurm's warning (--signal=USR1@T, without B:) reaches the job steps only, not the batch shell where
    Snakemake runs: the ranks need a step of their own, also on one node (issue 23)."""
    plan = plan_launch(cluster_cfg(), "t.py", [], environ={}, slurm=SlurmAllocation("5", ("gpu03",), "10.0.0.3", 64))
    assert plan.mode == "slurm" and plan.argv[0] == "srun" and plan.nodes == ("gpu03",)
    for flag in ("--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--cpus-per-task=64", "--overlap"):
        assert flag in plan.argv, flag
    agent = plan.argv[plan.argv.index("vlnflow.train.launch") + 1:]
    assert agent[0] == "--node-agent" and "--nnodes=1" in agent and "--rdzv-id=vlnflow-5" in agent
    assert "--rdzv-endpoint=10.0.0.3:29500" in agent and agent[-2:] == ["--", "t.py"]


def test_hand_launched_two_nodes_use_env_overrides():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
    plan = plan_launch(cluster_cfg(rdzv_backend="static"), "t.py", [], environ=env)
    assert plan.nnodes == 2 and plan.node_rank == 1 and plan.rdzv_endpoint == "10.0.0.1:29600"
    assert "--nnodes=2" in plan.argv and "--node-rank=1" in plan.argv and "--rdzv-backend=static" in plan.argv
    c10d = plan_launch(cluster_cfg(), "t.py", [], environ=env)
    assert "--rdzv-conf=join_timeout=900,is_host=0" in c10d.argv
    assert plan.env["VLNFLOW_NODE_RANK"] == "1"


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "needs MASTER_ADDR .* and NODE_RANK"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 is outside 0..1"),
])
def test_bad_hand_launch_is_a_clear_error(env, message):
    with pytest.raises(LaunchError, match=message):
        plan_launch(cluster_cfg(), "t.py", [], environ=env)


def test_rule_resources_use_srun_only_for_several_nodes():
    assert slurm_resources({"nodes": 2}) == {"nodes": 2, "tasks": 2, "mpi": "srun"}
    # one node: un-wrapped too (mpi present), so the launch's srun step is the only one the warning reaches
    assert slurm_resources({"nodes": 1}) == {"nodes": 1, "tasks": 1, "mpi": ""}


# ----------------------------------------------------------------------------- Slurm node list
def test_node_list_recovered_from_job_id_when_step_stripped_it():
    calls = []
    answers = {"squeue": "gpu[01-02]|128|2\n", "hostnames": "gpu01\ngpu02\n",
               "node": "NodeName=gpu01 Arch=x86_64 CoresPerSocket=32 NodeAddr=10.1.1.1 NodeHostName=gpu01\n"}

    def run(argv):
        calls.append(argv)
        return answers["squeue" if argv[0] == "squeue" else argv[2]]

    alloc = slurm_allocation({"SLURM_JOB_ID": "4242"}, run=run)  # no SLURM_JOB_NODELIST / SLURM_NNODES
    assert alloc == SlurmAllocation("4242", ("gpu01", "gpu02"), "10.1.1.1", 64)
    assert calls[0][:4] == ["squeue", "-h", "-j", "4242"]
    assert calls[1] == ["scontrol", "show", "hostnames", "gpu[01-02]"]
    assert slurm_allocation({}, run=run) is None


def test_unknown_job_is_a_clear_error():
    with pytest.raises(LaunchError, match="squeue does not know Slurm job 13"):
        slurm_allocation({"SLURM_JOB_ID": "13"}, run=lambda argv: "")


# ----------------------------------------------------------------------------- failures + world check
def test_failure_lines_name_the_node():
    line = describe_failure("gpu02", 1, 2, "gpu01:29500", 1, "RendezvousTimeoutError", 900)
    assert line.startswith("node gpu02 (node rank 1 of 2): rendezvous at gpu01:29500 failed")
    assert "cluster.rdzv_timeout_s" in line
    assert "torchrun exited with code 3" in describe_failure("gpu01", 0, 2, "gpu01:29500", 3, None, 900)
    problem = visible_gpu_problem({"CUDA_VISIBLE_DEVICES": "0,1", "VLNFLOW_DIST_BACKEND": "nccl"}, 8, "node gpu02")
    assert problem and problem.startswith("node gpu02 sees 2 GPU(s)") and "gpu:8" in problem
    assert visible_gpu_problem({"CUDA_VISIBLE_DEVICES": "0", "VLNFLOW_DIST_BACKEND": "gloo"}, 8, "n") is None


def facts(nodes: list[tuple[str, int]], nnodes: int, nproc: int) -> list[dict]:
    """Rank facts for nodes given as (name, processes on it); expectations as the launcher sets them."""
    out, rank = [], 0
    world = sum(n for _, n in nodes)
    for group, (name, count) in enumerate(nodes):
        for local in range(count):
            out.append({"rank": rank, "world_size": world, "local_rank": local, "local_world_size": count,
                        "group_rank": group, "node": name, "node_rank": group, "host": name, "pid": 100 + rank,
                        "expected_nnodes": nnodes, "expected_nproc_per_node": nproc})
            rank += 1
    return out


def test_check_world_accepts_agreeing_nodes_and_names_the_odd_one():
    assert check_world(facts([("n1", 2), ("n2", 2)], nnodes=2, nproc=2)) == []
    odd = facts([("n1", 2), ("n2", 3)], nnodes=2, nproc=2)
    problems = "; ".join(check_world(odd))
    assert "node n2 (node rank 1, host n2) runs 3 process(es), expected 2" in problems
    assert "nodes disagree" in problems
    missing = "; ".join(check_world(facts([("n1", 2)], nnodes=2, nproc=2)))
    assert "1 node(s) joined (n1), expected 2" in missing


# ----------------------------------------------------------------------------- profile
def test_profile_keys_are_snakemake_options_and_match_config():
    from snakemake.cli import get_argument_parser

    profile = yaml.safe_load((REPO / "slurm_h800/config.yaml").read_text())
    options = {o for action in get_argument_parser()._actions for o in action.option_strings}
    unknown = [key for key in profile if f"--{key}" not in options]
    assert not unknown, f"slurm_h800/config.yaml keys Snakemake does not know: {unknown}"
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    assert profile.get("slurm-no-account") or profile["default-resources"].get("slurm_account")
    assert {"slurm_partition", "runtime", "mem_mb"} <= set(profile["default-resources"])
    # The profile is for the 8-GPU cluster (config.yaml is the CPU demo): it matches the schema default.
    assert profile["set-resources"]["train"]["gres"] == f"gpu:{cluster_cfg()['gpus_per_node']}"
    assert profile["set-resources"]["precompute_shard"]["gres"] == "gpu:1"
    # Issue 23: Slurm's warning goes to the job steps ("B:" would kill the batch shell Snakemake runs in),
    # and a train job that stopped on it may requeue itself.
    extra = profile["set-resources"]["train"]["slurm_extra"]
    assert re.search(r"--signal=USR1@\d+\b", extra) and "B:" not in extra and profile["slurm-requeue"] is True


def test_cli_dry_run_prints_env_and_command(tmp_path, capsys, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_JOBID", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"cluster": {"backend": "gloo", "nccl": {"socket_ifname": "eth9"}}}))
    assert vlnflow_main(["launch", "--config", str(cfg), "--gpus-per-node", "2", "--dry-run",
                         "--", "script.py", "--out", "x.json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "VLNFLOW_DIST_BACKEND=gloo" in out and "GLOO_SOCKET_IFNAME=eth9" in out
    assert out[-1].endswith("--nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29500 "
                            "--rdzv-id=vlnflow-127.0.0.1-29500 --rdzv-conf=join_timeout=900,is_host=1 "
                            "--max-restarts=0 script.py --out x.json")


# ----------------------------------------------------------------------------- real torchrun, two "nodes"
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hand_launch(tmp_path: Path, ranks: list[dict], cluster: dict) -> list[subprocess.CompletedProcess]:
    """Start `vlnflow launch` once per entry of `ranks` (extra env, extra args) at the same time; wait for all."""
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"cluster": {"backend": "gloo", "gpus_per_node": 1, **cluster}}))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_"))}
    base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    procs = []
    for node in ranks:
        argv = [sys.executable, "-m", "vlnflow.cli", "launch", "--config", str(cfg), *node.get("args", []),
                "--", dist_check.__file__, *node.get("script_args", [])]
        procs.append(subprocess.Popen(argv, env={**base, **node["env"]}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("rdzv_backend", ["c10d", "static"])
def test_two_hand_launched_nodes_form_one_world(tmp_path, rdzv_backend):
    port = free_port()
    report = tmp_path / "report.json"
    nodes = [{"env": {"NNODES": "2", "NODE_RANK": str(r)}, "script_args": ["--out", str(report)]} for r in (0, 1)]
    results = hand_launch(tmp_path, nodes, {"rdzv_port": port, "rdzv_backend": rdzv_backend, "rdzv_timeout_s": 120})
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.stdout for r in results)
    data = json.loads(report.read_text())
    assert data["world_size"] == 2 and data["nnodes"] == 2 and data["all_reduce"]["ok"]
    assert sorted(r["node_rank"] for r in data["ranks"]) == [0, 1]
    if rdzv_backend == "static":  # static: global ranks follow the node ranks
        assert [r["node_rank"] for r in data["ranks"]] == [0, 1]
    for node_rank, result in enumerate(results):
        assert f"node_rank {node_rank} host" in result.stdout


@pytest.mark.slow
def test_nodes_that_disagree_fail_naming_them(tmp_path):
    port = free_port()
    nodes = [{"env": {"NNODES": "2", "NODE_RANK": "0"}},
             {"env": {"NNODES": "2", "NODE_RANK": "1"}, "args": ["--gpus-per-node", "2"]}]
    results = hand_launch(tmp_path, nodes, {"rdzv_port": port, "rdzv_timeout_s": 120})
    assert all(r.returncode != 0 for r in results)
    text = "\n".join(r.stdout for r in results)
    assert "expects 2 node(s) x 2 process(es) = 4 ranks but the job has 3" in text
    assert "nodes disagree" in text
    assert "vlnflow launch: error: node " in text and "torchrun exited with code" in text


@pytest.mark.slow
def test_missing_node_is_a_rendezvous_error_naming_the_node(tmp_path):
    port = free_port()
    (result,) = hand_launch(tmp_path, [{"env": {"NNODES": "2", "NODE_RANK": "0"}}],
                            {"rdzv_port": port, "rdzv_timeout_s": 3})
    assert result.returncode != 0
    assert f"(node rank 0 of 2): rendezvous at 127.0.0.1:{port} failed (Rendezvous" in result.stdout, result.stdout
