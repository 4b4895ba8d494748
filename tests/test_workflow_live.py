"""Live VGGT is first-class (issue 14): with `train.cache: null`, `snakemake train` needs no precompute.

The DAG of `train` then holds no cache job (dry run), and a train-only run on the demo passes with no
cache file anywhere, every sample encoded live. The same dry run with the cache configured does ask for
the cache, so the first check can fail.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

CACHE_RULES = {"precompute_shard", "validate_shard", "spot_check_cache", "merge_manifest", "validate_cache"}
JOB_HEADER = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):\s*$")


def rules_run(proc) -> set[str]:
    return {m.group(1) for line in (proc.stdout + proc.stderr).splitlines() if (m := JOB_HEADER.match(line))}


@pytest.fixture
def live_workflow(workflow_copy, demo_data):
    """A workflow copy on three demo episodes, training 2 optimizer steps live."""
    root = workflow_copy.path / "data" / "episodes"
    for name in ("ep0000", "ep0005", "ep0006"):
        shutil.copytree(demo_data / "episodes" / name, root / name)
    workflow_copy.configure({
        "dataset": {"root": "data/episodes"},
        "train": {"cache": None, "max_steps": 2, "per_device_batch": 1, "grad_accum": 1, "save_every": 100,
                  "loader": {"workers": 0}},
    })  # fmt: skip
    return workflow_copy


@pytest.mark.slow
def test_train_without_cache_plans_no_cache_job(live_workflow):
    dry = live_workflow.snakemake("-n", "train")
    planned = rules_run(dry)
    assert "train" in planned and "index" in planned
    assert planned.isdisjoint(CACHE_RULES), planned
    everything = rules_run(live_workflow.snakemake("-n", "all"))  # `all` (export, report) asks for no cache either
    assert {"train", "export", "benchmark_report"} <= everything and everything.isdisjoint(CACHE_RULES), everything

    live_workflow.configure({"train": {"cache": "results/cache/manifest.json"}})
    cached = rules_run(live_workflow.snakemake("-n", "train"))
    assert "validate_cache" in cached and "merge_manifest" in cached  # the same target with a cache waits for it


@pytest.mark.slow
def test_train_only_run_without_cache_passes_with_no_cache_file(live_workflow):
    wf = live_workflow
    proc = wf.snakemake("train")
    assert rules_run(proc).isdisjoint(CACHE_RULES)
    assert not (wf.path / "results" / "cache").exists(), "a live run must not create or need any cache file"
    assert not list(wf.path.rglob("*.h5"))
    metrics = [json.loads(line) for line in (wf.path / "results/train/demo/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1]["cached_samples"] == 0 and metrics[-1]["live_samples"] == 2
    assert "VGGT feature cache disabled" in (wf.path / "results/train/demo/train.log").read_text()
    assert json.loads((wf.path / "results/train/demo/summary.json").read_text())
