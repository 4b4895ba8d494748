"""The per-frame vision cache's settings and fingerprint (what its rows depend on), cheap enough for parse time.

The vision cache (Qwen2.5-VL's tower output before `visual.merger`, one map per frame) lives next to the VGGT
cache in files of its own (results/cache/vision/), with its own fingerprint, so a change of the Qwen weights
never invalidates VGGT rows and a change of the VGGT settings never invalidates vision rows.

Fingerprint fields: the tower weights (a content digest of the checkpoint's `visual.*` tensors except the
merger, remembered by file stat like the VGGT digest, or `random:<preset>:seed=<seed>` plus the tiny sizes for
random init), the vision config, the image processor's normalisation, the frame geometry (crop / pad, sizes),
the configured compute dtype (model.dtype) and a code version. The kernels (attention, compiled blocks) are not
in it: same math. A tower digest of the weights as built (vlnflow.model.vision_rows.tower_digest) is checked at
run time besides: random init draws different numbers on CPU and CUDA.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlnflow.config import ConfigError
from vlnflow.spatial.fingerprint import _digest_cache, _stat_key, fingerprint_of
from vlnflow.spatial.geometry import geometry_of

CODE_VERSION = "1"  # bump when a code change alters the rows computed from the same settings
ROOT = "results/cache/vision"
MANIFEST = f"{ROOT}/manifest.json"
VALIDATION = f"{ROOT}/validation.json"

VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size", "spatial_merge_size",
               "temporal_patch_size", "window_size", "fullatt_block_indexes", "hidden_act")
PROCESSOR_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "patch_size",
                  "temporal_patch_size", "merge_size", "do_convert_rgb")
_VISUAL = re.compile(r"^(?:model\.)?visual\.(?!merger\.)")


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether precompute_all builds and training reads the vision cache: cache.vision. Independent of the VGGT
    cache (train.cache: null, or the train_live comparison run, computes VGGT live and still reads the rows)."""
    return bool(config["cache"].get("vision"))


