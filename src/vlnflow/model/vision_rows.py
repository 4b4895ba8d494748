"""Per-frame vision rows: Qwen2.5-VL's vision tower output before `visual.merger`, one [P, C] map per frame.

Why: the tower's 32 blocks are frozen (model.freeze_vision, lr.vision 0), so their output for a frame is
the same every time the frame appears in a sample's history (9 times per epoch). The per-frame vision cache
(vlnflow.cache.vision_precompute) stores these rows once; training then runs only `visual.merger` (the
trained part with model.train_visual_merger) on them.

The tower permutes its merge units (2x2 patches) into attention-window order and returns `last_hidden_state`
in that order; its `pooler_output` is `merger(last_hidden_state)[argsort(window_index)]`. The merger works on
each merge unit alone (RMSNorm per patch, then an MLP per unit), so putting the units back into spatial order
first gives the same thing: `merger(rows) == pooler_output`, where
    rows = last_hidden_state.reshape(U, 4, C)[argsort(window_index)].reshape(-1, C)
and each frame owns the next `t*h*w` rows (frames never share a window or an attention span, so a frame's
rows do not depend on which other frames ran with it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from vlnflow.model.host_prep import vision_kwargs


def unit_order(visual: nn.Module, image_grid_thw: torch.Tensor, vision: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """argsort(window_index): the tower's merge units back in spatial order, image after image.

    `vision`: precomputed tower metadata (vlnflow.model.host_prep.vision_kwargs); transformers' helper pops
    keys from the dict it is given, so it gets a copy."""
    if vision is not None and vision.get("window_index") is not None:
        return torch.argsort(vision["window_index"])
    cfg = visual.config
    window_index, _ = get_vision_window_index(
        image_grid_thw.cpu(), spatial_merge_size=cfg.spatial_merge_size, window_size=cfg.window_size,
        patch_size=cfg.patch_size, kwargs=dict(vision or {}),
    )
    return torch.argsort(window_index)


def tower_rows(visual: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
               vision: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tower's output before its merger, one [t*h*w, C] tensor per image in spatial merge-unit order."""
    grid = image_grid_thw.cpu()
    kwargs = dict(vision) if vision is not None else vision_kwargs(grid, visual.config, pixel_values.device)
    order = unit_order(visual, grid, kwargs).to(pixel_values.device)
    with torch.no_grad():
        hidden = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, **kwargs).last_hidden_state
    unit = visual.config.spatial_merge_size ** 2
    rows = hidden.reshape(-1, unit, hidden.shape[-1])[order].reshape(-1, hidden.shape[-1])
    return list(torch.split(rows, grid.prod(-1).tolist()))


def merge_rows(visual: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """`visual.merger` on cached rows [N, C] (whole frames, spatial unit order) -> [N / 4, LLM hidden]."""
    return visual.merger(rows.to(visual.merger.ln_q.weight.dtype))


def image_embeddings(visual: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                     vision: Mapping | None, cached: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[image tokens, hidden] in image order for a micro-batch where `cached` [images] (bool, host) marks the
    images whose rows came from the cache (`rows`: theirs, concatenated in image order); the others
    (`pixel_values`, `vision` describe only those) run through the frozen tower. One merger call over every
    image's rows in image order, as when all are cached: the merger's gradients sum in one order either way."""
    cached = cached.cpu().bool()
    grid = image_grid_thw.cpu()
    per_image = grid.prod(-1).tolist()
    live = (~cached).nonzero().squeeze(1).tolist()
    hits = iter(torch.split(rows, [per_image[i] for i in cached.nonzero().squeeze(1).tolist()]))
    computed = iter(tower_rows(visual, pixel_values, grid[live], vision) if live else [])
    dtype = visual.merger.ln_q.weight.dtype  # what the merger computes in (a bf16 cache of an fp32 CPU tower: upcast)
    parts = [(next(hits) if hit else next(computed)).to(dtype) for hit in cached.tolist()]
    return merge_rows(visual, torch.cat(parts, dim=0))


def tower_digest(visual: nn.Module) -> str:
    """sha256 of the tower's weights as they compute the rows (bytes, dtype, shape; `merger.*` left out: it runs
    after the rows). Two towers with equal digests give equal rows for equal inputs and kernels: this catches
    what settings cannot, e.g. random init on another device kind (CPU and CUDA random streams differ)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(visual.state_dict().items()):
        if name.startswith("merger."):
            continue
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_tower(model_cfg: Mapping[str, Any], device: torch.device | str | None) -> nn.Module:
    """The frozen vision tower exactly as training builds it (vlnflow.model.loading.build_model: same weights,
    dtype, device kind, vision_fast / compile settings), without the LLM; in eval mode, no grad."""
    from vlnflow.model.loading import attention_kernel, compute_dtype, load_qwen, vision_compile
    from vlnflow.model.vision_fast import apply_vision_fast

    dtype = compute_dtype(model_cfg, device)
    kernel = attention_kernel(model_cfg, device, dtype)
    qwen = load_qwen(model_cfg, dtype, device)
    visual = qwen.model.visual
    del qwen
    if model_cfg.get("vision_fast", True):
        apply_vision_fast(visual, attention=kernel, compile=vision_compile(model_cfg, device))
    return visual.requires_grad_(False).eval()
