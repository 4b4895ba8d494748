"""Parameter names of the training module (`JanusModel`) and the names an export stores them under.

Qwen's weights are stored the way transformers writes Qwen2.5-VL checkpoints (and the
released Qwen2.5-VL / JanusVLN checkpoints have them): `model.*` for the language model,
`visual.*` for the vision tower, `lm_head.*`. The VGGT merger is `merger.*`, the name of
JanusVLN's `VGGTMerger` attribute, and the seed pipeline's action head `action_head.*` (its
`nn.Sequential` indices 0, 1, 3), so both layouts use them.
"""

from __future__ import annotations

import torch

from vlnflow.model.model_dir import ACTION_HEAD_PREFIX, MERGER_PREFIX, VGGT_PREFIX

# (prefix inside JanusModel, prefix on disk); the order matters: the first match wins.
_PREFIXES = (
    ("qwen.model.language_model.", "model."),
    ("qwen.model.visual.", "visual."),
    ("qwen.lm_head.", "lm_head."),
    ("merger.", MERGER_PREFIX),
    ("action_head.", ACTION_HEAD_PREFIX),
)


def to_disk(name: str) -> str:
    """`qwen.model.language_model.layers.0...` -> `model.layers.0...`; `merger.mlp.0.weight` unchanged."""
    for inside, disk in _PREFIXES:
        if name.startswith(inside):
            return disk + name[len(inside) :]
    raise KeyError(f"parameter {name!r} is not part of the Qwen model, the merger or the action head")


def qwen_to_disk(name: str) -> str:
    """A name of Qwen2_5_VLForConditionalGeneration's own state dict -> its name on disk."""
    return to_disk("qwen." + name)


def unpad_vision_mlp(name: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Slice the zero padding `vision_fast` adds to the vision MLP back off (`width` = config intermediate size).

    vision_fast pads gate/up rows and down columns to a multiple of 64; a trained tower
    in a checkpoint carries them, an export must have the checkpoint's real shapes.
    """
    if not name.startswith("visual.blocks.") or ".mlp." not in name:
        return tensor
    if name.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")) and tensor.shape[0] > width:
        return tensor[:width].contiguous()
    if name.endswith("down_proj.weight") and tensor.shape[1] > width:
        return tensor[:, :width].contiguous()
    return tensor