def config_problem(config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(setting, message) for vision-cache settings that exclude each other, or None."""
    if not config["cache"].get("vision"):
        return None
    if config["train"].get("vision_cache") is None:
        return "train.vision_cache", "is null but cache.vision is true: give the manifest path (results/cache/vision/manifest.json)"
    if not config["model"].get("freeze_vision", True):
        return "cache.vision", ("is true but model.freeze_vision is false: the cache holds the frozen tower's output, "
                                "a trained tower changes it every step")
    if config["train"]["lr"].get("vision", 0.0) > 0:
        return "cache.vision", ("is true but train.lr.vision > 0 trains the vision blocks: the cache holds the frozen "
                                "tower's output; set train.lr.vision: 0 or cache.vision: false")
    return None


def check_trainable(model_cfg: Mapping[str, Any], lr_vision: float) -> None:
    """ConfigError when the vision blocks train (the cached rows would be stale after one step)."""
    if not model_cfg.get("freeze_vision", True) or lr_vision > 0:
        raise ConfigError("config setting 'cache.vision': the vision cache cannot be used while the vision blocks train "
                          f"(model.freeze_vision {model_cfg.get('freeze_vision', True)}, train.lr.vision {lr_vision})")


# ---- the weights ----------------------------------------------------------------------------------


def _weight_dir(model_cfg: Mapping[str, Any]) -> Path | None:
    path = model_cfg.get("init_from") or model_cfg.get("qwen_path")
    return Path(path) if path else None


def _weight_files(directory: Path) -> dict[str, str]:
    from vlnflow.model.model_dir import weight_files

    return weight_files(directory)


def visual_digest(directory: str | Path) -> str:
    """sha256 over the stored `visual.*` tensors (merger excluded; `model.` prefix dropped) of a checkpoint
    directory; remembered by the (path, size, mtime) of the files that hold them."""
    import torch

    from vlnflow.model.model_dir import iter_tensors

    directory = Path(directory)
    weight_map = {k: v for k, v in _weight_files(directory).items() if _VISUAL.match(k)}
    if not weight_map:
        raise ConfigError(f"config setting 'model.qwen_path' / 'model.init_from': no visual.* tensors in {directory}")
    files = sorted(set(weight_map.values()))
    key = "qwen-visual|" + "|".join(_stat_key(directory / f) for f in files)
    cache = _digest_cache()
    try:
        known = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    tensors = dict(iter_tensors(directory, weight_map))
    for name in sorted(tensors, key=lambda n: n.removeprefix("model.")):
        t = tensors[name].contiguous()
        digest.update(f"{name.removeprefix('model.')}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    value = digest.hexdigest()
    _remember(cache, key, value)
    return value


def _remember(cache: Path, key: str, value: str) -> None:
    try:
        known = json.loads(cache.read_text()) if cache.exists() else {}
        known[key] = value
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    except (OSError, ValueError):
        pass  # a read-only home only costs a recomputation next time


def weights_id(model_cfg: Mapping[str, Any]) -> str:
    directory = _weight_dir(model_cfg)
    if directory is not None:
        return "sha256:" + visual_digest(directory)
    preset = model_cfg.get("preset", "tiny")
    wid = f"random:{preset}:seed={int(model_cfg.get('seed', 0))}"
    if preset == "tiny":
        from vlnflow.model.tiny import TINY_DEFAULTS

        sizes = {**TINY_DEFAULTS, **(model_cfg.get("tiny") or {})}
        wid += ":" + json.dumps(sizes, sort_keys=True, separators=(",", ":"))
    return wid


# ---- config and processor ---------------------------------------------------------------------------


def vision_config(model_cfg: Mapping[str, Any]) -> dict:
    """The tower's architecture settings (VISION_KEYS) from the checkpoint's config.json or the random preset."""
    directory = _weight_dir(model_cfg)
    if directory is not None:
        file = directory / "config.json"
        if not file.is_file():
            raise ConfigError(f"config setting 'model.qwen_path' / 'model.init_from': no config.json in {directory}")
        raw = json.loads(file.read_text()).get("vision_config") or {}
    else:
        from vlnflow.model.loading import qwen_config

        raw = qwen_config(model_cfg).vision_config.to_dict()
    return {k: raw.get(k) for k in VISION_KEYS}


def processor_fields(model_cfg: Mapping[str, Any], geometry) -> dict:
    """What the pinned image processor does to pixels besides the size (which the geometry fixes)."""
    from vlnflow.model.tiny import build_image_processor

    directory = _weight_dir(model_cfg)
    base = None
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        base = Qwen2VLImageProcessorPil.from_pretrained(directory, local_files_only=True)
    raw = build_image_processor(geometry.qwen_hw, base=base).to_dict()
    return {k: raw.get(k) for k in PROCESSOR_KEYS}


def fingerprint_fields(config: Mapping[str, Any]) -> dict:
    """Everything that determines the cached rows (see the module docstring)."""
    model_cfg = config["model"]
    geometry = geometry_of(config["spatial"], model_cfg)
    return {
        "code_version": CODE_VERSION,
        "rows": "qwen2.5-vl vision tower, last block output before visual.merger, spatial merge-unit order",
        "weights": weights_id(model_cfg),
        "vision_config": vision_config(model_cfg),
        "image_processor": processor_fields(model_cfg, geometry),
        "preprocess": geometry.fingerprint_fields(),
        "compute_dtype": model_cfg.get("dtype", "bfloat16"),
    }


def vision_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of `fingerprint_fields`: equal settings and weights give the same string in any process."""
    return fingerprint_of(fingerprint_fields(config))


def row_shape(config: Mapping[str, Any]) -> tuple[tuple[int, int], int]:
    """((grid_h, grid_w), channels) of one frame's rows: the geometry's kept grid (crop 34x46, pad 46x46 for
    640x480 frames at 644) and the tower width (1280 for Qwen2.5-VL-7B)."""
    geometry = geometry_of(config["spatial"], config["model"])
    return geometry.kept_grid, int(vision_config(config["model"])["hidden_size"])


class LazyFingerprint:
    """Snakemake params function: the fingerprint computed on first use only (a dry run of other targets never
    reads the Qwen weights), once per process."""

    def __init__(self, config: Mapping[str, Any]):
        self.config, self.value = config, None

    def __call__(self, wildcards=None) -> str:
        if self.value is None:
            self.value = vision_fingerprint(self.config)
        return self.value
