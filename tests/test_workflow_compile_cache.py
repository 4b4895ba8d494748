"""Issue 21: two precompute jobs that start at once on one host share one torch.compile cache (compiling for real
on the CPU): both succeed, one compiles cold while the other waits and then finds the cache warm (a flag in
its stats JSON), neither recompiles after warm-up, each stats JSON splits its set-up, and the benchmark
report shows it. The live spot checks of both shards run in one job."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import copy_workflow
from vlnflow.report.per_gpu import per_gpu_markdown

SHARDS = ["shard_00000", "shard_00001"]
EPISODES = ("ep0000", "ep0001", "ep0005", "ep0008")  # both shards get episodes (shard_of with count 2)


@pytest.mark.slow
def test_two_jobs_at_once_share_one_compile_cache(tmp_path, demo_data):
    wf = copy_workflow(tmp_path / "workflow")
    for name in EPISODES:
        shutil.copytree(demo_data / "episodes" / name, wf.path / "data" / "episodes" / name)
    wf.configure({"dataset": {"root": "data/episodes"}, "shards": {"count": 2},
                  "spatial": {"compile": "on", "batch_size": 4}, "cache": {"spot_check": 1, "loader_workers": 0}})  # fmt: skip
    wf.snakemake("precompute_all", cores=2)

    stats = {s: json.loads((wf.path / f"results/benchmark/precompute/{s}.stats.json").read_text()) for s in SHARDS}
    assert all(st["computed"] == st["samples"] > 0 for st in stats.values())
    starts = sorted(st["started_at"] for st in stats.values())
    assert starts[1] - starts[0] < 10, "the two jobs started together"
    first = [s for s, st in stats.items() if st["compile"]["first_on_host"]]
    assert len(first) == 1, {s: st["compile"] for s, st in stats.items()}
    second = next(s for s in SHARDS if s not in first)
    assert stats[first[0]]["compile"]["cache_warm"] is False, "the first job compiled cold"
    assert stats[second]["compile"]["cache_warm"] is True, "the second job found the cache the first one filled"
    assert stats[second]["compile"]["counters"]["fxgraph_cache_miss"] == 0 < stats[second]["compile"]["counters"]["fxgraph_cache_hit"]
    cache_dir = wf.path / "results" / "compile_cache"
    assert {st["compile"]["cache_dir"] for st in stats.values()} == {str(next(cache_dir.iterdir()))}, "one directory per host"
    for st in stats.values():
        assert st["compile"]["enabled"] and st["compile"]["shapes"] == "dynamic"
        # two shape classes under the dynamic policy (samples of one frame, of several): two warm-up batches
        assert st["recompiles_after_warmup"] == 0 and st["warmup"]["warmup_batches"] == st["warmup"]["shape_classes"] == 2
        assert set(st["setup_split_s"]) == {"imports", "weights", "open", "first_data", "first_batch", "later_warmup"}
        assert st["setup_s"] == pytest.approx(sum(st["setup_split_s"].values())) and st["setup_split_s"]["imports"] > 0
        assert st["job_wall_s"] >= st["wall_s"] and st["steady_samples"] + st["warmup"]["warmup_samples"] == st["computed"]

    spot = json.loads((wf.path / "results/cache/validation/spot_check.json").read_text())
    assert spot["ok"] and sorted(spot["shards"]) == SHARDS and spot["samples_checked"] == 2
    validation = json.loads((wf.path / "results/cache/validation.json").read_text())
    assert validation["ok"] and validation["spot_checked"] == 2

    md = per_gpu_markdown([str(wf.path / f"results/benchmark/precompute/{s}.stats.json") for s in SHARDS])
    assert "Set-up and compiles per job" in md
    assert f"| {first[0]} | " in md and "cold (first on host)" in md and "| warm |" in md
