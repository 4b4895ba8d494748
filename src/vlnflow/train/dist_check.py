"""Rendezvous self-test: every rank reports its node, host and rank, checks the world, all-reduces.

Why: a multi-node launch can "work" while being wrong (a node with a different
gpus_per_node, a second node that never joined, ranks on one host only). Run it with
`vlnflow launch -- $(python -c 'import vlnflow.train.dist_check as m; print(m.__file__)') --out report.json`
(or `vlnflow launch -m -- vlnflow.train.dist_check`) before a long training job. The
trainer calls `verify_world()` right after `init_process_group` for the same checks, then
`verify_manifest()`: every rank must see the same feature cache manifest before step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from vlnflow.errors import UserError


class WorldMismatchError(UserError):
    """The nodes of one job disagree about its shape (nodes x processes per node)."""


class CacheMismatchError(UserError):
    """A rank cannot read the feature cache manifest, or ranks see different manifests."""


def rank_facts() -> dict:
    """What this rank knows about itself from torchrun's and vlnflow launch's environment."""
    env = os.environ
    return {
        "rank": int(env.get("RANK", 0)),
        "world_size": int(env.get("WORLD_SIZE", 1)),
        "local_rank": int(env.get("LOCAL_RANK", 0)),
        "local_world_size": int(env.get("LOCAL_WORLD_SIZE", 1)),
        "group_rank": int(env.get("GROUP_RANK", 0)),  # torchrun's node index in the rendezvous
        "node": env.get("VLNFLOW_NODE_NAME") or socket.gethostname(),
        "node_rank": int(env.get("VLNFLOW_NODE_RANK", env.get("GROUP_RANK", 0))),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "expected_nnodes": int(env.get("VLNFLOW_NNODES", 0)) or None,
        "expected_nproc_per_node": int(env.get("VLNFLOW_NPROC_PER_NODE", 0)) or None,
    }


def check_world(facts: Sequence[dict]) -> list[str]:
    """Problems with the gathered facts of every rank (empty when all nodes agree); each names the node."""
    problems = []
    world = len(facts)
    nodes: dict[int, list[dict]] = {}
    for fact in facts:
        nodes.setdefault(fact["group_rank"], []).append(fact)

    def where(fact: dict) -> str:
        return f"node {fact['node']} (node rank {fact['node_rank']}, host {fact['host']})"

    for group_rank in sorted(nodes):
        first = nodes[group_rank][0]
        nnodes, nproc = first["expected_nnodes"], first["expected_nproc_per_node"]
        if nnodes and nproc and nnodes * nproc != world:
            problems.append(f"{where(first)} expects {nnodes} node(s) x {nproc} process(es) = {nnodes * nproc} "
                            f"ranks but the job has {world}")
        if nproc and len(nodes[group_rank]) != nproc:
            problems.append(f"{where(first)} runs {len(nodes[group_rank])} process(es), expected {nproc}")
    for fact in facts:
        if fact["world_size"] != world:
            problems.append(f"{where(fact)} rank {fact['rank']} believes the world size is {fact['world_size']}, "
                            f"but {world} ranks joined")
    expected_nodes = {f["expected_nnodes"] for f in facts if f["expected_nnodes"]}
    if len(expected_nodes) == 1 and len(nodes) != next(iter(expected_nodes)):
        joined = ", ".join(sorted({f["node"] for f in facts}))
        problems.append(f"{len(nodes)} node(s) joined ({joined}), expected {next(iter(expected_nodes))}")
    if problems:
        problems.append("nodes disagree: every node must run the same command with the same "
                        "cluster.nodes and cluster.gpus_per_node")
    return problems


def verify_world(dist=None) -> list[dict]:
    """Gather every rank's facts (collective call) and raise WorldMismatchError naming the node if they disagree."""
    if dist is None:
        import torch.distributed as dist
    facts: list = [None] * dist.get_world_size()
    dist.all_gather_object(facts, rank_facts())
    problems = check_world(facts)
    if problems:
        raise WorldMismatchError("; ".join(problems))
    return facts


