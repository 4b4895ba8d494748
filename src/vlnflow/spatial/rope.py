"""2-D rotary position embedding of the VGGT aggregator.

Each head's channels are split in two halves: the first half is rotated by the
token's grid row, the second by its column, each "rotate-half" style (channel j
pairs with j + quarter). Patch (r, c) sits at (r + 1, c + 1); the camera and
register tokens sit at (0, 0), the identity rotation. Positions are the same in
every frame, so one (T, head_dim) cos/sin table serves all frames.

The tables are built from the grid shape alone (no `positions.max()` read back
from the device, unlike the reference, which syncs on every attention call).
"""

from __future__ import annotations

import torch


def grid_positions(grid_h: int, grid_w: int, num_special: int, device=None) -> torch.Tensor:
    """(T, 2) integer (row, col) positions: `num_special` tokens at (0, 0), then patches row-major from (1, 1)."""
    rows = torch.arange(1, grid_h + 1, device=device).repeat_interleave(grid_w)
    cols = torch.arange(1, grid_w + 1, device=device).repeat(grid_h)
    patches = torch.stack([rows, cols], dim=-1)
    special = torch.zeros(num_special, 2, dtype=patches.dtype, device=device)
    return torch.cat([special, patches], dim=0)


def rope_tables(
    grid_h: int,
    grid_w: int,
    num_special: int,
    head_dim: int,
    *,
    base: float = 100.0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (T, head_dim) for one frame.

    Angles are formed in float32 (as the reference does, whatever the model dtype),
    then cast to `dtype` before cos/sin are taken.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, device=device).float() / axis_dim
    inv_freq = 1.0 / (base**exponents)  # (axis_dim / 2,) float32
    pos = grid_positions(grid_h, grid_w, num_special, device=device).float()
    halves = []
    for axis in (0, 1):  # rows rotate the first half, columns the second
        angles = (pos[:, axis, None] * inv_freq[None, :]).to(dtype)
        halves.append(torch.cat([angles, angles], dim=-1))
    angles = torch.cat(halves, dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def rotate_half_per_axis(x: torch.Tensor) -> torch.Tensor:
    """Within each half of the last dim, map (a, b) -> (-b, a) where a, b are its two quarters."""
    parts = x.unflatten(-1, (2, 2, x.shape[-1] // 4))
    first, second = parts.unbind(dim=-2)
    return torch.stack([-second, first], dim=-2).flatten(-3)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (..., T, H, D) with (T, D) tables (broadcast over heads)."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return x * cos + rotate_half_per_axis(x) * sin
