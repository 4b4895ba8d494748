"""Training-module names -> on-disk names, and the vision MLP padding of vision_fast sliced back off."""

from __future__ import annotations

import pytest
import torch

from vlnflow.export.names import qwen_to_disk, to_disk, unpad_vision_mlp
from vlnflow.model.tiny import build_tiny_tokenizer, random_qwen, tiny_config
from vlnflow.model.vision_fast import apply_vision_fast


def test_module_names_map_to_transformers_checkpoint_names():
    assert to_disk("qwen.model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert to_disk("qwen.model.visual.blocks.1.attn.qkv.bias") == "visual.blocks.1.attn.qkv.bias"
    assert to_disk("qwen.lm_head.weight") == "lm_head.weight"
    assert to_disk("merger.mlp.0.weight") == "merger.mlp.0.weight"
    with pytest.raises(KeyError, match="vggt.x"):
        to_disk("vggt.x")


def test_a_padded_vision_tower_is_stored_with_its_checkpoint_shapes(tmp_path):
    """vision_fast pads the tiny tower's 60-wide MLP to 64; unpadding gives back the transformers model's tensors."""
    config = tiny_config(build_tiny_tokenizer())
    plain = random_qwen(config, seed=3).state_dict()
    padded_model = random_qwen(config, seed=3)
    apply_vision_fast(padded_model.model.visual)
    padded = padded_model.state_dict()
    width = config.vision_config.intermediate_size
    changed = 0
    for name, tensor in padded.items():
        disk = qwen_to_disk(name)
        out = unpad_vision_mlp(disk, tensor, width)
        assert torch.equal(out, plain[name]), name
        changed += out.shape != tensor.shape
    assert changed == 5 * config.vision_config.depth  # per block: gate and up weight + bias, down weight
