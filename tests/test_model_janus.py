"""The composed JanusVLN-style model on the tiny Qwen2.5-VL (CPU, float32).

Checks: logits equal the stock transformers forward (lam=0, packed or not, fast paths on or
off); sample i's spatial features land on sample i's image tokens only (batch 2 and 3);
packing equals running each sample alone; loss equals HF's full-logits loss; gradients
reach merger and LLM but not the frozen vision tower; loading from directories.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tiny_frames import write_random_frames
from vlnflow.config import ConfigError
from vlnflow.model.batching import Collator
from vlnflow.spatial.geometry import FrameGeometry
from vlnflow.model.loading import build_model, load_processors, load_qwen
from vlnflow.model.tiny import write_tiny_checkpoint

GRID = (4, 4)  # spatial grid of a 56x56 frame (VGGT patch 14)
CHANNELS = 12
GEOMETRY = FrameGeometry("pad", 56, (64, 48))  # the tests' 64x48 frames, a 4x4 grid
BASE_CFG = {
    "qwen_path": None, "preset": "tiny", "seed": 0, "lam": 0.2, "vision_fast": True,
    "llm_attention": "varlen", "freeze_vision": True, "merger_hidden": 24, "merger_weights": None,
    "dtype": "bfloat16", "tiny": {},
}
ATOL = 2e-5


def cfg(**overrides):
    return {**BASE_CFG, **overrides}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    write_random_frames(root, 7)
    rows = [
        dict(sample_id="s0", episode_id="e0", frames=["f0.png", "f1.png"], instruction="walk to the table",
             action="MOVE_FORWARD", prompt=None, answer=None, sub_instruction="walk forward",
             description_2d="a table", description_3d="one meter ahead", source_format="episodes"),
        dict(sample_id="s1", episode_id="e1", frames=["f2.png", "f3.png", "f4.png"], instruction="go", action="STOP",
             prompt="Past: <image><image>\nNow: <image>\nWhat next?", answer="The next action is STOP.",
             sub_instruction=None, description_2d=None, description_3d=None, source_format="annotations"),
        dict(sample_id="s2", episode_id="e2", frames=["f5.png", "f6.png"], instruction="turn left at the door",
             action="TURN_LEFT", prompt=None, answer=None, sub_instruction="turn left", description_2d="a door",
             description_3d=None, source_format="episodes"),
    ]
    tokenizer, processor = load_processors(BASE_CFG, GEOMETRY)
    collator = Collator(tokenizer, processor, GEOMETRY, dataset_root=root)
    torch.manual_seed(1)
    features = [torch.randn(GRID[0] * GRID[1], CHANNELS) * (i + 1) for i in range(3)]
    return collator, rows, features


@pytest.fixture(scope="module")
def stock():
    return load_qwen(BASE_CFG).eval()


def batch_of(data, indices):
    collator, rows, features = data
    return collator([rows[i] for i in indices], [features[i] for i in indices])


def segments(batch):
    cu = batch["cu_seqlens"].tolist()
    return list(zip(cu[:-1], cu[1:]))


def single_inputs(batch, i):
    """Stock-transformers inputs for sample i of a packed batch."""
    start, end = segments(batch)[i]
    owner = batch["image_sample_index"] == i
    patches = batch["image_grid_thw"].prod(-1)
    first = int(patches[batch["image_sample_index"] < i].sum())
    return {
        "input_ids": batch["input_ids"][:, start:end],
        "mm_token_type_ids": batch["mm_token_type_ids"][:, start:end],
        "pixel_values": batch["pixel_values"][first : first + int(patches[owner].sum())],
        "image_grid_thw": batch["image_grid_thw"][owner],
    }


@pytest.mark.parametrize(
    "vision_fast,llm_attention", [(False, "sdpa"), (True, "sdpa"), (True, "varlen")], ids=["stock", "v1v2", "v1v2+varlen"]
)
def test_lam0_logits_equal_stock_forward_of_each_sample(data, stock, vision_fast, llm_attention):
    model = build_model(cfg(lam=0.0, vision_fast=vision_fast, llm_attention=llm_attention), CHANNELS, GRID).eval()
    batch = batch_of(data, [0, 1, 2])
    with torch.no_grad():
        logits = model.qwen.lm_head(model.hidden_states(batch))
        for i, (start, end) in enumerate(segments(batch)):
            expected = stock(**single_inputs(batch, i)).logits
            torch.testing.assert_close(logits[:, start:end], expected, rtol=1e-4, atol=ATOL)


def test_positions_equal_stock_rope_index_and_restart_per_sample(data, stock):
    model = build_model(BASE_CFG, CHANNELS, GRID)
    batch = batch_of(data, [0, 1, 2])
    positions = model.position_ids(batch)
    assert positions.shape == (4, 1, batch["input_ids"].shape[1])
    for i, (start, end) in enumerate(segments(batch)):
        inputs = single_inputs(batch, i)
        expected, _ = stock.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        assert torch.equal(positions[1:, :, start:end], expected)
        assert positions[0, 0, start:end].tolist() == list(range(end - start))
    # image tokens really get 2-D positions (rows differ from columns somewhere)
    assert not torch.equal(positions[2], positions[3])


def reference_tiling(merged: torch.Tensor, n_images: int) -> torch.Tensor:
    """What the JanusVLN reference does: concatenate all samples' maps and tile them over all images."""
    flat = merged.reshape(-1, merged.shape[-1])
    return flat.repeat(n_images * merged.shape[1] // flat.shape[0], 1)  # k = image tokens // map tokens


@pytest.mark.parametrize("indices", [[0, 2], [2, 0, 1]], ids=["batch2", "batch3"])
def test_each_sample_gets_only_its_own_spatial_features(data, indices):
    model = build_model(cfg(lam=0.2), CHANNELS, GRID).eval()
    batch = batch_of(data, indices)
    with torch.no_grad():
        fused = model.inputs_embeds(batch)
        model.lam = 0.0
        plain = model.inputs_embeds(batch)
        model.lam = 0.2
        delta = (fused - plain)[0]
        maps = [model.merger(batch["spatial_features"][j : j + 1], GRID)[0] for j in range(len(indices))]
    image_tokens = batch["mm_token_type_ids"][0].bool()
    assert delta[~image_tokens].abs().max() == 0  # text tokens untouched
    per_image = delta[image_tokens].view(len(batch["image_sample_index"]), 4, -1)  # 4 tokens per 56x56 frame
    for image, owner in enumerate(batch["image_sample_index"].tolist()):
        torch.testing.assert_close(per_image[image], 0.2 * maps[owner], rtol=1e-4, atol=1e-6)
    # the reference's batch tiling either miscounts (unequal frame counts) or pairs frames with other samples' maps
    tiled = 0.2 * reference_tiling(torch.stack(maps), len(batch["image_sample_index"]))
    ours = per_image.reshape(-1, per_image.shape[-1])
    assert tiled.shape != ours.shape or not torch.allclose(tiled, ours, atol=1e-4)


def test_packed_batch_equals_each_sample_alone(data):
    model = build_model(BASE_CFG, CHANNELS, GRID).eval()
    batch = batch_of(data, [0, 1, 2])
    with torch.no_grad():
        hidden = model.hidden_states(batch)
        loss = model(batch)
        singles, counts = [], []
        for i, (start, end) in enumerate(segments(batch)):
            alone = batch_of(data, [i])
            torch.testing.assert_close(hidden[:, start:end], model.hidden_states(alone), rtol=1e-4, atol=ATOL)
            singles.append(model(alone))
            counts.append(len(alone["label_positions"]))
    weighted = sum(l * n for l, n in zip(singles, counts)) / sum(counts)
    torch.testing.assert_close(loss, weighted, rtol=1e-5, atol=1e-6)


def test_loss_equals_hf_full_logits_loss(data, stock):
    model = build_model(cfg(lam=0.0), CHANNELS, GRID).eval()
    batch = batch_of(data, [1])
    with torch.no_grad():
        expected = stock(**single_inputs(batch, 0), labels=batch["labels"]).loss
        torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_merger_and_llm_not_vision(data):
    model = build_model(BASE_CFG, CHANNELS, GRID)
    model.train()
    assert not model.visual.training and model.qwen.model.language_model.training
    loss = model(batch_of(data, [0, 2]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.merger.parameters())
    llm = model.qwen.model.language_model
    assert llm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.qwen.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.visual.parameters())


def test_train_visual_merger_trains_qwens_patch_merger_only(data):
    """Issue 12 (JanusVLN's --tune_mm_mlp True): Qwen's visual.merger gets gradients, the vision blocks none."""
    model = build_model(cfg(train_visual_merger=True), CHANNELS, GRID)
    model.train()
    assert not model.visual.training
    model(batch_of(data, [0, 2])).backward()
    merger = list(model.visual.merger.parameters())
    assert merger and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in merger)
    ids = {id(p) for p in merger}
    blocks = [p for p in model.visual.parameters() if id(p) not in ids]
    assert blocks and all(p.grad is None and not p.requires_grad for p in blocks)
    assert all(p.grad is not None for p in model.merger.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(data):
    batch = batch_of(data, [0, 1])
    grads = []
    for checkpointing in (False, True):
        model = build_model(BASE_CFG, CHANNELS, GRID).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(batch).backward()
        grads.append([model.merger.mlp[0].weight.grad, model.qwen.model.language_model.layers[1].mlp.up_proj.weight.grad])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-7)


