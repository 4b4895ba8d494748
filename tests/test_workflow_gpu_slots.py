"""`snakemake precompute_all -j 4` on a node with 2 (faked) GPUs (issue 11): never more than 2 GPU jobs
at once (read from the slot records), every shard computed once, each job's log naming its GPU, and
the cache identical to computing the shards one at a time. Plus: the dry run lists gpu=1 for every GPU job."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from conftest import copy_workflow
from vlnflow.cache import format as fmt
from vlnflow.cache.precompute import precompute_shard
from vlnflow.config import load_config
from vlnflow.data.shards import stored_fingerprint
from vlnflow.workflow.gpu_slots import max_concurrent, read_claims

SHARDS = [f"shard_{i:05d}" for i in range(4)]
CONFIG = {"shards": {"count": len(SHARDS)}, "cache": {"spot_check": 1}}


def _workflow(path, demo_data):
    wf = copy_workflow(path)
    wf.configure({**CONFIG, "dataset": {"root": str(demo_data / "episodes")}})
    return wf


def _features(wf, shard: str) -> np.ndarray:
    with h5py.File(wf.path / "results" / "cache" / f"{shard}.h5") as f:
        return f[fmt.FEATURES][...]


@pytest.mark.slow
def test_j4_with_two_gpus_runs_at_most_two_gpu_jobs_at_once_and_matches_serial(tmp_path, demo_data, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("VLNFLOW_FAKE_GPUS", "2")
    wide = _workflow(tmp_path / "j4", demo_data)
    wide.snakemake("precompute_all", cores=4)

    records = read_claims(wide.path / "results" / "gpu_slots")
    claims = [r for r in records if r["event"] == "claim"]
    assert sorted(r["job"] for r in claims) == sorted([f"precompute_shard {s}" for s in SHARDS] + ["spot_check_cache"]), (
        "every GPU job claimed a slot: each shard computed once, and one job spot-checked them all"
    )
    assert {r["slot"] for r in claims} <= {0, 1} and {r["device"] for r in claims} <= {"0", "1"}
    assert len([r for r in records if r["event"] == "release"]) == len(claims)
    assert max_concurrent(records) <= 2, "more GPU jobs at once than GPUs"
    for shard in SHARDS:
        stats = json.loads((wide.path / f"results/benchmark/precompute/{shard}.stats.json").read_text())
        log = (wide.path / f"results/logs/precompute/{shard}.log").read_text()
        assert stats["gpu"]["how"] == "claimed" and stats["computed"] == stats["samples"] > 0
        assert re.search(rf"precompute_shard {shard}: GPU slot {stats['gpu']['slot']} of 2 claimed: "
                         rf"CUDA_VISIBLE_DEVICES={stats['gpu']['device']}\b", log), log
        assert set(stats["time_split_s"]) == {"data_wait", "compute", "write_wait", "device_busy", "writer_hdf5"}

    # acceptance: a dry run lists gpu=1 in the resources of every GPU job (precompute_shard, spot_check_cache),
    # and validate_shard is a CPU job
    dry = wide.snakemake("-n", "precompute_all", "--forcerun", "precompute_shard", cores=8)
    text = dry.stdout + dry.stderr
    resources, rule = {}, None  # (rule, shard) -> that job's "resources:" line
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):\s*$", line):
            rule, shard = m.group(1), None
        elif m := re.match(r"^\s*wildcards: .*\bshard=(\w+)", line):
            shard = m.group(1)
        elif rule in ("precompute_shard", "validate_shard", "spot_check_cache") and line.strip().startswith("resources:"):
            resources[rule, shard] = line
    assert sorted(k for k in resources if k[0] == "precompute_shard") == [("precompute_shard", s) for s in SHARDS], text
    gpu_jobs = {k: v for k, v in resources.items() if k[0] != "validate_shard"}
    assert set(gpu_jobs) == {("precompute_shard", s) for s in SHARDS} | {("spot_check_cache", None)}, text
    assert all(re.search(r"\bgpu=1\b", line) for line in gpu_jobs.values()), resources
    assert not any(re.search(r"\bgpu=", v) for k, v in resources.items() if k[0] == "validate_shard"), resources

    # the same shards computed one at a time, in this process (what a `-j 1` job runs; a second Snakemake
    # run would double this test's time): bit-identical features
    config = load_config(wide.path / "config.yaml")
    for shard in SHARDS:
        table = wide.path / "results" / "shards" / f"{shard}.parquet"
        out = tmp_path / "serial" / f"{shard}.h5"
        precompute_shard(table, stored_fingerprint(table), out, tmp_path / "serial" / ".partial" / f"{shard}.h5", config, progress=False)
        with h5py.File(out) as f:
            serial = f[fmt.FEATURES][...]
        assert np.array_equal(_features(wide, shard).view(np.uint8), serial.view(np.uint8)), shard
