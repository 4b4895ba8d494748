"""Sharded safetensors as written by vlnflow.export.shards: transformers' naming, an index with sizes
and digests, tied tensors stored, and every kind of damage named by file before anything loads."""

from __future__ import annotations

import json
import re

import pytest
import torch

from vlnflow.export.shards import write_shards
from vlnflow.model.model_dir import INDEX, ExportError, check_shards, iter_tensors


@pytest.fixture
def state():
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(64, 16, generator=gen)
    return {"model.embed_tokens.weight": embed, "lm_head.weight": embed,  # tied: same storage
            **{f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 16, generator=gen) for i in range(4)}}


def test_shards_index_and_tied_tensors_round_trip(state, tmp_path):
    index = write_shards(state, tmp_path, max_shard_size=4096)
    files = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(files) > 1 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    on_disk = json.loads((tmp_path / INDEX).read_text())
    assert on_disk == index and set(on_disk["weight_map"]) == set(state)
    assert set(on_disk["metadata"]["vlnflow_sha256"]) == set(files)
    assert on_disk["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    loaded = dict(iter_tensors(tmp_path, check_shards(tmp_path)))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_one_shard_keeps_the_sharded_names(state, tmp_path):
    write_shards(state, tmp_path)
    assert [p.name for p in tmp_path.glob("model-*.safetensors")] == ["model-00001-of-00001.safetensors"]


def test_damage_is_named_by_file(state, tmp_path):
    write_shards(state, tmp_path, max_shard_size=4096)
    first, second = sorted(tmp_path.glob("model-*.safetensors"))[:2]
    data = bytearray(second.read_bytes())
    data[-5] ^= 0x01
    second.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=re.escape(str(second)) + " is corrupt"):
        check_shards(tmp_path)
    second.write_bytes(bytes(data[: len(data) // 2]))  # truncated: found even without digests
    with pytest.raises(ExportError, match="cannot read safetensors shard " + re.escape(str(second))):
        check_shards(tmp_path, verify_digests=False)
    first.unlink()
    with pytest.raises(ExportError, match=f"shard {first.name} named in {INDEX} is missing"):
        check_shards(tmp_path)
    (tmp_path / INDEX).unlink()
    with pytest.raises(ExportError, match="not an exported model directory"):
        check_shards(tmp_path)
