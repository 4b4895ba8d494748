"""Snakemake with several sources (issue 22), JanusVLN's Base -> DAgger -> Extra in miniature:

1. R2R-CE alone (VLN-CE layout) builds a validated cache;
2. adding the DAgger source plans precompute jobs for the DAgger shards only, and leaves every R2R shard and
   cache file byte-identical and untouched;
3. appending trajectories to the DAgger source (the next round) encodes exactly the new samples, and the
   cache equals a from-scratch build of the same data, bit for bit.

The tests share one workflow copy (module scope) and run in file order.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import WorkflowCopy, copy_workflow
from vlnflow.cache import format as fmt
from vlnflow.cache.precompute import precompute_shard
from vlnflow.config import load_config
from vlnflow.data.demo import write_dagger_trajectory, write_vlnce_episodes
from vlnflow.data.shards import stored_fingerprint

TARGET = "precompute_all"
R2R_EPISODES = ("ep0000", "ep0005", "ep0006")  # 3 + 4 + 5 steps
R2R = {"name": "r2r", "root": "r2r", "vlnce_episodes": "r2r_train.json.gz"}
DAGGER = {"name": "dagger_r2r", "root": "dagger", "shards": 2}
JOB_HEADER = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):\s*$")
WILDCARD = re.compile(r"^\s*wildcards: .*\bshard=([\w.]+)")


def jobs(proc: subprocess.CompletedProcess, rule: str) -> list[str]:
    """Sorted shard wildcards of the `rule` jobs a (dry) run printed."""
    found, current = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := JOB_HEADER.match(line):
            current = m.group(1)
        elif (m := WILDCARD.match(line)) and current == rule:
            found.append(m.group(1))
    return sorted(found)


def files(wf, pattern: str) -> dict[str, tuple[int, bytes]]:
    """name -> (mtime_ns, bytes) of the files matching pattern under results/."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((wf.path / "results").glob(pattern))}


def stats(wf, shard: str) -> dict:
    return json.loads((wf.path / f"results/benchmark/precompute/{shard}.stats.json").read_text())


@pytest.fixture(scope="module")
def wf(tmp_path_factory, demo_data) -> WorkflowCopy:
    """A workflow copy whose data folder holds an R2R-CE set (3 short demo episodes, VLN-CE layout) and a copy of
    the demo's DAgger-layout set; configured with the R2R source only and built once."""
    copy = copy_workflow(tmp_path_factory.mktemp("sources_wf") / "workflow")
    data = copy.path / "data"
    for name in R2R_EPISODES:
        shutil.copytree(demo_data / "episodes" / name, data / "r2r" / name)
    write_vlnce_episodes(str(data / "r2r_train.json.gz"), str(data / "r2r"), list(R2R_EPISODES))
    shutil.copytree(demo_data / "dagger", data / "dagger")
    copy.data = data
    copy.configure({
        "dataset": {"root": "data", "prompt_style": "action", "sources": [R2R]},
        "shards": {"count": 2},
        "cache": {"spot_check": 1},
    })  # fmt: skip
    copy.first_run = copy.snakemake(TARGET, cores=2)
    return copy


@pytest.mark.slow
def test_one_source_builds_its_own_shards(wf):
    assert jobs(wf.first_run, "precompute_shard") == ["r2r.shard_00000", "r2r.shard_00001"]
    validation = json.loads((wf.path / "results/cache/validation.json").read_text())
    assert validation["ok"] and validation["samples_cached"] == validation["samples_indexed"] == 3 + 4 + 5
    index = pd.read_parquet(wf.path / "results/index/samples.parquet")
    assert index.sample_id.str.startswith("r2r/").all() and index.frames.map(lambda f: f[0].startswith("r2r/ep")).all()


