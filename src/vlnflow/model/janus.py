"""JanusVLN's model composed on transformers' Qwen2.5-VL: semantic image tokens from Qwen's
own vision tower plus lam * merger(VGGT spatial features) of the SAME sample.

The forward takes a packed batch (`batching.Collator`). Each sample's merged spatial
map (one token per Qwen image token of a frame) is added to every frame of that
sample only; the reference tiles one map over the whole batch, which pairs samples
wrongly at batch > 1. The fused image embeddings are scattered into inputs_embeds,
and the 3-D mRoPE positions come from `model.model.get_rope_index` per sample
(passing inputs_embeds without them silently gives wrong positions). The loss runs
lm_head only at label positions, in fp32: no [T, vocab] logits.

The objective (vlnflow.model.objective) weights the label tokens by answer segment and, with
`action_head` (the seed pipeline's parallel head), adds its cross-entropy on the hidden state
just before each sample's first label token (`head_positions`, set per packed sample by the
Collator; the last prompt token at inference).
"""

from __future__ import annotations

import torch
from torch import nn
from vlnflow.model.host_prep import packed_position_ids, vision_kwargs
from vlnflow.model.objective import Objective, objective_loss
from vlnflow.model.packed_attention import is_packed
from vlnflow.model.spatial_merger import SpatialMerger


