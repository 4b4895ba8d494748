"""Batch shapes that torch.compile sees: the same few shapes all shard long, so nothing recompiles after warm-up.

The compiled pieces of the encoder (`Block.qkv_heads`, `Block.residual`) see tensors whose leading axis is a
batch count: U unique images (DINOv2), B*S frames (frame and global blocks) or B samples (the kept layer); the
token and channel axes are fixed by the geometry. Two strategies (`spatial.compile_shapes`):

* `dynamic` (default): that leading axis is marked dynamic (`torch._dynamo.mark_dynamic`), every other axis
  stays static, so one graph per block kind serves every batch (two shape classes: samples of one frame and
  of several, see `shape_key`). Batches are padded only where an axis would be 1 (Dynamo specialises sizes 0
  and 1): U and B to at least 2.
* `bucketed`: every shape static. B is padded to `spatial.batch_size` and U up to a multiple of
  `spatial.frame_bucket`, so a shard compiles one graph per (U bucket) and per frame count S, each once.

Padding never changes a real row: a padded image is zeros and no row refers to it; a padded row repeats row 0's
frames and is dropped from the output (`ShapePolicy.pad`). Each row is computed by itself (attention, norms
and matmul rows do not mix samples), which the tests check bit for bit on CPU.

`shape_key` names the compiled-shape class of a batch; the first batch of each class is warm-up, and a compile
in any later batch is a recompile (logged as a warning, counted in the precompute stats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlnflow.errors import UserError

STRATEGIES = ("dynamic", "bucketed")
MAX_FRAMES_DEFAULT = 9  # history.max_frames 8 + the current frame


@dataclass(frozen=True)
class ShapePolicy:
    """How batches are padded before the encoder, and which shapes count as one compiled shape."""

    strategy: str = "dynamic"
    batch_size: int = 4
    frame_bucket: int = 8

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"spatial.compile_shapes must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.batch_size < 1 or self.frame_bucket < 1:
            raise UserError(f"spatial.batch_size and spatial.frame_bucket must be >= 1, got {self.batch_size}, {self.frame_bucket}")

    @classmethod
    def from_config(cls, spatial_cfg: dict) -> ShapePolicy:
        return cls(
            strategy=spatial_cfg.get("compile_shapes", "dynamic"),
            batch_size=int(spatial_cfg.get("batch_size", 4)),
            frame_bucket=int(spatial_cfg.get("frame_bucket", 8)),
        )

    def pads(self, compiling: bool) -> bool:
        """Whether batches are padded: always under `bucketed` (the setting asks for fixed shapes); under `dynamic`
        only when the encoder compiles (its only padding avoids Dynamo's size-1 specialisation)."""
        return self.strategy == "bucketed" or compiling

    def padded_sizes(self, unique: int, rows: int) -> tuple[int, int]:
        """(U, B) after padding for a batch of `rows` samples over `unique` images."""
        if self.strategy == "bucketed":
            b = max(rows, self.batch_size * math.ceil(rows / self.batch_size))
            return self.frame_bucket * math.ceil(max(unique, 1) / self.frame_bucket), b
        return max(unique, 2), max(rows, 2)

    def shape_key(self, unique: int, rows: int, frames: int) -> tuple:
        """The compiled-shape class of a batch: its padded sizes under `bucketed`; under `dynamic`, one class for
        samples of one frame and one for several (the kept layer's last-frame view is contiguous only when S = 1,
        and Dynamo guards on strides)."""
        if self.strategy == "bucketed":
            u, b = self.padded_sizes(unique, rows)
            return (u, b, frames)
        return ("dynamic", "S=1" if frames == 1 else "S>1")

    def describe(self, unique: int, rows: int, frames: int) -> str:
        u, b = self.padded_sizes(unique, rows)
        return f"S={frames} frames, U={unique} unique images (padded {u}), B={rows} samples (padded {b})"

    def pad(self, images: torch.Tensor, frame_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [U', 3, H, W], frame_index [B', S]) padded per the policy; rows [:B] are the input's rows."""
        unique, rows = images.shape[0], frame_index.shape[0]
        if rows == 0:
            return images, frame_index
        u, b = self.padded_sizes(unique, rows)
        if u > unique:
            images = torch.cat([images, images.new_zeros((u - unique, *images.shape[1:]))])
        if b > rows:
            frame_index = torch.cat([frame_index, frame_index[:1].expand(b - rows, -1)])
        return images, frame_index

    def pad_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-sample frames (B, S, 3, H, W) padded to the policy's B (repeats of sample 0; the caller drops them)."""
        rows = frames.shape[0]
        _, b = self.padded_sizes(rows * frames.shape[1], rows)
        if b > rows:
            frames = torch.cat([frames, frames[:1].expand(b - rows, *frames.shape[1:])])
        return frames

    def recompile_limit(self, max_frames: int = MAX_FRAMES_DEFAULT) -> int:
        """Compiled graphs one block function may need: `bucketed` compiles per U bucket and per frame count."""
        if self.strategy == "dynamic":
            return 8
        buckets = math.ceil(self.batch_size * max_frames / self.frame_bucket)
        return 2 * (buckets + max_frames + 1) + 8


def raise_recompile_limit(limit: int) -> int:
    """Dynamo's per-function graph limit at least `limit` (past it Dynamo would run that function eagerly)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)
    return getattr(config, name)


def _mark_batch_axis(t) -> None:
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] >= 2:
        torch._dynamo.mark_dynamic(t, 0)


def compiled_block_fns(policy: ShapePolicy, qkv, residual):
    """(qkv_fn, residual_fn): torch.compile'd block halves for `policy`; shapes stay static unless marked.

    `dynamic=False` switches Dynamo's automatic dynamic shapes off, so nothing becomes dynamic behind the
    policy's back; under `dynamic` the wrappers mark each call's batch axis dynamic (sizes >= 2).
    """
    raise_recompile_limit(policy.recompile_limit())
    qkv_c = torch.compile(qkv, dynamic=False)
    residual_c = torch.compile(residual, dynamic=False)
    if policy.strategy == "bucketed":
        return qkv_c, residual_c

    def qkv_fn(block, x, rope):
        _mark_batch_axis(x)
        return qkv_c(block, x, rope)

    def residual_fn(block, x, attn_out):
        _mark_batch_axis(x)
        _mark_batch_axis(attn_out)
        return residual_c(block, x, attn_out)

    return qkv_fn, residual_fn
