"""Snakemake on the demo: `vision_cache_all` builds the per-frame vision cache (every frame of the index once,
validated with frames recomputed live); it is independent of the VGGT cache's settings; precompute_all and
train include it only with cache.vision."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from conftest import copy_workflow
from test_workflow_cache import jobs


@pytest.fixture(scope="module")
def wf(tmp_path_factory, demo_data):
    copy = copy_workflow(tmp_path_factory.mktemp("vision_wf") / "workflow")
    shutil.copytree(demo_data / "episodes", copy.path / "data" / "episodes")
    copy.configure({"dataset": {"root": "data/episodes"}, "shards": {"count": 2}, "cache": {"spot_check": 1, "vision": True}})
    copy.first_run = copy.snakemake("vision_cache_all", cores=2)
    return copy


@pytest.mark.slow
def test_vision_cache_all_holds_every_indexed_frame_validated(wf):
    results = wf.path / "results"
    validation = json.loads((results / "cache" / "vision" / "validation.json").read_text())
    frames = {f for fs in pd.read_parquet(results / "index" / "samples.parquet").frames for f in fs}
    assert validation["ok"] and validation["frames_cached"] == validation["frames_indexed"] == len(frames)
    assert validation["spot_checked"] == 2 and validation["spot_identical"] == 2  # one frame per shard, bit for bit
    manifest = json.loads((results / "cache" / "vision" / "manifest.json").read_text())
    assert manifest["n_shards"] == 2 and manifest["feature_shape"][1] == 32  # the tiny tower's width
    stats = [json.loads(p.read_text()) for p in sorted((results / "benchmark" / "precompute_vision").glob("*.stats.json"))]
    assert sum(s["computed"] for s in stats) == len(frames) and all(s["frame_refs"] > s["frames"] for s in stats)
    assert not (results / "cache" / "manifest.json").exists()  # the VGGT cache is not needed for it


@pytest.mark.slow
def test_vision_cache_follows_qwen_settings_only(wf):
    def dry(target, **overrides):
        text = (wf.path / "config.yaml").read_text()
        try:
            wf.configure(overrides)
            return [rule for rule, _ in jobs(wf.snakemake("-n", target))]
        finally:
            (wf.path / "config.yaml").write_text(text)

    vggt_changed = dry("precompute_all", spatial={"seed": 3, "layer": -3})
    assert "precompute_shard" in vggt_changed and not any("vision" in rule for rule in vggt_changed)  # still up to date
    qwen_changed = dry("precompute_all", model={"seed": 1})
    assert qwen_changed.count("precompute_vision_shard") == 2 and "validate_vision_cache" in qwen_changed
    without = dry("precompute_all", cache={"vision": False}, model={"seed": 1})
    assert "precompute_shard" in without and not any("vision" in rule for rule in without)


@pytest.mark.slow
def test_training_reads_the_vision_cache_and_counts_its_frames(wf):
    text = (wf.path / "config.yaml").read_text()
    try:  # VGGT live (no VGGT cache to build): the run waits for the vision cache only
        wf.configure({"train": {"cache": None, "max_steps": 2, "save_every": 2}})
        planned = [rule for rule, _ in jobs(wf.snakemake("-n", "train"))]
        assert planned == ["train"], planned
        wf.snakemake("train", cores=2)
    finally:
        (wf.path / "config.yaml").write_text(text)
    run = wf.path / "results" / "train" / "demo"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert all(m["vision_cached_frames"] == m["images"] > 0 and m["vision_live_frames"] == 0 for m in metrics), metrics
    assert "vision cache enabled: results/cache/vision/manifest.json" in (run / "train.log").read_text()
