"""Input function of the benchmark_report rule: every file the pipeline's jobs wrote that the report reads.

Benchmark TSV paths come from each rule's own `benchmark:` directive, so the report follows the
rule files; a stage whose rule is not in the workflow contributes no files (and the report says so).
Naming these files as inputs makes `snakemake benchmark_report` run the pipeline first.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

# Report stage -> the rules whose benchmark files make up that stage.
STAGE_RULES = {
    "index": ("index",),
    "shard": ("shard",),
    "precompute": ("precompute_shard",),
    "manifest": ("merge_manifest",),
    "validate": ("validate_shard", "spot_check_cache", "validate_cache"),
    "train": ("train",),
}
TRAIN_METRICS = "results/train/{run}/metrics.jsonl"
LIVE_RUN = "{run}_live"


def fill(pattern: str, shards: list[str], run: str | None) -> list[str]:
    """A path pattern -> concrete paths: one per shard for {shard}, the run name for {run}."""
    if "{run}" in pattern and run is None:
        return []
    if "{shard}" in pattern:
        return [pattern.format(shard=s, run=run) for s in shards]
    return [pattern.format(run=run)]


def report_inputs(rules, checkpoints, workflow, config: dict) -> Callable:
    """Input function (use with `unpack`): named lists of benchmark TSVs, stats, manifest, metrics."""

    def produced(path: str) -> bool:
        return any(rule.is_producer(path) for rule in workflow.rules)

    def inputs(wildcards) -> dict[str, list[str]]:
        from vlnflow.workflow.helpers import shard_names

        shards = shard_names(checkpoints) if rules.has("shard") else []
        run = config.get("train", {}).get("run")
        live_only = config.get("train", {}).get("cache", "") is None  # train.cache: null builds no cache
        cache_rules = {"precompute_shard", "validate_shard", "spot_check_cache", "merge_manifest", "validate_cache"}
        out: dict[str, list[str]] = {}
        for stage, names in STAGE_RULES.items():
            out[stage] = [
                path
                for name in names
                if rules.has(name) and getattr(rules, name).rule.benchmark is not None and not (live_only and name in cache_rules)
                for path in fill(str(getattr(rules, name).benchmark), shards, run)
            ]
        out["samples"] = [str(rules.index.output.samples)] if rules.has("index") else []
        out["precompute_stats"] = (
            fill(str(rules.precompute_shard.output.stats), shards, run) if rules.has("precompute_shard") and not live_only else []
        )
        out["manifest_json"] = [str(rules.merge_manifest.output.json)] if rules.has("merge_manifest") and not live_only else []
        out["shard_list"] = [str(rules.shard.output[0])] if rules.has("shard") else []
        vision = config.get("cache", {}).get("vision") and rules.has("merge_vision_manifest")  # the per-frame vision cache
        out["vision_manifest"] = [str(rules.merge_vision_manifest.output.json)] if vision else []
        out["vision_stats"] = fill(str(rules.precompute_vision_shard.output.stats), shards, run) if vision else []
        train = fill(TRAIN_METRICS, shards, run)
        out["train_metrics"] = [p for p in train if produced(p)]
        live = []
        if run is not None and config["benchmark"]["compare_live_steps"] > 0:
            live = [p for p in fill(TRAIN_METRICS, shards, LIVE_RUN.format(run=run)) if produced(p)]
        out["live_metrics"] = live
        return out

    return inputs


def snakemake_command(pid: int | None = None) -> str:
    """The command line of the Snakemake process running this job (the report is a localrule, so an
    ancestor process is `snakemake ...`). Read from /proc at run time rather than passed as a param:
    a param would differ between `snakemake -n` and the real command and rerun the report every time."""
    pid = os.getppid() if pid is None else pid
    for _ in range(8):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        args = [a.decode(errors="replace") for a in argv]
        for i, arg in enumerate(args):
            if Path(arg).name == "snakemake":
                return shlex.join(["snakemake", *args[i + 1 :]])
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
        if pid <= 1:
            break
    return "unknown (no snakemake process among this job's ancestors)"
