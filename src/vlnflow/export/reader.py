"""Read a model directory back: a vlnflow export (either layout) or a JanusVLN checkpoint.

Used by `model.init_from` (vlnflow.model.loading) and `vlnflow predict`. Every shard is
checked first (exists, opens, holds what the index lists, matches its recorded sha256),
so a corrupt or truncated file is an error naming it, never a half-loaded model. Qwen's
part is loaded by transformers' own `from_pretrained` (it reads both config formats and
the legacy tensor names); `merger.*` becomes the VGGT merger, `vggt.aggregator.*` (when
present) the spatial encoder's weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlnflow.export.names import MERGER_PREFIX, VGGT_PREFIX
from vlnflow.export.shards import INDEX, ExportError, check_shards, iter_tensors

log = logging.getLogger(__name__)

QWEN_PREFIXES = ("model.", "visual.", "lm_head.")


@dataclass
class ModelDir:
    """A checked model directory: its config.json and tensor -> shard map."""

    path: Path
    config: dict
    weight_map: dict[str, str]

    @property
    def settings(self) -> dict | None:
        """The `vlnflow` section of a vlnflow export; None for a JanusVLN checkpoint."""
        return self.config.get("vlnflow")

    @property
    def layout(self) -> str:
        return (self.settings or {}).get("layout", "janusvln-checkpoint")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Stored tensors under `prefix`, with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in iter_tensors(self.path, self.weight_map, prefix)}

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.weight_map)


_OPENED: dict[tuple, ModelDir] = {}


def open_model_dir(path: str | Path, verify_digests: bool = True) -> ModelDir:
    """Check and describe a model directory; a directory already checked (same files, same mtimes) is not re-hashed."""
    path = Path(path)
    key = (str(path.resolve()), verify_digests, *(_mtime(path / n) for n in ("config.json", INDEX)))
    if key not in _OPENED:
        _OPENED[key] = _open(path, verify_digests)
    return _OPENED[key]


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def _open(path: Path, verify_digests: bool) -> ModelDir:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{path}: no config.json (not an exported model or JanusVLN checkpoint directory)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ExportError(f"{config_file}: not valid JSON ({exc})") from exc
    if config.get("model_type") != "qwen2_5_vl":
        raise ExportError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'qwen2_5_vl'")
    weight_map = check_shards(path, verify_digests)
    model_dir = ModelDir(path, config, weight_map)
    if not model_dir.has(MERGER_PREFIX):
        raise ExportError(f"{path}: no merger.* tensors: a plain Qwen2.5-VL checkpoint belongs in model.qwen_path")
    return model_dir


def load_qwen_from_dir(model_dir: ModelDir, dtype: torch.dtype, device=None):
    """Qwen2_5_VLForConditionalGeneration (sdpa) from the directory; every Qwen tensor must be present."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists merger.* / vggt.* as unexpected: checked below instead
    try:
        placement = {"device_map": {"": str(torch.device(device))}} if device is not None else {}
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir.path, local_files_only=True, dtype=dtype, attn_implementation="sdpa", output_loading_info=True,
            **placement,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("inv_freq")]
    if missing:
        raise ExportError(f"{model_dir.path}: {len(missing)} Qwen2.5-VL tensors missing, e.g. {sorted(missing)[0]!r}")
    foreign = [k for k in info.get("unexpected_keys", []) if not k.startswith((MERGER_PREFIX, "vggt."))]
    if foreign:
        raise ExportError(f"{model_dir.path}: unexpected tensors, e.g. {sorted(foreign)[0]!r}")
    return model


def merger_state(model_dir: ModelDir) -> dict[str, torch.Tensor]:
    """The VGGT merger's `ln_q.*` / `mlp.*` tensors."""
    return model_dir.tensors(MERGER_PREFIX)


def vggt_state(model_dir: ModelDir) -> dict[str, torch.Tensor] | None:
    """The aggregator's tensors (janusvln layout / JanusVLN checkpoints), or None."""
    return model_dir.tensors(VGGT_PREFIX) if model_dir.has(VGGT_PREFIX) else None
