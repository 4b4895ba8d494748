"""Shared by the training tests: a demo feature cache built in-process, and a cache with holes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from vlnflow.config import load_config

REPO = Path(__file__).resolve().parents[1]


def build_cache(overrides: dict, work: Path) -> dict:
    """index -> shards -> precompute every shard -> manifest, through the library functions.

    `overrides` (deep-merged into config.yaml) must point dataset.root at a demo and train.samples /
    train.cache under `work`; returns the validated config.
    """
    from vlnflow.cache.manifest import merge_manifest
    from vlnflow.cache.precompute import precompute_shard
    from vlnflow.data.index import IndexSettings, build_index
    from vlnflow.data.shards import read_shard_list, write_shards
    from vlnflow.spatial import SpatialEncoder

    config = load_config(REPO / "config.yaml", overrides)
    idx = work / "index"
    build_index(IndexSettings.from_config(config), str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))
    shards = work / "shards"
    write_shards(str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(shards), str(shards / "shards.json"), config["shards"]["count"])
    encoder = SpatialEncoder.from_config(config["spatial"])
    h5s = []
    for shard in read_shard_list(str(shards / "shards.json")):
        out = work / "cache" / f"{shard['name']}.h5"
        precompute_shard(shards / f"{shard['name']}.parquet", shard["fingerprint"], out, work / "cache" / ".partial" / out.name,
                         config, encoder=encoder, progress=False)
        h5s.append(out)
    merge_manifest(h5s, work / "cache" / "manifest.json", work / "cache" / "manifest.parquet")
    return config


def partial_cache(full_manifest: Path, out: Path, drop: list[str]) -> Path:
    """A copy of the cache whose manifest lacks `drop` (shard files linked, not copied)."""
    out.mkdir(parents=True)
    shutil.copy(full_manifest, out / "manifest.json")
    table = pd.read_parquet(full_manifest.with_suffix(".parquet"))
    assert set(drop) <= set(table.sample_id)
    table[~table.sample_id.isin(drop)].to_parquet(out / "manifest.parquet", index=False)
    for h5 in full_manifest.parent.glob("*.h5"):
        (out / h5.name).symlink_to(h5)
    return out / "manifest.json"
