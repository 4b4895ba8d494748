"""Host-side metadata of a packed batch, computed once on CPU (in a DataLoader worker) instead of in forward.

`JanusModel.forward` needs, besides the tensors `Collator.pack` makes: the 4-row mRoPE
position ids (transformers' `get_rope_index`, a Python loop over each sample's token
groups), the vision tower's windows / cu_seqlens / rotary positions, and where the image
tokens sit. Computing those in forward costs host time every micro-batch and, once the
batch is on the GPU, device->host reads (`.tolist()`, `.cpu()`, `int(mask.sum())`) that
stall the stream. `add_host_metadata(batch, qwen_config)` adds them to a CPU batch:

  position_ids [4, 1, T], image_positions [N] (indices of image tokens), image_tokens int,
  spatial_index ([N] sample, [N] merged-token) gathering each image token's spatial feature,
  vision {cu_seqlens, max_seqlen, window_index, cu_window_seqlens, max_window_seqlen, position_ids}

The model uses them when present and computes them itself otherwise (same values, tested).
`image_grid_thw` and `vision_cached` (which images carry cached vision rows; the tower's metadata then
describes only the others) are HOST_KEYS: they stay on the CPU when a batch moves to the GPU, so the
tower's split sizes and the merger's token counts never read the device.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

HOST_KEYS = frozenset({"image_grid_thw", "vision_cached"})


class _RopeIndexer:
    """transformers' Qwen2_5_VLModel.get_rope_index without the model: the method only reads
    `self.config` and calls other methods of the class, which are bound here on demand."""

    def __init__(self, config):
        self.config = config

    def __getattr__(self, name):
        if name.startswith("__") or name == "config":
            raise AttributeError(name)
        attr = getattr(Qwen2_5_VLModel, name)
        return attr.__get__(self) if callable(attr) else attr


def rope_indexer(qwen_config):
    """A picklable stand-in for `model.model.get_rope_index` (DataLoader workers have no model)."""
    return _RopeIndexer(qwen_config).get_rope_index


def packed_position_ids(get_rope_index, batch: dict) -> torch.Tensor:
    """[4, 1, T] on CPU: row 0 restarts at every sample (packing boundaries), rows 1-3 each sample's mRoPE."""
    ids = batch["input_ids"][0].cpu()
    types = batch["mm_token_type_ids"][0].cpu()
    grid = batch["image_grid_thw"].cpu()
    owner = batch["image_sample_index"].cpu()
    cu = batch["cu_seqlens"].tolist()
    text, mrope = [], []
    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        positions, _ = get_rope_index(
            ids[None, start:end], mm_token_type_ids=types[None, start:end], image_grid_thw=grid[owner == i]
        )
        mrope.append(positions)
        text.append(torch.arange(end - start))
    return torch.cat([torch.cat(text)[None, None], torch.cat(mrope, dim=2)], dim=0)


def vision_kwargs(image_grid_thw: torch.Tensor, vision_config, device: torch.device | str = "cpu") -> dict:
    """Vision-tower metadata (windows, cu_seqlens, max lengths, rotary positions) computed on CPU.

    Uses transformers' own helpers, which the tower accepts precomputed; this keeps the
    tower from reading lengths back from the GPU in every layer.
    """
    grid = image_grid_thw.cpu()
    merge = vision_config.spatial_merge_size
    cu = get_vision_cu_seqlens(grid)
    window_index, cu_window = get_vision_window_index(
        grid, spatial_merge_size=merge, window_size=vision_config.window_size, patch_size=vision_config.patch_size
    )
    return {
        "cu_seqlens": cu.to(device),
        "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        "window_index": window_index.to(device),
        "cu_window_seqlens": cu_window.to(device),
        "max_window_seqlen": int((cu_window[1:] - cu_window[:-1]).max()),
        "position_ids": get_vision_position_ids(grid, merge).to(device),
    }


def add_host_metadata(batch: dict, qwen_config) -> dict:
    """`batch` (CPU tensors from Collator.pack) plus the metadata above; returns the same dict."""
    image = batch["input_ids"][0] == qwen_config.image_token_id
    batch["position_ids"] = packed_position_ids(rope_indexer(qwen_config), batch)
    batch["image_positions"] = image.nonzero().squeeze(1)
    batch["image_tokens"] = int(image.sum())
    live = batch["image_grid_thw"]
    if batch.get("vision_cached") is not None:  # the tower runs only for images without cached rows
        live = live[~batch["vision_cached"]]
    batch["vision"] = vision_kwargs(live, qwen_config.vision_config) if len(live) else None
    merge = qwen_config.vision_config.spatial_merge_size
    per_image = (batch["image_grid_thw"].prod(-1) // (merge * merge)).tolist()
    batch["spatial_index"] = (
        batch["image_sample_index"].repeat_interleave(torch.tensor(per_image)),
        torch.cat([torch.arange(n) for n in per_image]) if per_image else torch.zeros(0, dtype=torch.long),
    )
    return batch


def to_device(batch: dict, device: torch.device, non_blocking: bool = True) -> dict:
    """Every tensor (also inside dicts and lists) to `device`, except HOST_KEYS, which stay on the CPU."""

    def move(key, value):
        if isinstance(value, dict):
            return {k: move(k, v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(key, v) for v in value)
        if torch.is_tensor(value) and key not in HOST_KEYS:
            return value.to(device, non_blocking=non_blocking)
        return value

    return {k: move(k, v) for k, v in batch.items()}