@pytest.mark.slow
def test_adding_a_source_plans_and_writes_only_its_shards(wf):
    shards_before, cache_before = files(wf, "shards/r2r.*.parquet"), files(wf, "cache/r2r.*.h5")
    assert len(shards_before) == len(cache_before) == 2
    wf.configure({"dataset": {"sources": [R2R, DAGGER]}})

    wf.snakemake("results/shards/shards.json")  # index + shard checkpoint: the dry run below sees the new shards
    assert files(wf, "shards/r2r.*.parquet") == shards_before, "the R2R shard files must not be rewritten"
    listed = json.loads((wf.path / "results/shards/shards.json").read_text())
    dagger = sorted(s["name"] for s in listed["shards"] if s["source"] == "dagger_r2r")
    assert dagger == ["dagger_r2r.shard_00000", "dagger_r2r.shard_00001"]
    assert listed["sources"]["dagger_r2r"] == {"count": 2, "n_shards": 2, "n_samples": 31, "n_episodes": 4}

    dry = wf.snakemake("-n", TARGET)
    assert jobs(dry, "precompute_shard") == dagger and jobs(dry, "validate_shard") == dagger
    run = wf.snakemake(TARGET, cores=2)
    assert jobs(run, "precompute_shard") == dagger
    assert files(wf, "cache/r2r.*.h5") == cache_before, "the R2R cache files must stay byte-identical and untouched"
    validation = json.loads((wf.path / "results/cache/validation.json").read_text())
    assert validation["ok"] and validation["samples_cached"] == 12 + 31
    assert "Nothing to be done" in wf.snakemake("-n", TARGET).stdout


@pytest.mark.slow
def test_a_new_dagger_round_encodes_only_the_new_samples(wf):
    r2r_cache = files(wf, "cache/r2r.*.h5")
    old = {s: stats(wf, s)["samples"] for s in ("dagger_r2r.shard_00000", "dagger_r2r.shard_00001")}
    annotations = wf.data / "dagger" / "annotations.json"
    entries = json.loads(annotations.read_text())
    entries += [write_dagger_trajectory(str(wf.data / "dagger"), 900 + i, 4 + i, 900 + i, (96, 72)) for i in range(3)]
    annotations.write_text(json.dumps(entries))
    run = wf.snakemake(TARGET, cores=2)

    index = pd.read_parquet(wf.path / "results/index/samples.parquet")
    new = int(index.episode_id.isin([f"dagger_r2r/{900 + i}" for i in range(3)]).sum())
    assert new == 4 + 5 + 6
    ran = jobs(run, "precompute_shard")
    assert ran and all(s.startswith("dagger_r2r.") for s in ran)
    job_stats = [stats(wf, s) for s in ran]
    assert sum(s["computed"] for s in job_stats) == new  # the GPU work is the new samples
    assert sum(s["reused"] for s in job_stats) == sum(old[s] for s in ran)
    assert files(wf, "cache/r2r.*.h5") == r2r_cache

    # the grown cache equals a from-scratch build of the same shards (reuse off, fresh folder), bit for bit
    config = load_config(wf.path / "config.yaml", {"dataset": {"root": str(wf.data)}, "cache": {"reuse": False}})
    for shard in ran:
        parquet = wf.path / f"results/shards/{shard}.parquet"
        fresh = wf.path.parent / "fresh" / f"{shard}.h5"
        precompute_shard(parquet, stored_fingerprint(str(parquet)), fresh, fresh.parent / ".partial" / fresh.name, config, progress=False)
        with h5py.File(fresh) as a, h5py.File(wf.path / f"results/cache/{shard}.h5") as b:
            assert list(a[fmt.SAMPLE_ID].asstr()[...]) == list(b[fmt.SAMPLE_ID].asstr()[...])
            assert np.array_equal(a[fmt.FEATURES][...], b[fmt.FEATURES][...])
    assert json.loads((wf.path / "results/cache/validation.json").read_text())["ok"]


@pytest.mark.slow
def test_cache_estimate_counts_per_source(wf):
    vlnflow = Path(sys.executable).parent / "vlnflow"
    proc = subprocess.run([str(vlnflow), "cache", "estimate", "--config", "config.yaml"], cwd=wf.path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith(("r2r ", "dagger_r2r "))}
    assert lines["r2r"][1:3] == ["12", "2"] and lines["dagger_r2r"][1:3] == ["46", "2"]
    # nothing new to encode; the DAgger shards' last jobs computed 15 and reused 31 rows
    assert lines["dagger_r2r"][5] == "0" and lines["dagger_r2r"][-2:] == ["15", "31"]
