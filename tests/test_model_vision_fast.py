"""V1 (one varlen attention call per vision layer) and V2 (MLP padded to a multiple of 64)
compute the stock Qwen2.5-VL vision tower's function; the varlen core is exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

from vlnflow.model.janus import vision_kwargs
from vlnflow.model.tiny import build_tiny_tokenizer, random_qwen, tiny_config
from vlnflow.model.varlen import varlen_attention
from vlnflow.model.vision_fast import (
    VarlenVisionAttention,
    apply_vision_fast,
    pad_vision_mlp,
    use_varlen_vision_attention,
)

# three images: one window, 4 equal windows, and 6 ragged windows (6x10 patches)
GRIDS = torch.tensor([[1, 4, 4], [1, 8, 8], [1, 6, 10]])


@pytest.fixture(scope="module")
def stock_tower():
    model = random_qwen(tiny_config(build_tiny_tokenizer()), seed=0)
    tower = model.model.visual.eval()
    assert tower.fullatt_block_indexes == [1] and len(tower.blocks) == 2  # one windowed, one full block
    return tower


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(0)
    return torch.randn(int(GRIDS.prod(-1).sum()), 3 * 2 * 14 * 14)


def run(tower, pixels, **kwargs):
    with torch.no_grad():
        return tower(pixels, grid_thw=GRIDS, **kwargs).pooler_output


def test_windows_are_ragged_and_numerous(stock_tower):
    _, cu_windows = get_vision_window_index(GRIDS, 2, stock_tower.window_size, 14)
    sizes = (cu_windows[1:] - cu_windows[:-1]).tolist()
    assert len(sizes) == 1 + 4 + 6 and len(set(sizes)) > 1


def test_v1_varlen_attention_equals_stock(stock_tower, pixels):
    fast = copy.deepcopy(stock_tower)
    assert use_varlen_vision_attention(fast) == 2
    assert all(isinstance(b.attn, VarlenVisionAttention) for b in fast.blocks)
    expected = run(stock_tower, pixels)
    torch.testing.assert_close(run(fast, pixels), expected, rtol=1e-5, atol=1e-6)
    # same with the precomputed metadata the composed model passes
    torch.testing.assert_close(
        run(fast, pixels, **vision_kwargs(GRIDS, fast.config, pixels.device)), expected, rtol=1e-5, atol=1e-6
    )


def test_v2_padded_mlp_equals_stock(stock_tower, pixels):
    fast = copy.deepcopy(stock_tower)
    assert pad_vision_mlp(fast, multiple=64) == 64  # tiny width 60 -> 64, like 3420 -> 3456
    mlp = fast.blocks[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 64
    assert mlp.original_intermediate_size == 60
    torch.testing.assert_close(run(fast, pixels), run(stock_tower, pixels), rtol=1e-6, atol=1e-6)


def test_v1_and_v2_together_equal_stock(stock_tower, pixels):
    fast = apply_vision_fast(copy.deepcopy(stock_tower))
    torch.testing.assert_close(run(fast, pixels), run(stock_tower, pixels), rtol=1e-5, atol=1e-6)


def test_v2_padding_gets_zero_gradient(stock_tower, pixels):
    """If the tower were trained, the padding would stay zero: its gradients are exactly zero."""
    fast = apply_vision_fast(copy.deepcopy(stock_tower)).train()
    fast.requires_grad_(True)
    fast(pixels, grid_thw=GRIDS).pooler_output.square().sum().backward()
    for block in fast.blocks:
        mlp = block.mlp
        assert mlp.gate_proj.weight.grad[60:].abs().max() == 0
        assert mlp.up_proj.bias.grad[60:].abs().max() == 0
        assert mlp.down_proj.weight.grad[:, 60:].abs().max() == 0
        assert mlp.gate_proj.weight.grad[:60].abs().max() > 0


def reference_segments(q, k, v, cu, causal, scale):
    """Per-segment SDPA loop (what stock transformers does)."""
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e == s:
            continue
        seg = [x[s:e].transpose(0, 1) for x in (q, k, v)]
        outs.append(
            F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale, enable_gqa=True).transpose(0, 1)
        )
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_core_matches_segment_loop_with_gqa_and_empty_segments(causal):
    torch.manual_seed(1)
    cu = torch.tensor([0, 5, 5, 12, 13, 20], dtype=torch.int32)  # includes an empty and a 1-token segment
    q = torch.randn(20, 4, 8, requires_grad=True)
    k = torch.randn(20, 2, 8, requires_grad=True)
    v = torch.randn(20, 2, 8, requires_grad=True)
    out = varlen_attention(q, k, v, cu, causal=causal, scale=0.3)
    ref = reference_segments(q, k, v, cu, causal, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.sin().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sin().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
