"""Stable shards: assignment by episode id only, files rewritten only when their content changes."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlnflow.data.demo import write_episode
from vlnflow.data.index import IndexSettings, build_index
from vlnflow.data.shards import FINGERPRINT_KEY, shard_index, shard_of, table_digest, write_shards


def test_assignment_is_frozen_and_process_independent():
    # Frozen on purpose: changing the scheme moves every episode and invalidates every feature cache.
    assert [shard_index(e, 256) for e in ("ep0000", "ep0001", "000001", "7")] == [109, 116, 240, 142]
    assert shard_of("ep0001", 4) == "shard_00000"
    code = "from vlnflow.data.shards import shard_index; print(shard_index('ep0001', 256))"
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        assert (
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()
            == "116"
        )


def test_digest_ignores_chunking_and_sees_content():
    rows = [{"a": f"x{i}", "frames": [f"f{j}" for j in range(i % 4)], "d": None if i % 3 else "z"} for i in range(50)]
    table = pa.Table.from_pylist(rows)
    chunked = pa.concat_tables([table.slice(0, 20), table.slice(20)])
    assert table_digest(table) == table_digest(chunked)
    rows[7]["frames"] = ["other"]
    assert table_digest(pa.Table.from_pylist(rows)) != table_digest(table)


class IndexedCopy:
    """A writable copy of the demo episodes plus helpers to re-index and re-shard it."""

    def __init__(self, demo_data, tmp_path, count=4):
        self.root = tmp_path / "episodes"
        shutil.copytree(demo_data / "episodes", self.root)
        self.out = tmp_path / "results"
        self.count = count

    def run(self, count=None):
        count = count or self.count
        index = self.out / "index"
        build_index(
            IndexSettings(root=str(self.root), shard_count=count),
            str(index / "s.parquet"),
            str(index / "e.parquet"),
            str(index / "k.csv"),
        )
        return write_shards(
            str(index / "s.parquet"),
            str(index / "e.parquet"),
            str(self.out / "shards"),
            str(self.out / "shards" / "shards.json"),
            count,
        )

    def shard_mtimes(self):
        return {p.name: p.stat().st_mtime_ns for p in (self.out / "shards").glob("shard_*.parquet")}


@pytest.fixture
def indexed(demo_data, tmp_path):
    return IndexedCopy(demo_data, tmp_path)


def test_shard_files_partition_the_index(indexed):
    manifest = indexed.run()
    samples = pq.read_table(indexed.out / "index" / "s.parquet").to_pylist()
    seen = []
    for entry in manifest["shards"]:
        path = indexed.out / "shards" / f"{entry['name']}.parquet"
        table = pq.read_table(path)
        rows = table.to_pylist()
        assert table.schema.metadata[FINGERPRINT_KEY].decode() == entry["fingerprint"]
        assert {shard_of(r["episode_id"], 4) for r in rows} == {entry["name"]}
        assert [(r["episode_id"], r["step"]) for r in rows] == sorted((r["episode_id"], r["step"]) for r in rows)
        assert (len(rows), len({r["episode_id"] for r in rows})) == (entry["n_samples"], entry["n_episodes"])
        seen += rows
    assert sorted(seen, key=lambda r: r["sample_id"]) == sorted(samples, key=lambda r: r["sample_id"])
    assert json.loads((indexed.out / "shards" / "shards.json").read_text()) == manifest


def test_rerun_without_change_touches_nothing(indexed):
    first = indexed.run()
    before = indexed.shard_mtimes()
    assert indexed.run() == first
    assert indexed.shard_mtimes() == before


def test_editing_one_episode_json_rewrites_exactly_its_shard(indexed):
    indexed.run()
    before = indexed.shard_mtimes()
    step_json = sorted((indexed.root / "ep0004").glob("step_*.json"))[1]
    desc = json.loads(step_json.read_text())
    desc["landmark_description"] = "A newly painted door."
    step_json.write_text(json.dumps(desc))
    indexed.run()
    after = indexed.shard_mtimes()
    assert [n for n in before if before[n] != after[n]] == [f"{shard_of('ep0004', 4)}.parquet"]


def test_adding_one_episode_rewrites_exactly_one_shard(indexed):
    indexed.run()
    before = indexed.shard_mtimes()
    write_episode(str(indexed.root / "ep9000"), "ep9000", 6, seed=9000, size=(32, 24))
    manifest = indexed.run()
    after = indexed.shard_mtimes()
    assert [n for n in after if before.get(n) != after[n]] == [f"{shard_of('ep9000', 4)}.parquet"]
    assert manifest["n_episodes"] == 15


def test_count_change_removes_stale_shard_files(indexed):
    indexed.run(count=4)
    manifest = indexed.run(count=2)
    assert sorted(indexed.shard_mtimes()) == sorted(f"{s['name']}.parquet" for s in manifest["shards"])
    assert {s["name"] for s in manifest["shards"]} <= {"shard_00000", "shard_00001"}


def test_corrupt_shard_file_is_rewritten(indexed):
    manifest = indexed.run()
    path = indexed.out / "shards" / f"{manifest['shards'][0]['name']}.parquet"
    path.write_bytes(b"not parquet")
    indexed.run()
    assert pq.read_table(path).num_rows == manifest["shards"][0]["n_samples"]
