"""Build the training model and its tokenizer/image processor from the `model:` config section.

`model.qwen_path` set: Qwen2.5-VL weights, tokenizer and processor from that local
directory (never the network). Unset: random init, `model.preset` tiny (demo, tests)
or qwen2.5-vl-7b (the real shape, for GPU benchmarks), with the tokenizer built by code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlnflow.config import ConfigError
from vlnflow.model.janus import JanusModel
from vlnflow.model.packed_attention import use_packed_attention
from vlnflow.model.spatial_merger import SpatialMerger
from vlnflow.model.tiny import (
    build_image_processor,
    build_tiny_tokenizer,
    qwen7b_config,
    random_qwen,
    special_token_ids,
    tiny_config,
)
from vlnflow.model.vision_fast import apply_vision_fast

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `model` section with `image_size` filled from `spatial.image_size` when null."""
    model_cfg = dict(config["model"])
    if model_cfg.get("image_size") is None:
        model_cfg["image_size"] = int(config["spatial"]["image_size"])
    return model_cfg


def compute_dtype(model_cfg: Mapping[str, Any], device: torch.device | str | None) -> torch.dtype:
    """`model.dtype` on GPU; float32 on CPU (bf16 matmuls on CPU are slow and fp16 is unsupported)."""
    if device is None or torch.device(device).type == "cpu":
        return torch.float32
    return DTYPES[model_cfg.get("dtype", "bfloat16")]


def load_processors(model_cfg: Mapping[str, Any]):
    """(tokenizer, image processor pinned to model.image_size) for the configured Qwen."""
    path = _qwen_dir(model_cfg)
    if path is None:
        tokenizer = build_tiny_tokenizer(_tiny_sizes(model_cfg)["vocab_size"])
        return tokenizer, build_image_processor(int(model_cfg["image_size"]))
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return tokenizer, build_image_processor(int(model_cfg["image_size"]), base=base)


def load_qwen(model_cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32, device=None):
    """Qwen2_5_VLForConditionalGeneration with sdpa attention, from qwen_path or random per preset."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = _qwen_dir(model_cfg)
    if path is not None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
    else:
        tokenizer = build_tiny_tokenizer(_tiny_sizes(model_cfg)["vocab_size"])
        if model_cfg.get("preset", "tiny") == "qwen2.5-vl-7b":
            config = qwen7b_config(special_token_ids(tokenizer))
        else:
            config = tiny_config(tokenizer, _tiny_sizes(model_cfg))
        with torch.device(device or "cpu"):
            model = random_qwen(config, int(model_cfg.get("seed", 0)), dtype)
    return model.to(device) if device is not None else model


def build_model(
    model_cfg: Mapping[str, Any],
    spatial_channels: int,
    grid: tuple[int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> JanusModel:
    """The composed JanusVLN-style model for spatial maps of `grid` (gh, gw) x `spatial_channels`."""
    dtype = dtype or compute_dtype(model_cfg, device)
    qwen = load_qwen(model_cfg, dtype, device)
    if model_cfg.get("vision_fast", True):
        apply_vision_fast(qwen.model.visual)
    if model_cfg.get("llm_attention", "varlen") == "varlen":
        use_packed_attention(qwen)
    merger = _build_merger(model_cfg, spatial_channels, qwen.config.text_config.hidden_size)
    merger.to(device=device or "cpu", dtype=dtype)
    return JanusModel(
        qwen,
        merger,
        grid,
        lam=float(model_cfg.get("lam", 0.2)),
        freeze_vision=bool(model_cfg.get("freeze_vision", True)),
        train_visual_merger=bool(model_cfg.get("train_visual_merger", False)),
    )


def _build_merger(model_cfg: Mapping[str, Any], channels: int, out_dim: int) -> SpatialMerger:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(model_cfg.get("seed", 0)) + 1)
        merger = SpatialMerger(channels, int(model_cfg.get("merger_hidden", 4096)), out_dim)
    weights = model_cfg.get("merger_weights")
    if weights:
        from safetensors.torch import load_file

        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"config setting 'model.merger_weights': file not found: {path}")
        state = {k.removeprefix("merger."): v for k, v in load_file(str(path)).items() if not k.startswith("vggt.")}
        state = {k: v for k, v in state.items() if k.startswith(("ln_q.", "mlp."))}
        try:
            merger.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"config setting 'model.merger_weights': {path} does not fit the merger: {exc}") from exc
    return merger


def _qwen_dir(model_cfg: Mapping[str, Any]) -> Path | None:
    path = model_cfg.get("qwen_path")
    if not path:
        return None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"config setting 'model.qwen_path': no Qwen2.5-VL checkpoint (config.json) in {path}")
    return path


def _tiny_sizes(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    from vlnflow.model.tiny import TINY_DEFAULTS

    return {**TINY_DEFAULTS, **(model_cfg.get("tiny") or {})}
