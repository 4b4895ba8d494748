"""JanusVLN's layout: what `Qwen2_5_VLForConditionalGenerationForJanusVLN.from_pretrained` reads.

Facts from JanusVLN's src/qwen_vl/model/modeling_qwen2_5_vl.py and
configuration_qwen2_5_vl.py (MIV-XJTU/JanusVLN, transformers 4.50):
- the model's attributes are `visual` (Qwen's vision tower), `model` (the language model),
  `lm_head`, `merger` (`VGGTMerger`: `ln_q`, `mlp.0`, `mlp.2`) and `vggt` (VGGT with its
  camera and track heads removed; only `vggt.aggregator` is run), so tensors are
  `visual.*`, `model.*`, `lm_head.*`, `merger.*`, `vggt.aggregator.*`;
- the config is transformers 4.50's flat Qwen2.5-VL config (text fields at the top level,
  `rope_theta`, `rope_scaling: {type: mrope, mrope_section}`, a nested `vision_config`)
  plus `vggt_merger_hidden_dim`, `reference_frame` and `lam`.
The point/depth heads JanusVLN's VGGT also builds are never run, and VGGT-1B weights
files are not required to have them: they are left out (JanusVLN inits them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlnflow.export.names import VGGT_PREFIX

ARCHITECTURE = "Qwen2_5_VLForConditionalGenerationForJanusVLN"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# transformers 5 text-config fields that transformers 4.50's flat config does not have
_NEW_TEXT_FIELDS = ("layer_types", "model_type", "rope_parameters", "dtype", "architectures")


def flat_config(qwen_config, extras: dict, dtype: torch.dtype) -> dict:
    """transformers 4.50's flat Qwen2.5-VL config dict (what JanusVLN's AutoConfig reads) + `extras`."""
    full = qwen_config.to_dict()
    text = dict(full.pop("text_config"))
    vision = dict(full.pop("vision_config"))
    rope = dict(text.get("rope_parameters") or {})
    out = {k: v for k, v in text.items() if k not in _NEW_TEXT_FIELDS}
    out.update({k: v for k, v in full.items() if k not in ("dtype", "transformers_version", "architectures")})
    out["rope_theta"] = rope.get("rope_theta", 1e6)
    out["rope_scaling"] = {"type": "mrope", "rope_type": "default", "mrope_section": list(rope.get("mrope_section", []))}
    out["hidden_size"] = text["hidden_size"]
    vision.pop("rope_parameters", None)
    vision.pop("dtype", None)
    vision["model_type"] = "qwen2_5_vl"
    out["vision_config"] = vision
    out["model_type"] = "qwen2_5_vl"
    out["architectures"] = [ARCHITECTURE]
    out["torch_dtype"] = _DTYPE_NAMES[dtype]
    out.update(extras)
    return out


def write_config(qwen_config, extras: dict, dtype: torch.dtype, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(flat_config(qwen_config, extras, dtype), indent=2, sort_keys=True) + "\n")


def vggt_tensors(spatial_cfg: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`vggt.aggregator.*` from spatial.weights, or the seeded random init the run used (same values as SpatialEncoder)."""
    from vlnflow.spatial.aggregator import PRESETS
    from vlnflow.spatial.checkpoint import find_weights_file, load_aggregator_weights
    from vlnflow.spatial.init import build_aggregator, init_random_

    model = build_aggregator(PRESETS[spatial_cfg.get("preset", "tiny")])
    if spatial_cfg.get("weights"):
        load_aggregator_weights(model, find_weights_file(Path(spatial_cfg["weights"]).expanduser()))
    else:
        init_random_(model, int(spatial_cfg.get("seed", 0)))
    return {VGGT_PREFIX + k: v.detach().to(dtype) for k, v in model.state_dict().items()}


def fix_processor_config(out: Path) -> None:
    """transformers 4.50 knows `Qwen2VLImageProcessor` (not the Pil variant vlnflow builds) and needs the processor class."""
    path = out / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["image_processor_type"] = "Qwen2VLImageProcessor"
    data["processor_class"] = "Qwen2_5_VLProcessor"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
