"""Counts per data source: samples, shards, cache bytes, and how the cache rows were made.

Read from files the pipeline already wrote: the shard list (results/shards/shards.json) or the
episode table (results/index/episodes.parquet) for samples and shards, the cache manifest for
bytes, and the precompute stats of each shard's last job for computed / reused / resumed rows.
The source of a shard is in its name (vlnflow.data.sources): `<source>.shard_<k>`, or `shard_<k>`
for a single dataset.root. `vlnflow cache estimate` and the benchmark report print this table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from vlnflow.data.sources import source_of_shard

COLUMNS = ("source", "samples", "shards", "cached_samples", "cache_bytes", "new_samples", "computed", "reused", "resumed")


def shard_samples_from_list(shards_json: str | Path) -> dict[str, int]:
    """shard name -> samples, from the shard checkpoint's shards.json."""
    return {s["name"]: int(s["n_samples"]) for s in json.loads(Path(shards_json).read_text())["shards"]}


def shard_samples_from_episodes(episodes_parquet: str | Path) -> dict[str, int]:
    """shard name -> samples, from the index's episodes.parquet (before the shard checkpoint ran)."""
    table = pd.read_parquet(episodes_parquet, columns=["shard", "n_samples"])
    counts = table.groupby("shard")["n_samples"].sum()
    return {name: int(n) for name, n in counts.items() if n > 0}


def new_samples_by_shard(samples_parquet: str | Path, episodes_parquet: str | Path, manifest_parquet: str | Path | None) -> dict[str, int]:
    """shard name -> indexed samples the cache does not hold yet (all of them without a cache)."""
    samples = pd.read_parquet(samples_parquet, columns=["sample_id", "episode_id"])
    episodes = pd.read_parquet(episodes_parquet, columns=["episode_id", "shard"])
    if manifest_parquet is not None and Path(manifest_parquet).exists():
        cached = set(pd.read_parquet(manifest_parquet, columns=["sample_id"]).sample_id)
        samples = samples[~samples.sample_id.isin(cached)]
    shard = samples.episode_id.map(dict(zip(episodes.episode_id, episodes.shard)))
    return {name: int(n) for name, n in shard.value_counts().items()}


def source_table(
    shard_samples: dict[str, int],
    manifest_json: str | Path | None = None,
    stats_files: list[str | Path] = (),
    new_samples: dict[str, int] | None = None,
) -> pd.DataFrame:
    """One row per source (in order of first appearance), plus nothing else; missing facts are NaN."""
    rows: dict[str, dict] = {}

    def row(shard: str) -> dict:
        source = source_of_shard(shard)
        return rows.setdefault(source, {"source": source, "samples": 0, "shards": 0})

    for shard, n in shard_samples.items():
        r = row(shard)
        r["samples"] += n
        r["shards"] += 1
    if manifest_json is not None and Path(manifest_json).exists():
        for shard in json.loads(Path(manifest_json).read_text())["shards"]:
            if shard["name"] not in shard_samples:
                continue  # a file of a shard that no longer exists (count or sources changed)
            r = row(shard["name"])
            r["cached_samples"] = r.get("cached_samples", 0) + int(shard["n_samples"])
            r["cache_bytes"] = r.get("cache_bytes", 0) + int(shard["bytes"])
    for path in stats_files:
        stats = json.loads(Path(path).read_text())
        if stats["shard"] not in shard_samples:
            continue
        r = row(stats["shard"])
        for key in ("computed", "reused", "resumed"):
            r[key] = r.get(key, 0) + int(stats.get(key, 0))
    if new_samples is not None:
        for r in rows.values():
            r["new_samples"] = 0
        for shard, n in new_samples.items():
            row(shard)["new_samples"] += n
    return pd.DataFrame(list(rows.values()), columns=list(COLUMNS))


def _cell(value, fmt: str = "{:,}") -> str:
    return "" if pd.isna(value) else fmt.format(int(value))


def markdown(table: pd.DataFrame) -> str:
    """The table as markdown (report.md); blank = not known (no cache, no precompute stats)."""
    header = ["source", "samples", "shards", "cached samples", "cache bytes", "computed", "reused", "resumed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        size = "" if pd.isna(r.cache_bytes) else f"{r.cache_bytes / 1e9:.3g} GB"
        cells = [r.source, _cell(r.samples), _cell(r.shards), _cell(r.cached_samples), size, _cell(r.computed), _cell(r.reused), _cell(r.resumed)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
