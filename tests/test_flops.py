"""vlnflow.flops against numbers worked out by hand for small shapes (each derivation in a comment),
then the real shapes against the figures docs/benchmarks.md and docs/design.md print."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlnflow import flops as F

REPO = Path(__file__).resolve().parents[1]

# A tiny aggregator: width 4, MLP 8, patch 2, DINOv2 of depth 1 with 1 register, 2 camera/register slots.
TINY_VGGT = SimpleNamespace(embed_dim=4, mlp_ratio=2.0, patch_size=2, patch_embed="dinov2", dino_register_tokens=1,
                            dino_depth=1, num_register_tokens=2, depth=3)  # fmt: skip
GRID = (2, 3)  # not square: 6 patches


def test_building_blocks():
    assert F.linear(3, 4, 5) == 2 * 3 * 4 * 5 == 120
    assert F.attention(2, 3, 4) == 96  # QK^T 2*2*3*4 + PV 2*2*3*4
    assert F.causal_attention(3, 4) == 72  # half of attention(3, 3, 4) = 144


def test_vggt_counts_by_hand():
    # patch conv: 6 patches x (3*2*2=12 -> 4): 2*6*12*4 = 576
    # DINOv2 block on 1 cls + 1 register + 6 patches = 8 tokens: per token qkv 4*12 + proj 4*4 + MLP 4*8 + 8*4
    #   = 128 MACs = 256 FLOPs -> 2048; attention 4*8*8*4 = 1024            => dino = 576 + 3072 = 3648
    assert F.vggt_dino(TINY_VGGT, GRID) == 3648
    assert F.vggt_dino(SimpleNamespace(**{**vars(TINY_VGGT), "patch_embed": "conv"}), GRID) == 576
    # trunk, 3 frames, keep layer 1; frame tokens 6 + 1 camera + 2 registers = 9: block linear 256*9 = 2304,
    # frame attention 4*9*9*4 = 1296
    #   frame blocks 0..1 on 3 frames:  3 * 2 * (2304 + 1296)                               = 21600
    #   global block 0: 3 * 2304 + attention over 9, 18, 27 keys: 4*9*4 * (9+18+27) = 7776  = 14688
    #   global block 1, last frame only: k,v of 2 earlier frames 2*(2*9*4*8=576) + 2304 + 4*9*27*4=3888 = 7344
    assert F.vggt_trunk(TINY_VGGT, GRID, frames=3, keep=1) == 21600 + 14688 + 7344 == 43632
    assert F.vggt_minimum(TINY_VGGT, GRID, frames=3, keep=1) == 3 * 3648 + 43632 == 54576
    # encode_indexed: 4 samples over 5 unique images -> DINOv2 5 times, trunk 4 times
    assert F.vggt_indexed(TINY_VGGT, GRID, 3, 1, samples=4, unique_images=5) == 5 * 3648 + 4 * 43632 == 192768
    # streaming, all 3 layers: per layer 3 frames x (frame + global block 2*2304 + frame attention 1296)
    #   + global attention 7776 = 25488; x3 layers + 3 DINOv2
    assert F.vggt_streaming(TINY_VGGT, GRID, frames=3) == 3 * 25488 + 3 * 3648 == 87408
    assert F.vggt_streaming(TINY_VGGT, GRID, frames=3, layers=2) == 2 * 25488 + 3 * 3648
    # a transposed grid has the same count (only the patch count enters); a different one does not
    assert F.vggt_minimum(TINY_VGGT, (3, 2), 3, 1) == 54576 != F.vggt_minimum(TINY_VGGT, (2, 4), 3, 1)


def test_vggt_1b_reproduces_the_published_minimum_and_the_indexed_figure():
    from vlnflow.spatial import PRESETS

    big = PRESETS["vggt-1b"]
    # the figures docs/benchmarks.md has printed since 2026-11-27 (written by the previous, in-script formula)
    assert F.vggt_minimum(big, (46, 46), 9, 22) / 1e12 == pytest.approx(59.496805982208, rel=1e-12)
    assert F.vggt_streaming(big, (46, 46), 9) / 1e12 == pytest.approx(62.47181058048, rel=1e-12)
    # encode_indexed over one episode's steps 0..15 (16 unique frames): 45.7 TF per sample, not 59.5
    assert F.vggt_indexed(big, (46, 46), 9, 22, samples=16, unique_images=16) / 16 / 1e12 == pytest.approx(45.69, abs=0.01)


def test_llm_counts_by_hand():
    shape = F.LlmShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    # q 8x8 + k,v 2*(8x4) + o 8x8 + MLP 3*(8x16) = 64 + 64 + 64 + 384
    assert shape.block_weights == 576
    fwd = F.llm_forward(shape, seq_lens=(3, 5), labels=2)
    # linear 2 layers * 2 * 576 * 8 tokens; attention 2 layers * (2*3*3*8 + 2*5*5*8); head 2*2*8*10
    assert fwd == {"linear": 18432, "attention": 1088, "head": 320}
    # packing: attention is per sample, so (3, 5) is less than one sequence of 8
    assert F.llm_forward(shape, (8,), 2)["attention"] == 2 * 2 * 64 * 8 > fwd["attention"]
    # Qwen2.5-VL-7B: 233,046,016 matmul weights per layer, 6.525e9 in 28 layers
    assert F.LlmShape().block_weights == 233_046_016 and 28 * F.LlmShape().block_weights == 6_525_288_448


TINY_VISION = F.VisionShape(depth=2, hidden=4, intermediate=6, patch_size=2, temporal_patch_size=2, in_channels=3, merge=2,
                            window_size=8, full_blocks=(1,), out_hidden=5)  # fmt: skip


def test_vision_tower_counts_by_hand():
    # grid 6 x 10 patches -> merged 3 x 5; windows of 8 px / 2 px / merge 2 = 2 merged units a side:
    # rows (2, 1) x cols (2, 2, 1) merged units, x4 patches each
    assert F.window_sizes(TINY_VISION, (6, 10)) == [16, 16, 8, 8, 8, 4]
    out = F.vision_forward(TINY_VISION, (6, 10))
    assert out == {
        "patch_embed": 2 * 60 * 24 * 4,  # 60 patches, 3*2*2*2 = 24 inputs -> 4
        "linear": 2 * (2 * 60 * 4 * 12 + 2 * 60 * 4 * 4 + 3 * 2 * 60 * 4 * 6),  # 2 blocks: qkv, proj, gate/up/down
        "attention": 4 * 60 * 60 * 4 + 4 * 4 * (256 + 256 + 64 + 64 + 64 + 16),  # block 1 full, block 0 windowed
        "merger": 2 * 15 * 16 * 16 + 2 * 15 * 16 * 5,  # 15 merged tokens of 4*4 = 16 -> 16 -> 5
    }
    assert sum(out.values()) == 123360


def test_window_sizes_match_transformers_window_index():
    from transformers.vision_utils import get_vision_window_index

    for shape, grid in ((TINY_VISION, (6, 10)), (F.VisionShape(), (46, 46)), (F.VisionShape(), (34, 46))):
        _, cu = get_vision_window_index(torch.tensor([[1, *grid]]), spatial_merge_size=shape.merge,
                                        window_size=shape.window_size, patch_size=shape.patch_size)  # fmt: skip
        theirs = [int(n) for n in (cu[1:] - cu[:-1]) if n]
        assert sorted(theirs) == sorted(F.window_sizes(shape, grid)), grid


def test_spatial_merger_and_training_step_by_hand():
    # (4, 6) grid -> 2 x 3 = 6 merged tokens: 2*6*(4*3)*5 + 2*6*5*7; an odd grid drops its last row/column
    assert F.spatial_merger_forward((4, 6), channels=3, hidden=5, out=7) == 720 + 420
    assert F.spatial_merger_forward((5, 7), 3, 5, 7) == 1140
    llm = F.LlmShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    work = F.BatchWork.of_lengths((3, 5), labels=2, image_grids=((6, 10),))
    assert (work.samples, work.tokens, work.tokens_sq) == (2, 8, 9 + 25)
    step = F.training_step(work, llm, TINY_VISION, spatial_grid=(4, 6), spatial_channels=3, merger_hidden=5, recomputed_layers=1)
    merger_fwd = 2 * 6 * 12 * 5 + 2 * 6 * 5 * 8  # out = the LLM hidden (8)
    assert step["llm"] == 3 * (18432 + 1088 + 320)
    assert step["vision"] == 123360  # frozen: forward only
    assert step["merger"] == 3 * 2 * merger_fwd  # trained, one feature map per sample
    assert step["recompute"] == (18432 + 1088) / 2  # 1 of 2 layers' forward again, the head is not recomputed
    assert step["model"] == step["llm"] + step["vision"] + step["merger"] and step["executed"] == step["model"] + step["recompute"]
    twice = work + work
    assert (twice.samples, twice.tokens, twice.tokens_sq, twice.labels, twice.image_grids) == (4, 16, 68, 4, ((6, 10), (6, 10)))
    assert F.llm_forward_sums(llm, 8, 34, 2) == F.llm_forward(llm, (3, 5), 2)


def test_batch_work_of_a_packed_batch():
    from vlnflow.model.batching import Collator
    from vlnflow.model.loading import load_processors

    import numpy as np
    from PIL import Image

    root = Path(__import__("tempfile").mkdtemp())
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 40 * i, dtype=np.uint8)).save(root / f"f{i}.png")
    from vlnflow.spatial.geometry import FrameGeometry

    cfg = {"preset": "tiny", "merger_hidden": 24}
    geometry = FrameGeometry("pad", 56, (64, 48))
    tokenizer, processor = load_processors(cfg, geometry)
    row = dict(episode_id="e", instruction="walk to the table", action="STOP", prompt=None, answer=None, sub_instruction="stop",
               description_2d="a table", description_3d="ahead", source_format="episodes")  # fmt: skip
    rows = [{**row, "sample_id": "a", "frames": ["f0.png"]}, {**row, "sample_id": "b", "frames": ["f1.png", "f2.png"]}]
    batch = Collator(tokenizer, processor, geometry, dataset_root=root)(rows, [torch.zeros(16, 12)] * 2)
    work = F.BatchWork.of(batch)
    cu = batch["cu_seqlens"].tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    assert (work.samples, work.tokens, work.tokens_sq) == (2, batch["input_ids"].shape[1], sum(n * n for n in lens))
    assert work.labels == batch["label_positions"].numel() > 0
    assert work.image_grids == ((4, 4),) * 3  # 56 px / 14
    del batch["seq_lens"]  # older batches: read from cu_seqlens
    assert F.BatchWork.of(batch) == work


def test_real_7b_step_matches_the_design_breakdown():
    """docs/design.md "Measured facts": a 5,310-token sample with 80 label tokens and 9 frames of 644x644."""
    llm, vision = F.LlmShape(), F.VisionShape()
    work = F.BatchWork.of_lengths((5310,), 80, ((46, 46),) * 9)
    step = F.training_step(work, llm, vision, spatial_grid=(46, 46), spatial_channels=2048, merger_hidden=4096,
                           recomputed_layers=28)  # fmt: skip
    fwd = step["llm_forward"]
    design = (REPO / "docs" / "design.md").read_text()
    for value in (fwd["linear"], fwd["attention"], fwd["head"], step["llm"], step["llm"] + step["recompute"], step["vision"], step["merger"]):
        assert f"{value / 1e12:.2f} TFLOP" in design, f"{value / 1e12:.2f} TFLOP"
    assert fwd["linear"] / 1e12 == pytest.approx(69.30, abs=0.01) and step["vision"] / 1e12 == pytest.approx(25.46, abs=0.01)


def test_mfu_names_its_denominators():
    assert F.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert F.datasheet_peak_tflops("NVIDIA H200") == F.datasheet_peak_tflops("NVIDIA H800") == 989.4
    for other in ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "cpu", None):
        assert F.datasheet_peak_tflops(other) is None
    m = F.mfu(989.4e12 * 4, 2.0, gpus=2, matmul_tflops=742.05, device_name="NVIDIA H200")
    assert m["tflops_per_s_per_gpu"] == pytest.approx(989.4) and m["mfu_vs_peak"] == pytest.approx(1.0)
    assert m["mfu_vs_matmul"] == pytest.approx(989.4 / 742.05) and m["peak_tflops"] == 989.4
    cpu = F.mfu(1e12, 1.0, device_name="cpu")
    assert cpu["mfu_vs_peak"] is None and cpu["mfu_vs_matmul"] is None and cpu["tflops_per_s_per_gpu"] == 1.0
    with pytest.raises(ValueError):
        F.mfu(1.0, 0.0)


def test_step_counter_takes_the_shapes_from_the_config():
    from vlnflow.config import load_config

    demo = load_config(REPO / "config.yaml")  # tiny Qwen (64 wide, 2 layers), tiny VGGT, 640x480 crop frames at 84 px
    count = F.step_counter(demo)
    assert (count.llm.layers, count.llm.hidden, count.llm.heads, count.vision.depth) == (2, 64, 4, 2) and count.image_grid == (4, 6)
    work = F.BatchWork.of_lengths((40, 30), 6, ((4, 6),) * 3)
    step = count(work, recomputed_layers=1)
    assert step == F.training_step(work, count.llm, count.vision, spatial_grid=(4, 6), spatial_channels=64,
                                   merger_hidden=demo["model"]["merger_hidden"], recomputed_layers=1)  # fmt: skip
    r2r = load_config(REPO / "configs" / "janusvln_r2r_h800.yaml")  # Qwen2.5-VL-7B shape, VGGT-1B at 644, crop
    seven = {**r2r["model"], "qwen_path": None, "init_from": None, "preset": "qwen2.5-vl-7b"}
    assert F.step_counter({**r2r, "model": seven}).image_grid == (34, 46)  # 640x480 crop: 476x644 Qwen image
    real = F.step_counter({**r2r, "model": seven, "spatial": {**r2r["spatial"], "preprocess": "pad"}})
    assert real.llm == F.LlmShape() and real.vision == F.VisionShape() and real.image_grid == (46, 46)
    assert real(F.BatchWork.of_lengths((5310,), 80, ((46, 46),) * 9))["model"] / 1e12 == pytest.approx(250.75, abs=0.01)
