"""Counts per data source (issue 22) in `vlnflow cache estimate` and the benchmark report, from the files the
jobs wrote: shard list, cache manifest, precompute stats."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vlnflow.cache.per_source import new_samples_by_shard, shard_samples_from_episodes, shard_samples_from_list, source_table
from vlnflow.report.report import ReportInputs, per_source_markdown

SHARDS = {"r2r.shard_00000": 10, "r2r.shard_00003": 7, "dagger_r2r.shard_00001": 5}


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    (r / "shards").mkdir(parents=True)
    (r / "shards/shards.json").write_text(json.dumps({"shards": [{"name": n, "n_samples": k} for n, k in SHARDS.items()]}))
    (r / "cache").mkdir()
    manifest = {"shards": [
        {"name": "r2r.shard_00000", "n_samples": 10, "bytes": 1000},
        {"name": "r2r.shard_00003", "n_samples": 6, "bytes": 600},
        {"name": "r2r.shard_00009", "n_samples": 4, "bytes": 400},  # left over from another shard count: not counted
        {"name": "dagger_r2r.shard_00001", "n_samples": 5, "bytes": 500},
    ]}  # fmt: skip
    (r / "cache/manifest.json").write_text(json.dumps(manifest))
    (r / "benchmark/precompute").mkdir(parents=True)
    jobs = {"r2r.shard_00000": (10, 0, 0), "r2r.shard_00003": (1, 5, 0), "dagger_r2r.shard_00001": (2, 0, 3)}
    for name, (computed, reused, resumed) in jobs.items():
        stats = {"shard": name, "samples": computed + reused + resumed, "computed": computed, "reused": reused, "resumed": resumed}
        (r / f"benchmark/precompute/{name}.stats.json").write_text(json.dumps(stats))
    return r


def test_source_table_sums_shards_manifest_and_stats(results):
    table = source_table(
        shard_samples_from_list(results / "shards/shards.json"),
        results / "cache/manifest.json",
        sorted((results / "benchmark/precompute").glob("*.json")),
    ).set_index("source")
    assert list(table.index) == ["r2r", "dagger_r2r"]
    assert table.loc["r2r", ["samples", "shards", "cached_samples", "cache_bytes", "computed", "reused", "resumed"]].tolist() == [17, 2, 16, 1600, 11, 5, 0]
    assert table.loc["dagger_r2r", ["samples", "shards", "cache_bytes", "computed", "reused", "resumed"]].tolist() == [5, 1, 500, 2, 0, 3]
    assert table.new_samples.isna().all()  # not asked for


def test_single_root_shards_are_one_source_and_new_samples_come_from_the_index(tmp_path):
    episodes = pd.DataFrame({"episode_id": ["a", "b", "c"], "n_samples": [2, 1, 0], "shard": ["shard_00001", "shard_00000", "shard_00000"]})
    samples = pd.DataFrame({"sample_id": ["a/00000", "a/00001", "b/00000"], "episode_id": ["a", "a", "b"]})
    episodes.to_parquet(tmp_path / "e.parquet")
    samples.to_parquet(tmp_path / "s.parquet")
    pd.DataFrame({"sample_id": ["a/00000"]}).to_parquet(tmp_path / "m.parquet")
    assert shard_samples_from_episodes(tmp_path / "e.parquet") == {"shard_00000": 1, "shard_00001": 2}
    new = new_samples_by_shard(tmp_path / "s.parquet", tmp_path / "e.parquet", tmp_path / "m.parquet")
    assert new == {"shard_00001": 1, "shard_00000": 1}
    assert new_samples_by_shard(tmp_path / "s.parquet", tmp_path / "e.parquet", None) == {"shard_00001": 2, "shard_00000": 1}
    table = source_table(shard_samples_from_episodes(tmp_path / "e.parquet"), new_samples=new)
    [row] = list(table.itertuples())
    assert (row.source, row.samples, row.shards, row.new_samples) == ("dataset.root", 3, 2, 2)
    assert pd.isna(row.cache_bytes) and pd.isna(row.computed)  # no manifest, no stats: not known


def test_report_section_per_source(results):
    inputs = ReportInputs(
        shard_list=[str(results / "shards/shards.json")],
        manifest_json=[str(results / "cache/manifest.json")],
        precompute_stats=[str(p) for p in sorted((results / "benchmark/precompute").glob("*.json"))],
    )
    text = per_source_markdown(inputs)
    assert "## Per data source" in text
    assert "| r2r | 17 | 2 | 16 | 1.6e-06 GB | 11 | 5 | 0 |" in text
    assert "| dagger_r2r | 5 | 1 | 5 | 5e-07 GB | 2 | 0 | 3 |" in text
    assert per_source_markdown(ReportInputs()) == ""
