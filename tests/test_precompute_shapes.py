"""Issue 21: batches padded to the shapes torch.compile sees (vlnflow.spatial.shapes) give bit-identical rows,
warm-up and recompiles are told apart (vlnflow.cache.warmup), and the loader worker default follows the cores."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO
from vlnflow.cache import format as fmt
from vlnflow.cache.loader_workers import MAX_AUTO, auto_workers, loader_workers
from vlnflow.cache.precompute import ShardFrames, make_batches, precompute_shard
from vlnflow.cache.warmup import WarmupTracker
from vlnflow.config import ConfigError, load_config
from vlnflow.data.index import IndexSettings, build_index
from vlnflow.data.shards import stored_fingerprint, write_shards
from vlnflow.errors import UserError
from vlnflow.spatial import SpatialEncoder
from vlnflow.spatial.shapes import ShapePolicy

EPISODES = ("ep0000", "ep0005", "ep0006", "ep0008")  # 3 + 4 + 5 + 9 steps = 21 samples, 1..9 frames each


@pytest.fixture(scope="module")
def shard(tmp_path_factory, demo_data):
    """Four short demo episodes (96x72 frames) indexed into one shard."""
    base = tmp_path_factory.mktemp("shapes")
    root = base / "episodes"
    for name in EPISODES:
        shutil.copytree(demo_data / "episodes" / name, root / name)
    samples, episodes = base / "index" / "samples.parquet", base / "index" / "episodes.parquet"
    build_index(IndexSettings(root=str(root), shard_count=1), str(samples), str(episodes), str(base / "index" / "skipped.csv"))
    write_shards(str(samples), str(episodes), str(base / "shards"), str(base / "shards" / "shards.json"), 1)
    return root, base / "shards" / "shard_00000.parquet"


def _config(root: Path, **spatial) -> dict:
    return load_config(REPO / "config.yaml", {
        "dataset": {"root": str(root)}, "spatial": {"device": "cpu", "preprocess": "pad", **spatial},
        "cache": {"loader_workers": 0, "spot_check": 0, "compile_cache": None},
    })  # fmt: skip


def test_policy_pads_to_its_shape_classes():
    dynamic, bucketed = ShapePolicy("dynamic", batch_size=16), ShapePolicy("bucketed", batch_size=16, frame_bucket=8)
    assert dynamic.padded_sizes(1, 1) == (2, 2) and dynamic.padded_sizes(37, 11) == (37, 11)
    assert bucketed.padded_sizes(37, 11) == (40, 16) and bucketed.padded_sizes(40, 16) == (40, 16)
    assert bucketed.padded_sizes(41, 20) == (48, 32)  # more rows than batch_size: the next multiple
    assert dynamic.shape_key(37, 11, 9) == dynamic.shape_key(5, 2, 2) == ("dynamic", "S>1") != dynamic.shape_key(5, 2, 1)
    assert bucketed.shape_key(37, 11, 9) == bucketed.shape_key(33, 16, 9) == (40, 16, 9) != bucketed.shape_key(33, 16, 8)
    images, index = torch.rand(5, 3, 14, 14), torch.randint(0, 5, (3, 4))
    padded, padded_index = bucketed.pad(images, index)
    assert padded.shape[0] == 8 and padded_index.shape == (16, 4)
    assert torch.equal(padded[:5], images) and not padded[5:].any(), "padded images are zeros, real ones untouched"
    assert torch.equal(padded_index[:3], index) and (padded_index[3:] == index[0]).all()
    assert bucketed.pad_frames(torch.rand(3, 2, 3, 14, 14)).shape[0] == 16 and dynamic.pad_frames(torch.rand(1, 2, 3, 14, 14)).shape[0] == 2
    assert bucketed.recompile_limit() > 8 == dynamic.recompile_limit()
    with pytest.raises(UserError, match="compile_shapes"):
        ShapePolicy("sometimes")


def test_bad_shape_settings_fail_at_parse_time_naming_the_key():
    with pytest.raises(ConfigError, match="spatial.compile_shapes"):
        load_config(REPO / "config.yaml", {"spatial": {"compile_shapes": "static"}})
    with pytest.raises(ConfigError, match="spatial.frame_bucket"):
        load_config(REPO / "config.yaml", {"spatial": {"frame_bucket": 0}})
    with pytest.raises(ConfigError, match="cache.loader_workers"):
        load_config(REPO / "config.yaml", {"cache": {"loader_workers": "many"}})
    config = load_config(REPO / "config.yaml")
    assert config["spatial"]["compile_shapes"] == "dynamic" and config["cache"]["loader_workers"] == "auto"
    assert config["cache"]["compile_cache"] == "results/compile_cache"


def _batches(table_path: Path, batch_size: int):
    table = pd.read_parquet(table_path)
    frames = [list(f) for f in table.frames]
    return table.sample_id.tolist(), frames, make_batches(list(range(len(frames))), [len(f) for f in frames], batch_size)


@pytest.mark.parametrize("strategy", ["dynamic", "bucketed"])
def test_padded_batches_give_bit_identical_rows(shard, strategy):
    """Every batch of a shard, padded by the policy: its real rows equal encode_indexed on the unpadded batch, bit for bit."""
    root, table_path = shard
    encoder = SpatialEncoder.from_config(_config(root, batch_size=3, compile_shapes=strategy, frame_bucket=8)["spatial"])
    ids, frames, batches = _batches(table_path, 3)
    plain = ShardFrames(root, ids, frames, batches, encoder.geometry)  # no policy: as they come
    padded = ShardFrames(root, ids, frames, batches, encoder.geometry, encoder.shapes)
    n_padded, classes = 0, set()
    for p, q in zip(DataLoader(plain, batch_size=None), DataLoader(padded, batch_size=None)):
        n = len(p.rows)
        assert q.rows == p.rows and q.unique == p.images.shape[0]
        n_padded += q.images.shape[0] > p.images.shape[0] or q.frame_index.shape[0] > n
        classes.add(q.key)
        want = encoder.encode_indexed(p.images, p.frame_index)
        assert torch.equal(encoder.encode_indexed(q.images, q.frame_index)[:n], want), f"batch {p.rows}: padded rows differ"
    assert n_padded > 0, "the test must pad some batches"
    assert len(classes) == 2 if strategy == "dynamic" else len(classes) > 2


def test_a_job_pads_only_where_it_must_and_writes_the_same_rows(shard, tmp_path):
    """Through precompute_shard: bucketed pads (static shapes asked for) and writes exactly the unpadded rows;
    dynamic without compiling does not pad at all (padding only avoids Dynamo's size-1 specialisation)."""
    root, table_path = shard
    ids, frames, batches = _batches(table_path, 3)
    stored = {}
    for strategy in ("bucketed", "dynamic"):
        config = _config(root, batch_size=3, compile_shapes=strategy, frame_bucket=8)
        encoder = SpatialEncoder.from_config(config["spatial"])
        out = tmp_path / strategy / "shard_00000.h5"
        stats = precompute_shard(table_path, stored_fingerprint(str(table_path)), out, tmp_path / strategy / "p.h5", config,
                                 encoder=encoder, progress=False)  # fmt: skip
        assert stats["computed"] == 21 and stats["recompiles_after_warmup"] == 0 and not stats["compile"]["enabled"]
        assert stats["compile"]["padded"] is (strategy == "bucketed")
        with h5py.File(out) as f:
            stored[strategy] = f[fmt.FEATURES][...]
    plain = ShardFrames(root, ids, frames, batches, encoder.geometry)
    for batch in DataLoader(plain, batch_size=None):
        want = fmt.to_storage(encoder.encode_indexed(batch.images, batch.frame_index), "bfloat16")
        assert np.array_equal(stored["bucketed"][batch.rows], want) and np.array_equal(stored["dynamic"][batch.rows], want)


class _CompilingEncoder:
    """Stands in for a compiled encoder: 'compiles' (bumps Dynamo's graph counter) when told to."""

    compile_blocks = True
    device = torch.device("cpu")

    def __init__(self, compiles_at: set[int]):
        self.compiles_at, self.calls = compiles_at, 0

    def encode(self):
        from torch._dynamo.utils import counters

        if self.calls in self.compiles_at:
            counters["stats"]["unique_graphs"] += 1
        self.calls += 1


def test_warmup_is_the_first_batch_of_a_shape_class_and_later_compiles_are_recompiles(caplog):
    encoder = _CompilingEncoder(compiles_at={0, 1, 3})  # batch 0: class A warm-up, 1: class B warm-up, 3: a recompile
    tracker = WarmupTracker(encoder, compile_dir=None, job="precompute_shard shard_x")
    keys = [("A",), ("B",), ("A",), ("B",), ("A",)]
    with caplog.at_level(logging.WARNING, logger="vlnflow.cache.warmup"):
        for number, key in enumerate(keys):
            with tracker.batch(number, key, 16, f"class {key[0]}") as warm_up:
                assert warm_up == (number < 2)
                encoder.encode()
    stats = tracker.stats()
    assert stats["warmup_batches"] == 2 and stats["warmup_samples"] == 32 and stats["shape_classes"] == 2
    assert stats["recompiles_after_warmup"] == 1 and stats["recompiles"] == [{"batch": 3, "shape": "class B", "new_graphs": 1}]
    assert tracker.first_batch_s is not None and tracker.first_turn.first is None  # no cache dir: no coordination
    assert "recompiled after warm-up at batch 3 (class B)" in caplog.text


def test_auto_loader_workers_share_the_cores_between_the_gpu_jobs():
    assert auto_workers(cores=16, jobs_per_node=8) == 1  # the lent machine's 16 cores, 8 GPUs' worth of jobs
    assert auto_workers(cores=16, jobs_per_node=1) == MAX_AUTO
    assert auto_workers(cores=112, jobs_per_node=8) == MAX_AUTO  # an H800 node: 14 cores per job, capped
    assert auto_workers(cores=8, jobs_per_node=1) == MAX_AUTO and auto_workers(cores=3, jobs_per_node=1) == 2
    assert auto_workers(cores=2, jobs_per_node=4) == 1  # never 0: the main thread would decode instead
    assert loader_workers(0) == 0 and loader_workers(6) == 6 and loader_workers("auto", 2, cores=6) == 2
    with pytest.raises(UserError, match="cache.loader_workers"):
        loader_workers(-1)
