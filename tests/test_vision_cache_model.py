"""The per-frame vision cache at the model (tiny Qwen2.5-VL, CPU float32): cached tower rows give the live
tower's loss and gradients, a micro-batch may mix cached and live samples, and a wrong frame's rows show.

On CPU the merger runs the same kernels on the same rows either way, so equality is exact (bit for bit); the
stored dtype float32 keeps the rows exact, bf16 storage rounds them (bounded separately below).
"""

from __future__ import annotations

import pytest
import torch

from tiny_frames import index_row as row, write_random_frames
from vlnflow.model.batching import Collator
from vlnflow.model.host_prep import add_host_metadata
from vlnflow.model.loading import build_model, load_processors
from vlnflow.model.vision_rows import merge_rows, tower_digest, tower_rows
from vlnflow.spatial.geometry import FrameGeometry
from vlnflow.train.data import TrainItem
from vlnflow.train.packed_loader import PackInWorker

GEOMETRY = FrameGeometry("pad", 56, (64, 48))  # 64x48 frames -> 56x56 -> a 4x4 patch grid
GRID, CHANNELS = (4, 4), 12
# lam and a wide init make the loss depend on the image embeddings (the faithfulness tests' setting)
MODEL_CFG = {
    "qwen_path": None, "preset": "tiny", "seed": 0, "lam": 0.2, "vision_fast": True, "llm_attention": "varlen",
    "freeze_vision": True, "train_visual_merger": True, "merger_hidden": 24, "merger_weights": None, "dtype": "bfloat16",
    "tiny": {"initializer_range": 0.15},
}
LOSS_ATOL_BF16 = 1e-5  # bf16-stored rows (relative rounding <= 2^-8) against the fp32 tower: measured 3.8e-6
GRAD_RTOL_BF16 = 1e-2  # relative L2 error of the visual merger's gradient, same comparison: measured 1.2e-3
WRONG_FACTOR = 100  # swapping two frames' rows must move the loss by more than this many LOSS_ATOL_BF16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    write_random_frames(root, 6)
    rows = [row("a", ["f0.png", "f1.png"]), row("b", ["f2.png", "f3.png", "f4.png"], action="STOP"), row("c", ["f5.png", "f0.png"])]
    tokenizer, processor = load_processors(MODEL_CFG, GEOMETRY)
    collator = Collator(tokenizer, processor, GEOMETRY, dataset_root=root)
    model = build_model(MODEL_CFG, CHANNELS, GRID).train()
    torch.manual_seed(3)
    features = [torch.randn(GRID[0] * GRID[1], CHANNELS) for _ in rows]
    from vlnflow.model.frames import load_qwen_frame

    frame_rows = {}  # what the precompute job stores: each frame alone through the tower
    for i in range(6):
        p = processor(images=[load_qwen_frame(root / f"f{i}.png", GEOMETRY)], return_tensors="pt")
        frame_rows[f"f{i}.png"] = tower_rows(model.visual, p["pixel_values"], p["image_grid_thw"])[0]
    return collator, model, rows, features, frame_rows


def batch_of(setup, cached_samples: set, rows_of=None) -> dict:
    """A packed batch as the trainer's workers make it; samples in `cached_samples` carry their frames' rows."""
    collator, model, rows, features, frame_rows = setup
    rows_of = rows_of or frame_rows
    items = []
    for r, f in zip(rows, features):
        vision = [rows_of[rel] for rel in r["frames"]] if r["sample_id"] in cached_samples else None
        items.append(TrainItem(collator.encode(r, vision_rows=vision), f, None))
    return PackInWorker(collator, model.qwen.config)(items)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_cached_rows_equal_the_towers_pooler_output(setup):
    collator, model, rows, _, frame_rows = setup
    images = [collator.load_frame(collator.root / f"f{i}.png", GEOMETRY) for i in range(6)]
    p = collator.image_processor(images=images, return_tensors="pt")
    live = torch.cat(model.qwen.model.get_image_features(p["pixel_values"], p["image_grid_thw"]).pooler_output)
    cached = merge_rows(model.visual, torch.cat([frame_rows[f"f{i}.png"] for i in range(6)]))
    assert torch.equal(cached, live)  # same kernels on the same rows: bit for bit
    together = tower_rows(model.visual, p["pixel_values"], p["image_grid_thw"])  # a frame's rows do not depend on its batch
    assert all(torch.equal(a, frame_rows[f"f{i}.png"]) for i, a in enumerate(together))


