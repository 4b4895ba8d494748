"""The Hugging Face layout: transformers 5's Qwen2.5-VL config.json plus vlnflow's settings.

`Qwen2_5_VLForConditionalGeneration.from_pretrained(OUT)` reads it as a plain
Qwen2.5-VL (the `merger.*` tensors are its only unexpected keys), and vlnflow reads
the extra fields back: `lam`, `reference_frame`, `vggt_merger_hidden_dim` (JanusVLN's
names) and `vlnflow` (the model settings, spatial settings and encoder fingerprint).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def hf_config(qwen_config, extras: dict, dtype: torch.dtype):
    """A copy of the Qwen2_5_VLConfig with `extras` as top-level fields (written as config.json)."""
    config = copy.deepcopy(qwen_config)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    for key, value in extras.items():
        setattr(config, key, value)
    config.dtype = dtype
    return config


def write_config(qwen_config, extras: dict, dtype: torch.dtype, out: Path) -> None:
    hf_config(qwen_config, extras, dtype).save_pretrained(str(out))
