"""Attention kernel choice (model.attention, spatial.attention): auto falls back off sm90+ CUDA, asking for
flash-attn-4 where it cannot run is a clear error, and the flash-attn-4 call sites pass the right layout,
lengths and causality (checked on CPU by standing the current kernel in for flash-attn-4)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlnflow import fa4
from vlnflow.errors import UserError
from vlnflow.model.batching import Collator
from vlnflow.spatial.geometry import FrameGeometry
from vlnflow.model.loading import build_model, load_processors
from vlnflow.model.packed_attention import PACKED_ATTENTION, PACKED_ATTENTION_FA4, use_packed_attention
from vlnflow.model.varlen import varlen_attention
from vlnflow.model.vision_fast import VarlenVisionAttention, use_varlen_vision_attention
from vlnflow.spatial import SpatialEncoder

GRID, CHANNELS = (4, 4), 12
GEOMETRY = FrameGeometry("pad", 56, (64, 48))  # the tests' 64x48 frames, a 4x4 grid
MODEL_CFG = {
    "qwen_path": None, "preset": "tiny", "seed": 0, "lam": 0.2, "vision_fast": True,
    "llm_attention": "varlen", "freeze_vision": True, "merger_hidden": 24, "merger_weights": None,
    "dtype": "bfloat16", "tiny": {},
}


@pytest.fixture()
def fake_hopper(monkeypatch):
    """A CUDA device of capability `cap` and an importable (or not) flash_attn.cute, as seen by vlnflow.fa4."""

    def set_(cap=(9, 0), importable=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        module = (object(), None) if importable else (None, "flash_attn.cute is not importable (ImportError: x)")
        monkeypatch.setattr(fa4, "_module", lambda: module)

    return set_


def test_auto_falls_back_on_cpu_and_explicit_request_is_a_user_error():
    assert fa4.resolve("auto", "model.attention", "cpu", "torch", (fa4.FA4, "torch")) == "torch"
    assert fa4.resolve("torch", "model.attention", "cpu", "torch", (fa4.FA4, "torch")) == "torch"
    with pytest.raises(UserError, match=r"'model.attention' is 'flash_attn_4'.*needs a CUDA device"):
        fa4.resolve(fa4.FA4, "model.attention", "cpu", "torch", (fa4.FA4, "torch"))
    with pytest.raises(UserError, match=r"'spatial.attention' must be one of"):
        fa4.resolve("flash", "spatial.attention", "cpu", "sdpa", (fa4.FA4, "sdpa"))


def test_auto_picks_flash_attn_4_only_on_sm90_with_the_package(fake_hopper):
    choose = lambda setting="auto": fa4.resolve(setting, "model.attention", "cuda", "torch", (fa4.FA4, "torch"))  # noqa: E731
    fake_hopper((9, 0), importable=True)
    assert choose() == fa4.FA4
    fake_hopper((8, 0), importable=True)
    assert choose() == "torch"
    with pytest.raises(UserError, match=r"compute capability 9.0 or newer, this GPU has 8.0"):
        choose(fa4.FA4)
    fake_hopper((10, 0), importable=False)
    assert choose() == "torch"
    with pytest.raises(UserError, match=r"not importable.*gpu extra"):
        choose(fa4.FA4)


def test_model_build_logs_the_kernels_and_refuses_fa4_on_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="vlnflow.model.loading"):
        model = build_model(MODEL_CFG, CHANNELS, GRID)
    assert model.qwen.config.text_config._attn_implementation == PACKED_ATTENTION
    vision = [m for m in model.visual.modules() if isinstance(m, VarlenVisionAttention)]
    assert vision and all(m.attention_backend == "torch" for m in vision)
    assert any("kernels: LLM torch varlen" in r.message and "vision tower torch varlen" in r.message and "model.fused_kernels=auto" in r.message for r in caplog.records)
    with pytest.raises(UserError, match="model.attention"):
        build_model({**MODEL_CFG, "attention": fa4.FA4}, CHANNELS, GRID)


def test_spatial_auto_is_sdpa_on_cpu_and_fa4_request_fails():
    assert SpatialEncoder.from_config({"preset": "tiny"}).attention_kernel == "sdpa"
    with pytest.raises(UserError, match="spatial.attention"):
        SpatialEncoder.from_config({"preset": "tiny", "attention": fa4.FA4})


# ---- the flash-attn-4 call sites, with the current kernel standing in for flash-attn-4 ---------------


@pytest.fixture()
def data(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"f{i}.png")
    rows = [
        dict(sample_id="a", episode_id="e0", frames=["f0.png", "f1.png"], instruction="walk to the table",
             action="MOVE_FORWARD", prompt=None, answer=None, sub_instruction="walk forward",
             description_2d="a table", description_3d="one meter ahead", source_format="episodes"),
        dict(sample_id="b", episode_id="e1", frames=["f2.png", "f3.png", "f4.png"], instruction="go", action="STOP",
             prompt="Past: <image><image>\nNow: <image>\nWhat next?", answer="The next action is STOP.",
             sub_instruction=None, description_2d=None, description_3d=None, source_format="annotations"),
    ]
    tokenizer, processor = load_processors(MODEL_CFG, GEOMETRY)
    collator = Collator(tokenizer, processor, GEOMETRY, dataset_root=tmp_path)
    torch.manual_seed(1)
    return collator([rows[0], rows[1]], [torch.randn(16, CHANNELS) for _ in range(2)])


def test_fa4_varlen_call_sites_pass_lengths_and_causality(data, monkeypatch):
    calls = []

    def stand_in(q, k, v, cu, max_seqlen, *, causal, scale=None):
        calls.append({"heads": (q.shape[1], k.shape[1]), "max": max_seqlen, "causal": causal, "cu": cu.tolist(), "scale": scale})
        return varlen_attention(q, k, v, cu, max_seqlen, causal=causal, scale=scale)

    monkeypatch.setattr(fa4, "varlen", stand_in)
    model = build_model(MODEL_CFG, CHANNELS, GRID).eval()
    with torch.no_grad():
        expected = model(data)
        use_packed_attention(model.qwen, fa4.FA4)
        use_varlen_vision_attention(model.visual, fa4.FA4)
        assert model.qwen.config.text_config._attn_implementation == PACKED_ATTENTION_FA4
        got = model(data)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    llm = [c for c in calls if c["causal"]]
    vision = [c for c in calls if not c["causal"]]
    text = model.qwen.config.text_config
    # flash-attn-4 in the vision tower's full-attention blocks only (windowed blocks measured faster on torch's)
    assert len(llm) == text.num_hidden_layers and len(vision) == len(model.visual.config.fullatt_block_indexes) > 0
    assert all(c["cu"] == data["cu_seqlens"].tolist() and c["max"] == data["max_seqlen"] for c in llm)
    assert all(c["heads"] == (text.num_attention_heads, text.num_key_value_heads) for c in llm)  # GQA: K/V not repeated
    assert all(isinstance(c["max"], int) for c in vision)


def test_fa4_dense_call_sites_in_vggt_equal_sdpa(monkeypatch):
    shapes = []

    def stand_in(q, k, v, *, causal=False, scale=None):
        assert not causal and q.dim() == 4
        shapes.append((q.shape[1], k.shape[1]))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    monkeypatch.setattr(fa4, "dense", stand_in)
    encoder = SpatialEncoder.from_config({"preset": "tiny", "image_size": 56})
    frames = torch.rand(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    expected = encoder.encode(frames)
    encoder.model.attention_kernel = fa4.FA4  # as configure() would on an sm90 GPU
    got = encoder.encode(frames)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    t = 4 * 4 + encoder.model.patch_start_idx
    assert (t, t) in shapes  # frame attention
    assert {(t, 2 * t), (t, 3 * t)} <= set(shapes)  # block-causal prefixes and the kept layer's last frame


def test_fa4_backward_only_at_verified_head_dims(monkeypatch):
    """With autograd, flash-attn-4 runs only at head dims whose backward matched on an H200 (hd 128);
    at other head dims (the vision tower's 80, the tiny model's 16) the call keeps the current kernel."""
    calls = []
    monkeypatch.setattr(fa4, "varlen", lambda q, *a, **k: calls.append(q.shape[-1]) or torch.zeros_like(q))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    for head_dim, grad, expect_fa4 in [(128, True, True), (80, True, False), (16, True, False), (80, False, True)]:
        calls.clear()
        q = torch.randn(8, 2, head_dim, requires_grad=grad)
        k, v = torch.randn(8, 2, head_dim), torch.randn(8, 2, head_dim)
        out = varlen_attention(q, k, v, cu, 5, causal=True, backend=fa4.FA4)
        assert bool(calls) == expect_fa4, (head_dim, grad)
        if not expect_fa4:  # the fallback computed real attention, not the stand-in's zeros
            torch.testing.assert_close(out, varlen_attention(q, k, v, cu, 5, causal=True))
    with torch.no_grad():
        assert fa4.usable_for(torch.randn(4, 2, 80, requires_grad=True))
