"""Packing in DataLoader workers (PackInWorker + DeviceBatches) gives the batch and loss of in-process packing;
live samples get their features filled in by the main process; the precomputed host metadata equals what
the model computes itself."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tiny_frames import index_row as row, write_random_frames
from vlnflow.model.batching import Collator
from vlnflow.model.host_prep import HOST_KEYS, to_device, vision_kwargs
from vlnflow.spatial.geometry import FrameGeometry
from vlnflow.model.loading import build_model, load_processors
from vlnflow.train.data import TrainItem
from vlnflow.train.packed_loader import DeviceBatches, PackInWorker

GEOMETRY = FrameGeometry("pad", 56, (64, 48))  # the tests' 64x48 frames, a 4x4 grid
MODEL_CFG = {
    "qwen_path": None, "preset": "tiny", "seed": 0, "lam": 0.2, "vision_fast": True,
    "llm_attention": "varlen", "freeze_vision": True, "merger_hidden": 24, "merger_weights": None,
    "dtype": "bfloat16", "tiny": {},
}
GRID, CHANNELS = (4, 4), 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    write_random_frames(root, 6)
    rows = [row("a", ["f0.png", "f1.png"]), row("b", ["f2.png", "f3.png", "f4.png"], action="STOP"), row("c", ["f5.png"])]
    tokenizer, processor = load_processors(MODEL_CFG, GEOMETRY)
    collator = Collator(tokenizer, processor, GEOMETRY, dataset_root=root)
    model = build_model(MODEL_CFG, CHANNELS, GRID)
    torch.manual_seed(3)
    features = [torch.randn(GRID[0] * GRID[1], CHANNELS) for _ in rows]
    items = [TrainItem(collator.encode(r), f, None) for r, f in zip(rows, features)]
    return collator, model, items, features


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class FakeSource:
    """The one method DeviceBatches calls on SpatialSource; a known feature per live sample."""

    def __init__(self, feature):
        self.feature = feature
        self.frames = []

    def encode_live(self, frames):
        self.frames.append(frames)
        return self.feature.clone()


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_worker_batch_equals_in_process_batch_and_model_metadata(setup):
    collator, model, items, features = setup
    reference = collator.pack([i.encoded for i in items], features)
    # through a real worker process: the collate_fn and its config must travel (pickle/fork)
    loader = DataLoader(Items(items), batch_size=3, collate_fn=PackInWorker(collator, model.qwen.config), num_workers=1)
    batch, n_live = next(iter(DeviceBatches(loader, FakeSource(None), "cpu")))
    assert n_live == 0
    for key, value in reference.items():
        assert_same(batch[key], value, key)
    assert torch.equal(batch["position_ids"], model.position_ids(reference))
    assert_same(batch["vision"], vision_kwargs(reference["image_grid_thw"], model.visual.config))
    image = reference["input_ids"][0] == model.qwen.config.image_token_id
    assert torch.equal(batch["image_positions"], image.nonzero().squeeze(1)) and batch["image_tokens"] == int(image.sum())
    per_map = model.merger.tokens_per_map(GRID)
    sample, token = batch["spatial_index"]
    assert torch.equal(sample, reference["image_sample_index"].repeat_interleave(per_map))
    assert torch.equal(token, torch.arange(per_map).repeat(len(reference["image_grid_thw"])))


def test_worker_batch_gives_the_same_loss_and_gradients(setup):
    collator, model, items, features = setup
    reference = collator.pack([i.encoded for i in items], features)
    packed = PackInWorker(collator, model.qwen.config)(items)
    results = []
    for batch in (reference, packed):
        model.zero_grad()
        loss = model(batch)
        loss.backward()
        results.append((loss.detach(), model.merger.mlp[0].weight.grad.clone(), model.qwen.lm_head.weight.grad.clone()))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_live_samples_are_filled_in_by_the_main_process(setup):
    collator, model, items, features = setup
    live_feature = torch.randn(GRID[0] * GRID[1], CHANNELS)
    frames = torch.rand(2, 3, 56, 56)
    mixed = [items[0], TrainItem(items[1].encoded, None, frames), items[2]]
    source = FakeSource(live_feature)
    loader = DataLoader(Items(mixed), batch_size=3, collate_fn=PackInWorker(collator, model.qwen.config))
    batches = list(DeviceBatches(loader, source, "cpu"))
    assert len(batches) == 1
    batch, n_live = batches[0]
    assert n_live == 1 and torch.equal(source.frames[0], frames)
    expected = collator.pack([i.encoded for i in mixed], [features[0], live_feature, features[2]])
    assert torch.equal(batch["spatial_features"], expected["spatial_features"])
    assert "cached_features" not in batch and "live_frames" not in batch


def test_device_batches_yields_every_batch_once_in_order(setup):
    collator, model, items, _ = setup
    loader = DataLoader(Items(items), batch_size=1, collate_fn=PackInWorker(collator, model.qwen.config))
    ids = [b["sample_ids"] for b, _ in DeviceBatches(loader, FakeSource(None), "cpu")]
    assert ids == [["a"], ["b"], ["c"]]


def test_host_keys_stay_on_the_host():
    batch = {"image_grid_thw": torch.ones(2, 3), "input_ids": torch.ones(1, 4), "vision": {"cu_seqlens": torch.ones(2)}, "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["image_grid_thw"].device.type == "cpu" and "image_grid_thw" in HOST_KEYS
    assert moved["input_ids"].device.type == "meta" and moved["vision"]["cu_seqlens"].device.type == "meta"
    assert moved["n"] == 3
