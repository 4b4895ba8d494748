"""Compute proportional to what is new (issue 22): a shard that reruns because its source gained episodes
encodes only the new samples, copies the others from its previous file, and ends up bit-identical to a
from-scratch build. Crash safety and validation are unchanged: a killed job resumes, a file that failed
validation is never copied from, and a keys file that does not describe the linked file is ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

from vlnflow.cache import format as fmt
from vlnflow.cache.precompute import precompute_shard
from vlnflow.cache.reuse import previous_paths
from vlnflow.cache.validate import validate_shard
from vlnflow.config import load_config
from vlnflow.data.index import IndexSettings, build_index
from vlnflow.data.shards import stored_fingerprint, write_shards
from vlnflow.spatial import SpatialEncoder

REPO = Path(__file__).resolve().parents[1]
FIRST = ("ep0000", "ep0005", "ep0006")  # 3 + 4 + 5 steps
ADDED = ("ep0008",)  # 9 steps: histories of 1..9 frames


class CountingEncoder:
    """The real encoder, counting the samples it encodes (or dying when batch k + 1 starts)."""

    def __init__(self, encoder, die_at: int | None = None):
        self.encoder, self.die_at, self.calls, self.samples = encoder, die_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_indexed(self, images, frame_index):
        if self.calls == self.die_at:
            raise KeyboardInterrupt("killed mid-shard (simulated)")
        self.calls += 1
        self.samples += frame_index.shape[0]
        return self.encoder.encode_indexed(images, frame_index)


class Workspace:
    """A data root, its one-shard index, and a cache folder; `build` runs precompute as the Snakemake job does
    (the declared output deleted first)."""

    def __init__(self, base: Path, demo: Path, episodes, **cache):
        self.base, self.root = base, base / "episodes"
        for name in episodes:
            shutil.copytree(demo / "episodes" / name, self.root / name)
        self.config = load_config(
            REPO / "config.yaml",
            {"dataset": {"root": str(self.root)}, "spatial": {"batch_size": 2}, "cache": {"loader_workers": 0, "spot_check": 1, **cache}},
        )
        self.h5 = base / "cache" / "shard_00000.h5"

    def add(self, demo: Path, episodes) -> None:
        for name in episodes:
            shutil.copytree(demo / "episodes" / name, self.root / name)

    def index(self) -> Path:
        idx = self.base / "index"
        build_index(IndexSettings(root=str(self.root), shard_count=1), str(idx / "s.parquet"), str(idx / "e.parquet"), str(idx / "k.csv"))
        write_shards(str(idx / "s.parquet"), str(idx / "e.parquet"), str(self.base / "shards"), str(self.base / "shards" / "shards.json"), 1)
        return self.base / "shards" / "shard_00000.parquet"

    def build(self, encoder, config=None) -> dict:
        shard = self.index()
        self.h5.unlink(missing_ok=True)  # Snakemake deletes a job's declared outputs before it runs
        return precompute_shard(shard, stored_fingerprint(str(shard)), self.h5, self.base / "cache" / ".partial" / self.h5.name,
                                config or self.config, encoder=encoder, progress=False)  # fmt: skip

    def rows(self) -> pd.DataFrame:
        return pd.read_parquet(self.base / "shards" / "shard_00000.parquet")


def stored(path: Path) -> SimpleNamespace:
    with h5py.File(path) as f:
        return SimpleNamespace(
            ids=list(f[fmt.SAMPLE_ID].asstr()[...]),
            features=f[fmt.FEATURES][...],
            scale=f[fmt.SCALE][...] if fmt.SCALE in f else None,
            done=f[fmt.DONE][...],
            errors=list(f[fmt.ERROR].asstr()[...]),
            attrs=dict(f.attrs),
        )


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = stored(a), stored(b)
    assert x.ids == y.ids and x.done.all() and y.done.all() and x.errors == y.errors
    assert x.features.dtype == y.features.dtype and np.array_equal(x.features, y.features), "features must be bit-identical"
    assert (x.scale is None) == (y.scale is None) and (x.scale is None or np.array_equal(x.scale, y.scale))
    assert x.attrs["complete"] and x.attrs["encoder_fingerprint"] == y.attrs["encoder_fingerprint"]


@pytest.fixture(scope="module")
def encoder(demo_data):
    config = load_config(REPO / "config.yaml", {"dataset": {"root": str(demo_data / "episodes")}})
    return SpatialEncoder.from_config(config["spatial"])


@pytest.fixture
def grown(tmp_path, demo_data, encoder):
    """FIRST built once; then ADDED appended (not yet rebuilt)."""
    ws = Workspace(tmp_path / "inc", demo_data, FIRST)
    first = ws.build(CountingEncoder(encoder))
    assert first["computed"] == first["samples"] == 12 and first["reused"] == 0
    ws.add(demo_data, ADDED)
    return ws


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3"])
def test_appended_episodes_are_the_only_samples_encoded_and_the_result_equals_a_fresh_build(tmp_path, demo_data, encoder, dtype):
    ws = Workspace(tmp_path / "inc", demo_data, FIRST, dtype=dtype)
    assert ws.build(CountingEncoder(encoder))["computed"] == 12
    ws.add(demo_data, ADDED)
    counting = CountingEncoder(encoder)
    stats = ws.build(counting)
    rows = ws.rows()
    new = int(rows.episode_id.isin(ADDED).sum())
    assert new == 9 and stats["samples"] == len(rows) == 21
    assert stats["computed"] == counting.samples == new  # the GPU work is the new samples
    assert stats["reused"] == len(rows) - new and stats["resumed"] == 0 and stats["skipped"] == 0

    fresh = Workspace(tmp_path / "fresh", demo_data, FIRST + ADDED, dtype=dtype)
    assert fresh.build(CountingEncoder(encoder), ws.config | {"dataset": {**ws.config["dataset"], "root": str(fresh.root)}})["computed"] == 21
    assert_same_cache(ws.h5, fresh.h5)
    report = validate_shard(ws.h5, ws.base / "shards" / "shard_00000.parquet",
                            {"encoder_fingerprint": encoder.fingerprint(), "shard_fingerprint": stored_fingerprint(str(ws.base / "shards" / "shard_00000.parquet")), "dtype": dtype},
                            ws.config, encoder=encoder)  # fmt: skip
    assert report["ok"], report["problems"]


def test_a_changed_frame_recomputes_exactly_the_samples_that_show_it(grown, encoder):
    stats = grown.build(CountingEncoder(encoder))  # take in ADDED first
    frame = sorted((grown.root / "ep0005").glob("*.png"))[1]
    frame.write_bytes(frame.read_bytes() + b"\0")  # same pixels to a decoder, another file to the cache key
    showing = sum(f"ep0005/{frame.name}" in list(f) for f in grown.rows().frames)
    assert 0 < showing < 4
    stats = grown.build(CountingEncoder(encoder))
    assert stats["computed"] == showing and stats["reused"] == stats["samples"] - showing


def test_an_encoder_setting_change_reuses_nothing(grown, encoder):
    grown.build(CountingEncoder(encoder))
    config = load_config(REPO / "config.yaml", {**{k: grown.config[k] for k in ("dataset", "cache")}, "spatial": {**grown.config["spatial"], "seed": 5}})
    stats = grown.build(None, config)
    assert stats["reused"] == 0 and stats["computed"] == stats["samples"]


def test_reuse_off_recomputes_everything(grown, encoder):
    config = load_config(REPO / "config.yaml", {**{k: grown.config[k] for k in ("dataset", "spatial")}, "cache": {**grown.config["cache"], "reuse": False}})
    stats = grown.build(CountingEncoder(encoder), config)
    assert stats["reused"] == 0 and stats["computed"] == stats["samples"] == 21


def test_a_killed_job_resumes_its_reused_and_computed_rows(grown, encoder, tmp_path, demo_data):
    with pytest.raises(KeyboardInterrupt):
        grown.build(CountingEncoder(encoder, die_at=2))
    assert not grown.h5.exists()
    counting = CountingEncoder(encoder)
    stats = grown.build(counting)
    # the killed job had copied the 12 old rows and computed 2 batches of one new sample (one frame count each)
    assert stats["reused"] == 0 and stats["resumed"] == 12 + 2 and stats["computed"] == counting.samples == 9 - 2
    fresh = Workspace(tmp_path / "fresh", demo_data, FIRST + ADDED)
    fresh.build(CountingEncoder(encoder))
    assert_same_cache(grown.h5, fresh.h5)


def test_a_file_that_failed_validation_is_never_copied_from(grown, encoder):
    previous, keys = previous_paths(grown.h5)
    assert previous.exists() and keys.exists() and previous.stat().st_ino == grown.h5.stat().st_ino
    with h5py.File(grown.h5) as f:  # flip bytes inside a feature chunk: fletcher32 fails
        info = f[fmt.FEATURES].id.get_chunk_info(1)
    with open(grown.h5, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        data = fh.read(8)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))
    shard = grown.base / "shards" / "shard_00000.parquet"
    expected = {"encoder_fingerprint": encoder.fingerprint(), "shard_fingerprint": stored_fingerprint(str(shard)), "dtype": "bfloat16"}
    report = validate_shard(grown.h5, shard, expected, grown.config, encoder=encoder, quarantine_dir=grown.base / "corrupt")
    assert not report["ok"] and report.get("quarantined")
    assert not previous.exists() and not keys.exists()
    stats = grown.build(CountingEncoder(encoder))
    assert stats["reused"] == 0 and stats["computed"] == stats["samples"]


def test_keys_that_describe_another_file_are_ignored(grown, encoder):
    _, keys = previous_paths(grown.h5)
    record = json.loads(keys.read_text())
    record["file"]["ino"] += 1  # as after a crash between replacing the link and writing its keys
    keys.write_text(json.dumps(record))
    stats = grown.build(CountingEncoder(encoder))
    assert stats["reused"] == 0 and stats["computed"] == stats["samples"]
    assert json.loads(keys.read_text())["file"]["ino"] == grown.h5.stat().st_ino  # rewritten for the new file
