"""Start a distributed script on one or more nodes: one torchrun per node, joined by a rendezvous.

Why: the same command must work in three places. Inside a Slurm allocation (one node or
several), `srun` starts one node agent per node (this module again), which runs torchrun
with the node's rank; the node list is recovered from SLURM_JOB_ID because the
Snakemake job step strips SLURM_JOB_NODELIST. The training runs in that job step of its
own, also on one node, so that Slurm's warning signal (`--signal=USR1@T`, sent to the job
steps and not to the batch shell where Snakemake runs) reaches it and nothing else. Outside
Slurm it is a plain torchrun. By hand on several machines, MASTER_ADDR / NODE_RANK / NNODES
(and MASTER_PORT) select the rendezvous, as the seed's scripts did. NCCL/InfiniBand settings
come from config.yaml's `cluster:` section. A failed rendezvous or node is reported in
one line naming the node.

With `--stop-file PATH` (the train job passes results/train/<run>/stop_request), SIGUSR1 to
the launch or to a node agent becomes a stop request for the ranks (vlnflow.train.stop), and
the launch exits 75 when the training stopped on request after a complete checkpoint.

    vlnflow launch [--config config.yaml] [--nodes N] [--gpus-per-node G] [--stop-file F] -- SCRIPT [ARGS...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlnflow.errors import UserError
from vlnflow.train import stop


class LaunchError(UserError):
    """The launch is mis-configured (node count, rendezvous address) or a node failed."""


# config.yaml cluster.nccl key -> environment variables it sets.
NCCL_ENV = {
    "ib_disable": ("NCCL_IB_DISABLE",),
    "ib_hca": ("NCCL_IB_HCA",),
    "ib_gid_index": ("NCCL_IB_GID_INDEX",),
    "net_gdr_level": ("NCCL_NET_GDR_LEVEL",),
    "socket_ifname": ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"),
    "nvls_enable": ("NCCL_NVLS_ENABLE",),
    "debug": ("NCCL_DEBUG",),
}
RDZV_ERROR = re.compile(r"\b(Rendezvous\w*Error|DistStoreError|DistNetworkError)\b")
# torchrun's "Root Cause (first observed failure)" block: which rank died and how.
ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")
ROOT_CAUSE_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)[^(]*(?:\(pid:[^)]*\))?\s*(\(SIG\w+\))?")


@dataclass(frozen=True)
class SlurmAllocation:
    """The nodes of the Slurm job we run in (ordered as Slurm numbers them: SLURM_NODEID)."""

    job_id: str
    nodes: tuple[str, ...]
    first_node_addr: str
    cpus_per_node: int | None = None


@dataclass(frozen=True)
class Launch:
    """What to run: `argv` with `env` added to the current environment."""

    argv: list[str]
    env: dict[str, str]
    mode: str  # "slurm" (srun -> one node agent per node) or "local" (torchrun on this node)
    nnodes: int
    nproc_per_node: int
    node_rank: int  # this node's rank in local mode; 0 (each agent reads SLURM_NODEID) in slurm mode
    rdzv_endpoint: str
    rdzv_timeout_s: int
    nodes: tuple[str, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------- pure builders
def nccl_env(cluster: Mapping, environ: Mapping[str, str]) -> dict[str, str]:
    """NCCL_* (and GLOO_SOCKET_IFNAME) from cluster.nccl; a variable already in `environ` wins."""
    env = {}
    for key, names in NCCL_ENV.items():
        value = (cluster.get("nccl") or {}).get(key)
        if value is None:
            continue
        for name in names:
            if name not in environ:
                env[name] = str(value)
    return env


def torchrun_argv(*, nnodes: int, nproc_per_node: int, node_rank: int, rdzv_backend: str, rdzv_endpoint: str,
                  rdzv_id: str, rdzv_timeout_s: int, script: str, script_args: Sequence[str],
                  module: bool = False, is_host: bool | None = None, python: str = sys.executable) -> list[str]:
    """The torchrun command one node runs.

    static: global ranks follow node_rank (node 0 holds ranks 0..G-1). c10d: torchrun orders
    nodes itself (by host name, then pid) and ignores --node-rank, so it is not passed;
    `is_host` says whether this node serves the rendezvous store (None: torchrun guesses).
    """
    if rdzv_backend == "static":
        rank_args, conf = [f"--node-rank={node_rank}"], [f"timeout={rdzv_timeout_s}"]
    else:
        rank_args, conf = [], [f"join_timeout={rdzv_timeout_s}"]
        if is_host is not None:
            conf.append(f"is_host={int(is_host)}")
    argv = [python, "-m", "torch.distributed.run",
            f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", *rank_args,
            f"--rdzv-backend={rdzv_backend}", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf={','.join(conf)}", "--max-restarts=0"]
    if module:
        argv.append("--module")
    return argv + [script, *script_args]


def plan_launch(cluster: Mapping, script: str, script_args: Sequence[str], environ: Mapping[str, str],
                slurm: SlurmAllocation | None = None, *, module: bool = False,
                python: str = sys.executable) -> Launch:
    """Decide how to launch `script` from the cluster config, the environment and the Slurm allocation.

    Pure: no process is started, nothing is looked up. Raises LaunchError on a node-count
    mismatch or a multi-node launch outside Slurm without MASTER_ADDR / NODE_RANK.
    """
    nproc = int(cluster["gpus_per_node"])
    timeout_s = int(cluster["rdzv_timeout_s"])
    port = int(environ.get("MASTER_PORT") or cluster["rdzv_port"])
    env = {**nccl_env(cluster, environ), "VLNFLOW_DIST_BACKEND": str(cluster["backend"])}
    common = dict(rdzv_backend=cluster["rdzv_backend"], rdzv_timeout_s=timeout_s,
                  script=script, script_args=list(script_args), module=module, python=python)

    if slurm is not None:
        nnodes = len(slurm.nodes)
        if int(cluster["nodes"]) != nnodes:
            raise LaunchError(
                f"config setting 'cluster.nodes' is {cluster['nodes']} but Slurm job {slurm.job_id} has "
                f"{nnodes} node(s) ({','.join(slurm.nodes)}): give the train rule resources nodes="
                f"{cluster['nodes']} (with mpi='srun', tasks={cluster['nodes']} when > 1) or change cluster.nodes")
        env.update(VLNFLOW_NNODES=str(nnodes), VLNFLOW_NPROC_PER_NODE=str(nproc))
        # Also one node: the ranks get a job step of their own, which Slurm's --signal reaches.
        host = environ.get("MASTER_ADDR") or slurm.first_node_addr
        endpoint = f"{host}:{port}"
        srun = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1",
                "--overlap", "--kill-on-bad-exit=1", "--export=ALL"]
        if slurm.cpus_per_node:
            srun.append(f"--cpus-per-task={slurm.cpus_per_node}")
        agent = [python, "-m", "vlnflow.train.launch", "--node-agent",
                 f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--rdzv-endpoint={endpoint}",
                 f"--rdzv-backend={common['rdzv_backend']}", f"--rdzv-timeout={timeout_s}",
                 f"--rdzv-id=vlnflow-{slurm.job_id}"]
        if "MASTER_ADDR" not in environ:
            agent.append("--first-node-hosts")  # node 0 is the rendezvous host: say so, no guessing
        if module:
            agent.append("--module")
        return Launch(srun + agent + ["--", script, *script_args], env, "slurm", nnodes, nproc, 0, endpoint,
                      timeout_s, slurm.nodes)
    nnodes = int(environ.get("NNODES") or cluster["nodes"])
    if nnodes > 1 and not (environ.get("MASTER_ADDR") and environ.get("NODE_RANK")):
        raise LaunchError(
            f"a {nnodes}-node launch outside Slurm (cluster.nodes / NNODES={nnodes}) needs MASTER_ADDR "
            f"(address of node 0) and NODE_RANK (0..{nnodes - 1}) set on every node; or run it under Slurm")
    node_rank = int(environ.get("NODE_RANK") or 0)
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} is outside 0..{nnodes - 1} (NNODES={nnodes})")
    host = environ.get("MASTER_ADDR") or "127.0.0.1"
    rdzv_id = f"vlnflow-{host}-{port}"
    endpoint = f"{host}:{port}"
    argv = torchrun_argv(nnodes=nnodes, nproc_per_node=nproc, node_rank=node_rank, rdzv_endpoint=endpoint,
                         rdzv_id=rdzv_id, is_host=node_rank == 0, **common)
    env.update(VLNFLOW_NNODES=str(nnodes), VLNFLOW_NPROC_PER_NODE=str(nproc), VLNFLOW_NODE_RANK=str(node_rank))
    return Launch(argv, env, "local", nnodes, nproc, node_rank, endpoint, timeout_s)


def slurm_resources(cluster: Mapping) -> dict:
    """Snakemake resources for a rule that calls `vlnflow launch` (use as `resources: **slurm_resources(...)`).

    More than one node needs mpi="srun" and one task per node: without `mpi` the Slurm
    executor wraps the rule in a one-task step and the job silently runs on one node. One
    node gets mpi="" (the plugin's jobstep checks only that the key exists): the rule then runs
    in the batch step, un-wrapped, as on several nodes, so the launch's own srun step is the
    job's only step and Slurm's warning signal (sent to the steps) reaches the ranks and not
    Snakemake. The site part (gres, CPUs, memory, --exclusive) stays in the profile's set-resources.
    """
    nodes = int(cluster["nodes"])
    return {"nodes": nodes, "tasks": nodes, "mpi": "srun"} if nodes > 1 else {"nodes": 1, "tasks": 1, "mpi": ""}


def describe_failure(node: str, node_rank: int, nnodes: int, endpoint: str, returncode: int,
                     rdzv_error: str | None, timeout_s: int, root_cause: str | None = None) -> str:
    """One line naming the node (and the rank torchrun saw die first) and what to check, for a failed torchrun."""
    where = f"node {node} (node rank {node_rank} of {nnodes})"
    if rdzv_error:
        return (f"{where}: rendezvous at {endpoint} failed ({rdzv_error}): not every node joined within "
                f"{timeout_s} s (cluster.rdzv_timeout_s) or {endpoint} was unreachable; check that all {nnodes} "
                f"nodes started the same command and can reach {endpoint} (cluster.rdzv_port, MASTER_ADDR, "
                f"cluster.nccl.socket_ifname)")
    died = f"{root_cause}, " if root_cause else ""
    return f"{where}: {died}torchrun exited with code {returncode}; the failing rank's error is above"


# ----------------------------------------------------------------------------- Slurm look-ups
def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise LaunchError(f"'{argv[0]}' not found on this node, but SLURM_JOB_ID is set") from exc
    if proc.returncode != 0:
        raise LaunchError(f"'{shlex.join(argv)}' failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def slurm_allocation(environ: Mapping[str, str], run: Callable[[list[str]], str] = _run) -> SlurmAllocation | None:
    """The current Slurm job's nodes, or None outside Slurm.

    Works when the Snakemake job step stripped SLURM_JOB_NODELIST/SLURM_NNODES: only
    SLURM_JOB_ID is needed (`squeue -j` gives the node list and CPU count).
    """
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job_id:
        return None
    fields = run(["squeue", "-h", "-j", job_id, "-o", "%N|%C|%D"]).strip().splitlines()
    if not fields or "|" not in fields[0]:
        raise LaunchError(f"squeue does not know Slurm job {job_id} (SLURM_JOB_ID): is it still running?")
    nodelist, cpus, count = fields[0].split("|")
    nodes = tuple(run(["scontrol", "show", "hostnames", nodelist]).split())
    if len(nodes) != int(count):
        raise LaunchError(f"Slurm job {job_id}: node list {nodelist} expands to {len(nodes)} nodes, squeue says {count}")
    node_info = run(["scontrol", "show", "node", "-o", nodes[0]])
    match = re.search(r"\bNodeAddr=(\S+)", node_info)
    cpus_per_node = int(cpus) // len(nodes) if cpus.isdigit() else None
    return SlurmAllocation(job_id, nodes, match.group(1) if match else nodes[0], cpus_per_node)


# ----------------------------------------------------------------------------- running
def _spawn_context(env: Mapping[str, str]):
    """With a stop file the children start with SIGUSR1 ignored (vlnflow.train.stop); else unchanged."""
    return stop.ChildrenIgnoreStopSignal() if env.get(stop.STOP_FILE_ENV) else contextlib.nullcontext()


def run_forwarding_stderr(argv: list[str], env: Mapping[str, str]) -> tuple[int, str | None, str | None]:
    """Run argv; copy its stderr through line by line and return (exit code, first rendezvous error seen,
    torchrun's root cause as "rank R (local rank L) exited with code C (SIGNAL)" or None)."""
    rdzv_error, in_root_cause, rank, root_cause = None, False, None, None
    with _spawn_context(env):
        proc = subprocess.Popen(argv, env=dict(env), stderr=subprocess.PIPE, text=True, errors="replace")
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        if rdzv_error is None and (match := RDZV_ERROR.search(line)):
            rdzv_error = match.group(1)
        if root_cause is None:
            in_root_cause = in_root_cause or "Root Cause (first observed failure)" in line
            if in_root_cause and (match := ROOT_CAUSE_RANK.match(line)):
                rank = f"rank {match.group(1)} (local rank {match.group(2)})"
            elif in_root_cause and rank and (match := ROOT_CAUSE_EXIT.match(line)):
                root_cause = f"{rank} exited with code {match.group(1)}" + (f" {match.group(2)}" if match.group(2) else "")
    return proc.wait(), rdzv_error, root_cause


def visible_gpu_problem(environ: Mapping[str, str], nproc_per_node: int, where: str) -> str | None:
    """An error line when NCCL is used and CUDA_VISIBLE_DEVICES lists fewer GPUs than processes."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if environ.get("VLNFLOW_DIST_BACKEND", "nccl") != "nccl" or visible is None:
        return None
    count = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if count >= nproc_per_node:
        return None
    return (f"{where} sees {count} GPU(s) (CUDA_VISIBLE_DEVICES={visible}) but cluster.gpus_per_node is "
            f"{nproc_per_node}: request gres gpu:{nproc_per_node} per node in the profile")


def run_torchrun(argv: list[str], env: Mapping[str, str], *, node_name: str, node_rank: int, nnodes: int,
                 nproc_per_node: int, rdzv_endpoint: str, rdzv_timeout_s: int) -> int:
    """Run one node's torchrun; on failure print one line naming the node and return its exit code."""
    where = f"node {node_name} (node rank {node_rank} of {nnodes})"
    problem = visible_gpu_problem(env, nproc_per_node, where)
    if problem:
        print(f"vlnflow launch: error: {problem}", file=sys.stderr, flush=True)
        return 2
    env = {**env, "VLNFLOW_NODE_NAME": node_name, "VLNFLOW_NODE_RANK": str(node_rank)}
    print(f"[vlnflow launch] {where}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    returncode, rdzv_error, root_cause = run_forwarding_stderr(argv, env)
    if returncode != 0:
        print("vlnflow launch: error: " + describe_failure(node_name, node_rank, nnodes, rdzv_endpoint, returncode,
                                                          rdzv_error, rdzv_timeout_s, root_cause),
              file=sys.stderr, flush=True)
    return returncode


def this_node_name(environ: Mapping[str, str]) -> str:
    """Slurm's name for this node when there is one (two logical nodes may share a host), else the hostname."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_agent(args: argparse.Namespace) -> int:
    """Entry point srun runs on every node: the node's rank comes from SLURM_NODEID; with a stop file
    (exported by the launch) SIGUSR1 on this node becomes a stop request."""
    node_rank = int(os.environ.get("SLURM_NODEID", "0"))
    if os.environ.get(stop.STOP_FILE_ENV):
        stop.catch_stop_signal(os.environ[stop.STOP_FILE_ENV], f"node {this_node_name(os.environ)}")
    argv = torchrun_argv(nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, node_rank=node_rank,
                         rdzv_backend=args.rdzv_backend, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                         rdzv_timeout_s=args.rdzv_timeout, script=args.script, script_args=args.script_args,
                         module=args.module, is_host=(node_rank == 0) if args.first_node_hosts else None)
    return run_torchrun(argv, os.environ, node_name=this_node_name(os.environ), node_rank=node_rank,
                        nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, rdzv_endpoint=args.rdzv_endpoint,
                        rdzv_timeout_s=args.rdzv_timeout)


def launch(args: argparse.Namespace) -> int:
    """`vlnflow launch`: plan from config + environment + Slurm, then run (or print with --dry-run)."""
    if args.node_agent:
        return node_agent(args)
    from vlnflow.config import load_config

    cluster = dict(load_config(args.config)["cluster"])
    for key in ("nodes", "gpus_per_node", "backend", "rdzv_port"):
        if getattr(args, key) is not None:
            cluster[key] = getattr(args, key)
    if not args.script:
        raise LaunchError("no script given: put the script to run after '--', e.g. vlnflow launch -- train.py")
    environ = dict(os.environ)
    plan = plan_launch(cluster, args.script, args.script_args, environ, slurm_allocation(environ),
                       module=args.module)
    extra = {stop.LAUNCHED_AT_ENV: f"{time.time():.3f}"}  # train.max_hours counts from here
    if args.stop_file:
        extra[stop.STOP_FILE_ENV] = str(Path(args.stop_file).resolve())
    print(f"[vlnflow launch] {plan.mode}: {plan.nnodes} node(s) x {plan.nproc_per_node} process(es), "
          f"rendezvous {plan.rdzv_endpoint}" + (f", nodes {','.join(plan.nodes)}" if plan.nodes else ""),
          file=sys.stderr, flush=True)
    if args.dry_run:
        for key, value in sorted(plan.env.items()):
            print(f"{key}={shlex.quote(value)}")
        print(shlex.join(plan.argv))
        return 0
    env = {**environ, **plan.env, **extra}
    if args.stop_file:
        stop.clear_stale(env[stop.STOP_FILE_ENV])
        stop.catch_stop_signal(env[stop.STOP_FILE_ENV], f"vlnflow launch (pid {os.getpid()}, {socket.gethostname()})")
    if plan.mode == "local":
        returncode = run_torchrun(plan.argv, env, node_name=this_node_name(environ), node_rank=plan.node_rank,
                                  nnodes=plan.nnodes, nproc_per_node=plan.nproc_per_node,
                                  rdzv_endpoint=plan.rdzv_endpoint, rdzv_timeout_s=plan.rdzv_timeout_s)
        return stopped_or(returncode, env)
    print(f"[vlnflow launch] {shlex.join(plan.argv)}", file=sys.stderr, flush=True)
    with _spawn_context(env):
        proc = subprocess.Popen(plan.argv, env=env)
    returncode = proc.wait()
    if stopped_or(returncode, env) == stop.EXIT_STOPPED:
        return stop.EXIT_STOPPED
    if returncode != 0:
        print(f"vlnflow launch: error: training failed in Slurm job {env.get('SLURM_JOB_ID')} on nodes "
              f"{','.join(plan.nodes)} (srun exit {returncode}); the failing node is named in the lines above",
              file=sys.stderr, flush=True)
    return returncode


def stopped_or(returncode: int, env: Mapping[str, str]) -> int:
    """EXIT_STOPPED when the trainer left its stopped marker (it stopped on request after a complete
    checkpoint; any exit code of the processes after that does not matter), else `returncode`."""
    request = env.get(stop.STOP_FILE_ENV)
    record = stop.read_record(stop.stopped_path(request)) if request else None
    if record is None:
        return returncode
    print(f"[vlnflow launch] training stopped on request after step {record.get('step')} "
          f"({record.get('reason')}: {record.get('why')}); its checkpoint is complete, run it again to resume "
          f"(exit {stop.EXIT_STOPPED})", file=sys.stderr, flush=True)
    return stop.EXIT_STOPPED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.yaml", help="config.yaml with the cluster: section")
    parser.add_argument("--nodes", type=int, help="override cluster.nodes")
    parser.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, help="override cluster.gpus_per_node")
    parser.add_argument("--backend", choices=["nccl", "gloo"], help="override cluster.backend")
    parser.add_argument("--rdzv-port", dest="rdzv_port", type=int, help="override cluster.rdzv_port")
    parser.add_argument("-m", "--module", action="store_true", help="SCRIPT is a module name (python -m)")
    parser.add_argument("--dry-run", action="store_true", help="print the environment and command, run nothing")
    parser.add_argument("--stop-file", dest="stop_file", metavar="PATH",
                        help="stop-request file: SIGUSR1 writes it and the ranks stop at the next step after a "
                             "checkpoint (vlnflow.train.stop); exit 75 when they did")
    # Internal: what srun starts on each node.
    parser.add_argument("--node-agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nnodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nproc-per-node", dest="nproc_per_node", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rdzv-endpoint", dest="rdzv_endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--rdzv-backend", dest="rdzv_backend", help=argparse.SUPPRESS)
    parser.add_argument("--rdzv-timeout", dest="rdzv_timeout", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rdzv-id", dest="rdzv_id", help=argparse.SUPPRESS)
    parser.add_argument("--first-node-hosts", dest="first_node_hosts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("script", nargs="?", help="the script (or module with -m) torchrun starts per process")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("launch", help="run a script with torchrun on 1..N nodes (Slurm-aware)",
                                   description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(func=launch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlnflow.train.launch", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return launch(args)
    except UserError as exc:
        print(f"vlnflow launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
