"""The trained bridge from a VGGT spatial feature map to the LLM's hidden size.

JanusVLN's merger, with the same layout so its weights would load: RMSNorm over the
C channels of each VGGT patch token (`ln_q`), then the (gh, gw) grid is regrouped
into 2x2 blocks, row-major over blocks and inside each block (top-left, top-right,
bottom-left, bottom-right), each block's 4*C values concatenated, and a 2-layer MLP
(`mlp.0` Linear 4C -> hidden, exact GELU, `mlp.2` Linear hidden -> LLM hidden) maps it
to one token. For JanusVLN's 644x644 frames: (46, 46, 2048) -> 529 x 8192 -> 4096 ->
3584, one token per Qwen image token of that frame, in the same order as Qwen's own
2x2-merged image tokens. An odd grid drops its last row/column, as the reference does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm


class SpatialMerger(nn.Module):
    """RMSNorm(C) then MLP over 2x2-merged spatial tokens: [B, gh*gw, C] -> [B, (gh//2)*(gw//2), out_dim]."""

    def __init__(self, channels: int, hidden_dim: int, out_dim: int, merge_size: int = 2):
        super().__init__()
        self.channels = channels
        self.merge_size = merge_size
        self.input_dim = channels * merge_size * merge_size
        self.ln_q = Qwen2_5_VLRMSNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.input_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def tokens_per_map(self, grid: tuple[int, int]) -> int:
        """Number of merged tokens one (gh, gw) feature map gives."""
        return (grid[0] // self.merge_size) * (grid[1] // self.merge_size)

    def regroup(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, gh*gw, C] (row-major grid) -> [B, gh//m, gw//m, m, m, C] blocks."""
        batch, tokens, channels = features.shape
        gh, gw = grid
        m = self.merge_size
        if tokens != gh * gw or channels != self.channels:
            raise ValueError(
                f"spatial features have shape {tuple(features.shape)}; expected [B, {gh}*{gw}, {self.channels}] "
                f"for grid {grid} with {self.channels} channels"
            )
        x = features.view(batch, gh, gw, channels)[:, : gh // m * m, : gw // m * m]
        x = x.reshape(batch, gh // m, m, gw // m, m, channels)
        return x.permute(0, 1, 3, 2, 4, 5)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        blocks = self.regroup(features.to(self.ln_q.weight.dtype), grid)
        batch = blocks.shape[0]
        merged = self.mlp(self.ln_q(blocks).reshape(-1, self.input_dim))
        return merged.view(batch, self.tokens_per_map(grid), -1)