def test_cached_rows_give_the_live_loss_and_gradients_bit_for_bit(setup):
    model = setup[1]
    live_batch, cached_batch = batch_of(setup, set()), batch_of(setup, {"a", "b", "c"})
    assert "vision_cached" not in live_batch and cached_batch["vision_cached"].all()
    assert cached_batch["pixel_values"].shape[0] == 0 and cached_batch["vision"] is None  # no image decoded, no tower
    ref_loss, ref = loss_and_grads(model, live_batch)
    loss, got = loss_and_grads(model, cached_batch)
    assert torch.equal(loss, ref_loss)
    assert set(got) == set(ref) and "qwen.model.visual.merger.mlp.0.weight" in got and "merger.mlp.0.weight" in got
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert not any(n.startswith("qwen.model.visual.blocks") for n in got)  # the frozen blocks get no gradient


def test_a_micro_batch_mixing_cached_and_live_samples_equals_all_live(setup):
    model = setup[1]
    mixed = batch_of(setup, {"a", "c"})
    assert mixed["vision_cached"].tolist() == [True, True, False, False, False, True, True]
    assert mixed["vision"]["cu_seqlens"].tolist() == [0, 16, 32, 48]  # the tower's metadata covers the 3 live images only
    ref_loss, ref = loss_and_grads(model, batch_of(setup, set()))
    loss, got = loss_and_grads(model, mixed)
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_bf16_rows_stay_within_rounding_and_a_wrong_frames_rows_show(setup):
    model, frame_rows = setup[1], setup[4]
    ref_loss, ref = loss_and_grads(model, batch_of(setup, set()))
    bf16 = {k: v.to(torch.bfloat16) for k, v in frame_rows.items()}  # as a bfloat16 cache stores an fp32 tower's rows
    loss, got = loss_and_grads(model, batch_of(setup, {"a", "b", "c"}, bf16))
    name = "qwen.model.visual.merger.mlp.0.weight"
    assert abs(float(loss - ref_loss)) <= LOSS_ATOL_BF16
    assert (got[name] - ref[name]).norm() <= GRAD_RTOL_BF16 * ref[name].norm()
    swapped = {**bf16, "f1.png": bf16["f3.png"], "f3.png": bf16["f1.png"]}  # two frames' rows exchanged
    wrong_loss, wrong = loss_and_grads(model, batch_of(setup, {"a", "b", "c"}, swapped))
    assert abs(float(wrong_loss - ref_loss)) > WRONG_FACTOR * LOSS_ATOL_BF16, (float(wrong_loss), float(ref_loss))
    assert (wrong[name] - ref[name]).norm() > 10 * GRAD_RTOL_BF16 * ref[name].norm()


def test_tower_digest_sees_the_weights(setup):
    model = setup[1]
    digest = tower_digest(model.visual)
    assert digest == tower_digest(model.visual)
    other = build_model({**MODEL_CFG, "seed": 1}, CHANNELS, GRID)
    assert tower_digest(other.visual) != digest
    with torch.no_grad():  # the merger runs after the rows: a trained merger keeps the rows valid
        other = build_model(MODEL_CFG, CHANNELS, GRID)
        other.visual.merger.mlp[0].weight.add_(1.0)
    assert tower_digest(other.visual) == digest


def test_host_metadata_without_cached_rows_is_unchanged(setup):
    collator, model, rows, features, _ = setup
    batch = add_host_metadata(collator.pack([collator.encode(r) for r in rows], features), model.qwen.config)
    assert "vision_cached" not in batch and batch["vision"]["cu_seqlens"].tolist() == [0, 16, 32, 48, 64, 80, 96, 112]
