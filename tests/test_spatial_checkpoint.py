"""Strict loading of aggregator weights from model.safetensors / model.pt, tiny and real size."""

import gc
import logging

import pytest
import torch
from safetensors.torch import save_file

from vlnflow.spatial.aggregator import PRESETS
from vlnflow.spatial.checkpoint import CheckpointError, load_aggregator_weights, state_digest
from vlnflow.spatial.init import build_aggregator, init_random_

HEAD = {"camera_head.trunk.0.weight": torch.ones(4, 4), "depth_head.proj.bias": torch.zeros(3)}


def tiny(seed):
    return init_random_(build_aggregator(PRESETS["tiny"]), seed)


def official_names(model):
    return {"aggregator." + k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_with_prefix_and_heads(tmp_path, fmt, caplog):
    src = tiny(1)
    state = {**official_names(src), **HEAD}
    file = tmp_path / f"model.{fmt}"
    save_file(state, str(file)) if fmt == "safetensors" else torch.save(state, file)
    dst = tiny(2)
    assert not torch.equal(dst.camera_token, src.camera_token)
    with caplog.at_level(logging.INFO, logger="vlnflow.spatial.checkpoint"):
        digest = load_aggregator_weights(dst, tmp_path)  # directory lookup
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    assert digest == state_digest(src.state_dict())
    notes = [r.message for r in caplog.records if "ignoring" in r.message]
    assert len(notes) == 1 and "2 non-aggregator" in notes[0] and "camera_head" in notes[0]


def test_unprefixed_state_dict_loads(tmp_path):
    src = tiny(3)
    save_file({k: v.clone() for k, v in src.state_dict().items()}, str(tmp_path / "agg.safetensors"))
    dst = tiny(4)
    load_aggregator_weights(dst, tmp_path / "agg.safetensors")
    assert torch.equal(dst.global_blocks[1].attn.qkv.weight, src.global_blocks[1].attn.qkv.weight)


def test_missing_key_is_named(tmp_path):
    state = official_names(tiny(1))
    del state["aggregator.frame_blocks.2.attn.k_norm.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing aggregator key 'aggregator\.frame_blocks\.2\.attn\.k_norm\.bias'"):
        load_aggregator_weights(tiny(2), tmp_path)


def test_misshaped_key_is_named(tmp_path):
    state = official_names(tiny(1))
    state["aggregator.patch_embed.pos_embed"] = torch.zeros(1, 1370, 32)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"'aggregator\.patch_embed\.pos_embed' has shape \(1, 1370, 32\)"):
        load_aggregator_weights(tiny(2), tmp_path)


def test_unexpected_key_and_bad_paths(tmp_path):
    state = official_names(tiny(1))
    state["aggregator.global_blocks.9.norm1.weight"] = torch.ones(32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected aggregator key 'aggregator\.global_blocks\.9\.norm1\.weight'"):
        load_aggregator_weights(tiny(2), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.pt in directory .*empty"):
        load_aggregator_weights(tiny(2), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_aggregator_weights(tiny(2), tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_aggregator_weights(tiny(2), tmp_path / "junk.safetensors")


@pytest.mark.slow  # writes and reads a 3.6 GB file (25-45 s); runs in CI
def test_real_size_aggregator_round_trip(tmp_path, caplog):
    """VGGT-1B-sized aggregator (909,112,320 params, 1,210 tensors, fp32 3.6 GB) through safetensors."""
    model = init_random_(build_aggregator(PRESETS["vggt-1b"]), seed=0)
    state = model.state_dict()
    assert sum(v.numel() for v in state.values()) == 909_112_320
    assert len(state) == 1210
    assert state["patch_embed.pos_embed"].shape == (1, 1370, 1024)
    assert state["camera_token"].shape == (1, 2, 1, 1024) and state["register_token"].shape == (1, 2, 4, 1024)
    assert state["global_blocks.23.attn.q_norm.weight"].shape == (64,)
    probes = {k: state[k].clone() for k in ("patch_embed.blocks.23.mlp.fc2.weight", "global_blocks.22.attn.qkv.bias", "camera_token")}
    file = tmp_path / "model.safetensors"
    save_file({**{"aggregator." + k: v for k, v in state.items()}, **HEAD}, str(file))
    expected_digest = state_digest(state)
    del model, state
    gc.collect()

    fresh = build_aggregator(PRESETS["vggt-1b"])  # uninitialised storage
    with caplog.at_level(logging.INFO, logger="vlnflow.spatial.checkpoint"):
        digest = load_aggregator_weights(fresh, tmp_path)
    assert digest == expected_digest
    for key, value in probes.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert sum("ignoring 2 non-aggregator" in r.message for r in caplog.records) == 1
    del fresh
    gc.collect()
    file.unlink()
