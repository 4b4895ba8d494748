"""SpatialMerger: JanusVLN's 2x2 grouping order, RMSNorm + MLP, shapes and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlnflow.model.spatial_merger import SpatialMerger


def coordinate_map(gh: int, gw: int) -> torch.Tensor:
    """[1, gh*gw, 2] row-major features holding each token's own (row, col)."""
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(1, gh * gw, 2).float()


def test_regroup_blocks_are_row_major_and_inner_order_is_tl_tr_bl_br():
    merger = SpatialMerger(channels=2, hidden_dim=8, out_dim=4)
    blocks = merger.regroup(coordinate_map(4, 6), (4, 6))  # -> (1, 2, 3, 2, 2, 2)
    flat = blocks.reshape(-1, 4, 2)  # merged token, inner position, (row, col)
    assert flat.shape[0] == 6
    for token, (bi, bj) in enumerate([(i, j) for i in range(2) for j in range(3)]):
        expected = [(2 * bi, 2 * bj), (2 * bi, 2 * bj + 1), (2 * bi + 1, 2 * bj), (2 * bi + 1, 2 * bj + 1)]
        assert [tuple(map(int, p)) for p in flat[token]] == expected


def test_odd_grid_drops_last_row_and_column():
    merger = SpatialMerger(channels=2, hidden_dim=8, out_dim=4)
    blocks = merger.regroup(coordinate_map(5, 7), (5, 7))
    assert blocks.shape[1:3] == (2, 3)
    assert blocks[..., 0].max() == 3 and blocks[..., 1].max() == 5
    assert merger.tokens_per_map((5, 7)) == 6


def test_forward_is_rmsnorm_then_mlp_over_concatenated_blocks():
    torch.manual_seed(0)
    channels, gh, gw = 3, 4, 4
    merger = SpatialMerger(channels, hidden_dim=10, out_dim=5)
    with torch.no_grad():
        merger.ln_q.weight.uniform_(0.5, 1.5)
    features = torch.randn(2, gh * gw, channels)
    out = merger(features, (gh, gw))
    assert out.shape == (2, 4, 5)
    # by hand: normalise each token, gather the 2x2 block of merged token (1, 0) of sample 1
    normed = features * torch.rsqrt(features.pow(2).mean(-1, keepdim=True) + 1e-6) * merger.ln_q.weight
    grid = normed[1].reshape(gh, gw, channels)
    block = torch.cat([grid[2, 0], grid[2, 1], grid[3, 0], grid[3, 1]])
    linear1, linear2 = merger.mlp[0], merger.mlp[2]
    expected = linear2(F.gelu(linear1(block)))
    torch.testing.assert_close(out[1, 2], expected, rtol=1e-5, atol=1e-6)
    # samples are independent
    torch.testing.assert_close(merger(features[:1], (gh, gw))[0], out[0])


def test_state_dict_names_match_janusvln_merger():
    merger = SpatialMerger(2048 // 64, 64, 56)
    assert set(merger.state_dict()) == {"ln_q.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}


def test_wrong_shape_names_the_expected_grid():
    merger = SpatialMerger(channels=8, hidden_dim=8, out_dim=4)
    with pytest.raises(ValueError, match=r"grid \(4, 4\) with 8 channels"):
        merger(torch.zeros(1, 15, 8), (4, 4))
