"""JanusVLN's model composed on transformers' Qwen2.5-VL: semantic image tokens from Qwen's
own vision tower plus lam * merger(VGGT spatial features) of the SAME sample.

The forward takes a packed batch (`batching.Collator`). Each sample's merged spatial
map (one token per Qwen image token of a frame) is added to every frame of that
sample only; the reference tiles one map over the whole batch, which pairs samples
wrongly at batch > 1. The fused image embeddings are scattered into inputs_embeds,
and the 3-D mRoPE positions come from `model.model.get_rope_index` per sample
(passing inputs_embeds without them silently gives wrong positions). The loss runs
lm_head only at label positions, in fp32: no [T, vocab] logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from vlnflow.model.packed_attention import PACKED_ATTENTION
from vlnflow.model.spatial_merger import SpatialMerger


class JanusModel(nn.Module):
    """Qwen2.5-VL + SpatialMerger; `forward(batch) -> loss` (mean CE over the batch's label tokens)."""

    def __init__(
        self,
        qwen: nn.Module,
        merger: SpatialMerger,
        spatial_grid: tuple[int, int],
        lam: float = 0.2,
        freeze_vision: bool = True,
        train_visual_merger: bool = False,
    ):
        super().__init__()
        self.qwen = qwen
        self.merger = merger
        self.spatial_grid = (int(spatial_grid[0]), int(spatial_grid[1]))
        self.lam = float(lam)
        self.freeze_vision = freeze_vision
        if freeze_vision:
            self.visual.requires_grad_(False)
            self.visual.eval()
            if train_visual_merger:  # JanusVLN's --tune_mm_mlp: the blocks frozen, Qwen's patch merger trained
                self.visual.merger.requires_grad_(True)
        self.vision_grad = any(p.requires_grad for p in self.visual.parameters())

    @property
    def visual(self) -> nn.Module:
        return self.qwen.model.visual

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:
            self.visual.eval()
        return self

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Recompute the LLM decoder layers in backward (the frozen tower runs without grad anyway)."""
        enable = getattr(self.qwen, "activation_checkpointing_enable", None) or self.qwen.gradient_checkpointing_enable
        enable(**kwargs)

    # ---- pieces -------------------------------------------------------------------------
    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[image tokens, hidden] from Qwen's vision tower, images in batch order."""
        kwargs = vision_kwargs(image_grid_thw, self.visual.config, pixel_values.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_grad):
            out = self.qwen.model.get_image_features(pixel_values, image_grid_thw, **kwargs)
        return torch.cat(out.pooler_output, dim=0)

    def spatial_embeddings(self, spatial_features: torch.Tensor, image_grid_thw: torch.Tensor,
                           image_sample_index: torch.Tensor) -> torch.Tensor:
        """merger(features of sample i) for every image token of sample i: [image tokens, hidden]."""
        per_map = self.merger.tokens_per_map(self.spatial_grid)
        merge = self.visual.spatial_merge_size
        per_image = (image_grid_thw.prod(-1) // (merge * merge)).tolist()
        if any(n != per_map for n in per_image):
            raise ValueError(
                f"Qwen image grids {image_grid_thw.tolist()} give {sorted(set(per_image))} tokens per frame, but the "
                f"spatial feature grid {self.spatial_grid} gives {per_map}: model.image_size must match spatial.image_size"
            )
        merged = self.merger(spatial_features, self.spatial_grid)  # [B, per_map, hidden]
        sample = image_sample_index.to(merged.device).repeat_interleave(per_map)
        token = torch.arange(per_map, device=merged.device).repeat(len(per_image))
        return merged[sample, token]

    def position_ids(self, batch: dict) -> torch.Tensor:
        """[4, 1, T]: row 0 restarts at every sample (packing boundaries), rows 1-3 are each sample's mRoPE."""
        ids = batch["input_ids"][0].cpu()
        types = batch["mm_token_type_ids"][0].cpu()
        grid = batch["image_grid_thw"].cpu()
        owner = batch["image_sample_index"].cpu()
        cu = batch["cu_seqlens"].tolist()
        text, mrope = [], []
        for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
            positions, _ = self.qwen.model.get_rope_index(
                ids[None, start:end], mm_token_type_ids=types[None, start:end], image_grid_thw=grid[owner == i]
            )
            mrope.append(positions)
            text.append(torch.arange(end - start))
        rows = torch.cat([torch.cat(text)[None, None], torch.cat(mrope, dim=2)], dim=0)
        return rows.to(batch["input_ids"].device)

    def inputs_embeds(self, batch: dict) -> torch.Tensor:
        """Token embeddings with (Qwen image embedding + lam * spatial) scattered onto the image tokens."""
        input_ids = batch["input_ids"]
        embeds = self.qwen.get_input_embeddings()(input_ids)
        image = self.image_embeddings(batch["pixel_values"], batch["image_grid_thw"])
        if self.lam:
            spatial = self.spatial_embeddings(
                batch["spatial_features"], batch["image_grid_thw"], batch["image_sample_index"]
            )
            image = image + self.lam * spatial.to(image.dtype)
        mask = input_ids == self.qwen.config.image_token_id
        if int(mask.sum()) != image.shape[0]:
            raise ValueError(
                f"batch {batch.get('sample_ids')}: {int(mask.sum())} image tokens but {image.shape[0]} image embeddings"
            )
        return embeds.masked_scatter(mask[..., None], image.to(embeds.dtype))

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """Final-norm LLM hidden states [1, T, hidden] of the packed batch."""
        attn_kwargs = {}
        if self.qwen.config.text_config._attn_implementation == PACKED_ATTENTION:
            cu = batch["cu_seqlens"].to(batch["input_ids"].device)
            max_len = int(batch.get("max_seqlen") or (cu[1:] - cu[:-1]).max())
            attn_kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
        out = self.qwen.model.language_model(
            inputs_embeds=self.inputs_embeds(batch),
            position_ids=self.position_ids(batch),
            attention_mask=None,
            use_cache=False,
            **attn_kwargs,
        )
        return out.last_hidden_state

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.hidden_states(batch)
        positions = batch["label_positions"].to(hidden.device)
        logits = self.qwen.lm_head(hidden[0, positions - 1]).float()
        return F.cross_entropy(logits, batch["labels"][0, positions].to(hidden.device))


def vision_kwargs(image_grid_thw: torch.Tensor, vision_config, device: torch.device) -> dict:
    """Vision-tower metadata (windows, cu_seqlens, max lengths, rotary positions) computed once on CPU.

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
