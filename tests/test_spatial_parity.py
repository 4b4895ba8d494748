"""Our aggregator against outputs of the JanusVLN-vendored VGGT code (tests/fixtures/vggt_parity).

Both fixtures (plain conv patch embed; tiny DINOv2-with-registers) are loaded with
strict key checking, then every stored output is reproduced: streaming per-frame
layer -2, the full block-causal pass, and every layer of the last streamed frame.
"""

import json

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlnflow.spatial.aggregator import Aggregator, AggregatorConfig, PRESETS, StreamCache

FIXTURES = Path(__file__).parent / "fixtures" / "vggt_parity"
NAMES = ["conv", "dinov2reg"]


def load_fixture(name):
    path = FIXTURES / f"vggt_parity_{name}.safetensors"
    assert path.is_file(), f"parity fixture missing: {path}"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    return state, tensors, json.loads(meta["config"]), int(meta["patch_start_idx"])


def fixture_config(cfg: dict) -> AggregatorConfig:
    if cfg["patch_embed"] == "conv":
        return AggregatorConfig(embed_dim=cfg["E"], depth=cfg["depth"], num_heads=cfg["heads"], patch_embed="conv")
    return AggregatorConfig(
        embed_dim=cfg["E"], depth=cfg["depth"], num_heads=cfg["heads"], dino_depth=cfg["dino_depth"],
        dino_heads=cfg["heads"], dino_pos_grid=cfg["dino_img_size"] // cfg["patch_size"],
    )


def model_for(name, dtype):
    state, tensors, cfg, start = load_fixture(name)
    model = Aggregator(fixture_config(cfg))
    model.load_state_dict(state, strict=True)
    assert model.patch_start_idx == start
    return model.to(dtype).eval(), tensors


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def stream_all(model, images):
    """Per sample: every frame streamed; returns per-frame layer -2 patches and the last call's per-layer list."""
    per_frame, last_layers = [], []
    for sample in images:
        cache, frames = StreamCache(), []
        for frame in sample:
            layers = model.stream_frame(frame[None], cache)
            frames.append(layers[-2][0, model.patch_start_idx :])
        per_frame.append(torch.stack(frames))
        last_layers.append(torch.stack([layer[0] for layer in layers]))
    return torch.stack(per_frame), torch.stack(last_layers)


def test_tiny_preset_matches_dinov2_fixture_shapes():
    _, _, cfg, _ = load_fixture("dinov2reg")
    assert PRESETS["tiny"] == fixture_config(cfg)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 2e-6)])
def test_fixture_outputs(name, dtype, tol):
    model, t = model_for(name, dtype)
    images = t["inputs.images"].to(dtype)
    with torch.inference_mode():
        full = model(images)
        stream, last_layers = stream_all(model, images)
        patches = model.embed(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        fast = model.last_frame_features(patches, model.grid_of(images, 14), layer=-2)
    assert len(full) == model.config.depth
    assert rel_err(full[-2], t["outputs.full_tokens_m2"]) <= tol
    assert rel_err(stream, t["outputs.stream_patch_tokens_m2"]) <= tol
    assert rel_err(last_layers, t["outputs.stream_last_frame_all_layers"]) <= tol
    assert rel_err(fast, t["outputs.stream_patch_tokens_m2"][:, -1]) <= tol


def test_fixture_outputs_need_block_causal_attention():
    """Sanity check that the fixtures can catch a wrong global attention: bidirectional differs."""
    model, t = model_for("dinov2reg", torch.float64)
    images = t["inputs.images"].double()
    with torch.inference_mode():
        x = model.frame_tokens(model.embed(images.flatten(0, 1)).unflatten(0, images.shape[:2]))
        rope = model.rope(model.grid_of(images, 14), x.device)
        from vlnflow.spatial.layers import sdpa_heads

        for i in range(2):
            x = model._frame_block(i, x, rope)
            frame_out = x
            q, k, v = model.global_blocks[i].qkv_heads(x, rope)
            b = images.shape[0]
            bidir = sdpa_heads(*(y.reshape(b, -1, *y.shape[2:]) for y in (q, k, v))).reshape(q.shape)
            x = model.global_blocks[i].residual(x, bidir)
        wrong = torch.cat([frame_out, x], dim=-1).view(*images.shape[:2], x.shape[1], -1)
    assert rel_err(wrong, t["outputs.full_tokens_m2"]) > 1e-2


def test_pos_table_resampled_with_antialias():
    """The DINOv2 fixture's grid (4x6) differs from its table (5x5): resampling is exercised."""
    model, _ = model_for("dinov2reg", torch.float64)
    table = model.patch_embed.position_table(4, 6)
    assert table.shape == (1, 25, 32)
    assert torch.equal(model.patch_embed.position_table(5, 5), model.patch_embed.pos_embed)