def manifest_facts(path: str | Path) -> dict:
    """What this rank sees at the feature cache manifest: its encoder fingerprint and sample count, or the error."""
    from vlnflow.cache.manifest import load_manifest

    facts = rank_facts()
    seen = {"rank": facts["rank"], "node": facts["node"], "host": facts["host"], "path": str(Path(path).absolute()),
            "encoder_fingerprint": None, "samples": None, "error": None}
    try:
        manifest = load_manifest(path)
        seen.update(encoder_fingerprint=manifest["encoder_fingerprint"], samples=int(manifest["samples"]))
    except (UserError, OSError, ValueError, KeyError, TypeError) as exc:
        seen["error"] = f"{type(exc).__name__}: {exc}"
    return seen


def check_manifests(seen: Sequence[dict]) -> list[str]:
    """Problems with what every rank saw at the cache manifest (empty when all agree); each names node and path."""
    def where(fact: dict) -> str:
        return f"node {fact['node']} (host {fact['host']}, rank {fact['rank']})"

    problems = [f"{where(f)} cannot read the feature cache manifest {f['path']}: {f['error']}" for f in seen if f["error"]]
    readable = [f for f in seen if not f["error"]]
    if readable:
        ref = readable[0]  # rank 0 when it could read the manifest
        for fact in readable[1:]:
            if (fact["encoder_fingerprint"], fact["samples"]) != (ref["encoder_fingerprint"], ref["samples"]):
                problems.append(
                    f"{where(fact)} sees manifest {fact['path']} with encoder {fact['encoder_fingerprint']} and "
                    f"{fact['samples']} samples, but {where(ref)} sees {ref['path']} with encoder "
                    f"{ref['encoder_fingerprint']} and {ref['samples']} samples")
    if problems:
        problems.append("every node must see the same feature cache (train.cache) on a shared filesystem")
    return problems


def verify_manifest(path: str | Path, dist=None) -> dict:
    """Before step 1 on several ranks: every rank must read the same manifest (collective call, one small
    all_gather). Raises CacheMismatchError naming the node and the path; returns rank 0's view."""
    if dist is None:
        import torch.distributed as dist
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, manifest_facts(path))
    problems = check_manifests(seen)
    if problems:
        raise CacheMismatchError("; ".join(problems))
    return seen[0]


def describe_rank(fact: dict) -> str:
    """The one line every rank logs about itself."""
    return (f"rank {fact['rank']}/{fact['world_size']} local_rank {fact['local_rank']} "
            f"node {fact['node']} node_rank {fact['node_rank']} host {fact['host']} pid {fact['pid']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=os.environ.get("VLNFLOW_DIST_BACKEND", "nccl"))
    parser.add_argument("--out", type=Path, help="rank 0 writes the JSON report here")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    try:
        me = rank_facts()
        print(f"[dist_check] {describe_rank(me)} backend {args.backend}", flush=True)
        facts = verify_world(dist)
        world = dist.get_world_size()
        value = torch.tensor([float(me["rank"] + 1)], device=device)
        dist.all_reduce(value)
        expected = world * (world + 1) / 2
        ok = abs(value.item() - expected) < 1e-6
        print(f"[dist_check] rank {me['rank']}: all_reduce sum {value.item():g} (expected {expected:g}) "
              f"{'ok' if ok else 'WRONG'}", flush=True)
        if me["rank"] == 0 and args.out:
            report = {"backend": args.backend, "world_size": world,
                      "nnodes": len({f["group_rank"] for f in facts}),
                      "all_reduce": {"value": value.item(), "expected": expected, "ok": ok},
                      "ranks": sorted(facts, key=lambda f: f["rank"])}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(args.out.name + ".partial")
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(args.out)
        dist.barrier()
        return 0 if ok else 1
    except WorldMismatchError as exc:
        print(f"[dist_check] error: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
