"""Patch embeddings of the aggregator: DINOv2-with-registers ViT, or a plain conv.

The DINOv2 variant is what VGGT-1B uses (ViT-L/14, 4 registers); its sizes are
parameters so a tiny one can run in tests and the demo. Only the normalised
patch tokens leave this module; DINOv2's cls and register outputs are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlnflow.spatial.layers import Block


class ConvPatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv (`proj`), flattened to (N, P, C) tokens.

    Computed as one matmul over unfolded patches (the same arithmetic as a stride =
    kernel conv), so the result for an image does not depend on the batch it is in.
    """

    def __init__(self, dim: int, patch_size: int = 14, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        p = self.patch_size
        patches = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, (h // p) * (w // p), c * p * p)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)


class DinoV2(nn.Module):
    """DINOv2 ViT with register tokens; forward returns normalised patch tokens (N, P, C).

    Per image: patch conv; cls prepended; learned position table added (resampled
    bicubic with antialias, in float32, to the real grid unless it already fits);
    registers inserted after cls without position; blocks; final LayerNorm.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        patch_size: int = 14,
        pos_grid: int = 37,
        num_register_tokens: int = 4,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.pos_grid = pos_grid
        self.num_register_tokens = num_register_tokens
        self.patch_embed = ConvPatchEmbed(dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in the checkpoint; unused at inference
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qk_norm=False, eps=eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h * grid_w, C) position rows for cls + patches of this grid."""
        if grid_h == grid_w == self.pos_grid:
            return self.pos_embed
        table = self.pos_embed.float()
        dim = table.shape[-1]
        patch = table[:, 1:].reshape(1, self.pos_grid, self.pos_grid, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([table[:, :1], patch], dim=1).to(self.pos_embed.dtype)

    def forward(self, images: torch.Tensor, run_block=None) -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> patch tokens (N, P, C); `run_block(block, x)` may replace `block(x)`."""
        n, _, h, w = images.shape
        dtype = self.cls_token.dtype
        x = self.patch_embed(images).to(dtype)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = x + self.position_table(h // self.patch_size, w // self.patch_size)
        x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x) if run_block is None else run_block(block, x)
        return self.norm(x[:, 1 + self.num_register_tokens :])