class JanusModel(nn.Module):
    """Qwen2.5-VL + SpatialMerger (+ the seed's action head); `forward(batch) -> loss` (vlnflow.model.objective:
    the mean CE over the batch's label tokens when every segment weighs 1 and there is no head)."""

    def __init__(
        self,
        qwen: nn.Module,
        merger: SpatialMerger,
        spatial_grid: tuple[int, int],
        lam: float = 0.2,
        freeze_vision: bool = True,
        train_visual_merger: bool = False,
        action_head: nn.Module | None = None,
        objective: Objective | None = None,
    ):
        super().__init__()
        self.qwen = qwen
        self.merger = merger
        self.action_head = action_head  # always trained when present (the seed's set_model)
        self.objective = objective or Objective()
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

    def checkpoint_layers(self, indices) -> None:
        """Selective checkpointing: recompute only the LLM decoder layers in `indices` (None or empty: none).

        transformers' per-layer flag `gradient_checkpointing` is set after enabling it for all, so a
        plan from vlnflow.train.memory_plan applies whatever `every_n_layers` this transformers has.
        """
        chosen = set(indices or ())
        layers = self.qwen.model.language_model.layers
        if not chosen:
            return
        if not chosen <= set(range(len(layers))):
            raise ValueError(f"checkpoint layers {sorted(chosen)} outside the {len(layers)} decoder layers")
        options = {"use_reentrant": False}
        if hasattr(self.qwen, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.qwen.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            self.qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i in chosen

    # ---- pieces -------------------------------------------------------------------------
    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, vision: dict | None = None) -> torch.Tensor:
        """[image tokens, hidden] from Qwen's vision tower, images in batch order.

        `vision`: the tower's metadata precomputed by host_prep (else computed here, on CPU).
        """
        kwargs = vision if vision is not None else vision_kwargs(image_grid_thw, self.visual.config, pixel_values.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_grad):
            out = self.qwen.model.get_image_features(pixel_values, image_grid_thw, **kwargs)
        return torch.cat(out.pooler_output, dim=0)

    def spatial_embeddings(self, spatial_features: torch.Tensor, image_grid_thw: torch.Tensor,
                           image_sample_index: torch.Tensor, spatial_index: tuple | None = None) -> torch.Tensor:
        """merger(features of sample i) for every image token of sample i: [image tokens, hidden].

        `spatial_index`: the (sample, token) gather index precomputed by host_prep (else built here).
        """
        per_map = self.merger.tokens_per_map(self.spatial_grid)
        merge = self.visual.spatial_merge_size
        per_image = (image_grid_thw.prod(-1) // (merge * merge)).tolist()
        if any(n != per_map for n in per_image):
            raise ValueError(
                f"Qwen image grids {image_grid_thw.tolist()} give {sorted(set(per_image))} tokens per frame, but the "
                f"spatial feature grid {self.spatial_grid} gives {per_map}: both must come from the run's frame geometry "
                f"(vlnflow.spatial.geometry; the cache, the export and spatial.preprocess / image_size must agree)"
            )
        merged = self.merger(spatial_features, self.spatial_grid)  # [B, per_map, hidden]
        if spatial_index is None:
            sample = image_sample_index.to(merged.device).repeat_interleave(per_map)
            token = torch.arange(per_map, device=merged.device).repeat(len(per_image))
        else:
            sample, token = (i.to(merged.device) for i in spatial_index)
        return merged[sample, token]

    def position_ids(self, batch: dict) -> torch.Tensor:
        """[4, 1, T]: row 0 restarts at every sample (packing boundaries), rows 1-3 are each sample's mRoPE.

        Taken from the batch when host_prep computed them in a worker (no host work, no device read).
        """
        if batch.get("position_ids") is not None:
            return batch["position_ids"].to(batch["input_ids"].device)
        return packed_position_ids(self.qwen.model.get_rope_index, batch).to(batch["input_ids"].device)

    def inputs_embeds(self, batch: dict) -> torch.Tensor:
        """Token embeddings with (Qwen image embedding + lam * spatial) scattered onto the image tokens."""
        input_ids = batch["input_ids"]
        embeds = self.qwen.get_input_embeddings()(input_ids)
        image = self.image_embeddings(batch["pixel_values"], batch["image_grid_thw"], batch.get("vision"))
        if self.lam:
            spatial = self.spatial_embeddings(
                batch["spatial_features"], batch["image_grid_thw"], batch["image_sample_index"], batch.get("spatial_index")
            )
            image = image + self.lam * spatial.to(image.dtype)
        positions = batch.get("image_positions")
        if positions is None:  # not precomputed: find them (reads the mask back when on the GPU)
            mask = input_ids == self.qwen.config.image_token_id
            count = int(mask.sum())
        else:
            count = int(batch["image_tokens"])
        if count != image.shape[0]:
            raise ValueError(f"batch {batch.get('sample_ids')}: {count} image tokens but {image.shape[0]} image embeddings")
        if positions is None:
            return embeds.masked_scatter(mask[..., None], image.to(embeds.dtype))
        # index_put: neither it nor its backward reads a count back from the device (masked_scatter's does)
        return embeds.index_put((torch.zeros_like(positions), positions.to(embeds.device)), image.to(embeds.dtype))

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """Final-norm LLM hidden states [1, T, hidden] of the packed batch."""
        attn_kwargs = {}
        if is_packed(self.qwen.config.text_config._attn_implementation):
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

    def action_logits(self, batch: dict, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 4] head logits (STOP, MOVE_FORWARD, TURN_LEFT, TURN_RIGHT) at each sample's `head_positions`."""
        if self.action_head is None:
            raise ValueError("this model has no action head (model.action_head.enabled is false)")
        if hidden is None:
            hidden = self.hidden_states(batch)
        return self.action_head(hidden[0, batch["head_positions"].to(hidden.device)])

    def forward(self, batch: dict, terms: bool = False):
        """The micro-batch's loss; with `terms`, (loss, detached vlnflow.model.objective.TERMS tensor).

        `batch["optimizer_step"]` (finished optimizer steps, set by the trainer) drives the head's weight ramp.
        """
        hidden = self.hidden_states(batch)
        positions = batch["label_positions"].to(hidden.device)
        logits = self.qwen.lm_head(hidden[0, positions - 1]).float()
        targets = batch["labels"][0, positions].to(hidden.device)
        segments = batch.get("label_segments")
        head_logits = actions = None
        if self.action_head is not None:
            head_logits = self.action_logits(batch, hidden)
            actions = batch["action_labels"].to(hidden.device)
        loss, parts = objective_loss(
            self.objective, logits, targets, None if segments is None else segments.to(hidden.device),
            head_logits, actions, int(batch.get("optimizer_step", 0)), want_terms=terms,
        )
        return (loss, parts) if terms else loss