def test_spatial_grid_must_match_the_qwen_image_grid(data):
    model = build_model(BASE_CFG, CHANNELS, (6, 6))
    batch = batch_of(data, [0])
    batch["spatial_features"] = torch.zeros(1, 36, CHANNELS)
    with pytest.raises(ValueError, match="must come from the run's frame geometry"):
        model(batch)


def test_loads_qwen_and_merger_weights_from_directories(data, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "qwen", image_size=56, seed=5)
    source = build_model(cfg(seed=9), CHANNELS, GRID)
    save_file({f"merger.{k}": v.contiguous() for k, v in source.merger.state_dict().items()}, tmp_path / "m.safetensors")
    model = build_model(cfg(qwen_path=str(ckpt), merger_weights=str(tmp_path / "m.safetensors")), CHANNELS, GRID)
    reference = load_qwen(cfg(seed=5))  # the same tiny weights, built in memory
    assert torch.equal(model.qwen.lm_head.weight, reference.lm_head.weight)
    for a, b in zip(model.merger.state_dict().values(), source.merger.state_dict().values()):
        assert torch.equal(a, b)
    tokenizer, processor = load_processors(cfg(qwen_path=str(ckpt)), GEOMETRY)
    assert tokenizer.get_vocab() == data[0].tokenizer.get_vocab()
    assert processor.size["shortest_edge"] == 56 * 56
    with pytest.raises(ConfigError, match="model.qwen_path"):
        build_model(cfg(qwen_path=str(tmp_path / "nowhere")), CHANNELS, GRID)
    with pytest.raises(ConfigError, match="model.merger_weights"):
        build_model(cfg(merger_weights=str(tmp_path / "m.safetensors"), merger_hidden=8), CHANNELS, GRID)
