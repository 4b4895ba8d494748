"""Read a model directory: a vlnflow export (either layout) or a JanusVLN checkpoint.

Model loading owns this (`model.init_from`, vlnflow.model.loading; `vlnflow predict`); `vlnflow export` writes
what it reads. Weights are sharded safetensors with transformers' naming, `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json` (`metadata.total_size`, `weight_map`; vlnflow adds each shard's sha256 as
`metadata.vlnflow_sha256`). Every shard is checked first (exists, opens, holds what the index lists, matches its
recorded sha256), so a corrupt or truncated file is an error naming it, never a half-loaded model. Qwen's part is
loaded by transformers' own `from_pretrained` (it reads both config formats and the legacy tensor names);
`merger.*` becomes the VGGT merger, `vggt.aggregator.*` (when present) the spatial encoder's weights,
`action_head.*` (when present) the seed pipeline's action head.
safetensors only: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vlnflow.errors import UserError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MERGER_PREFIX = "merger."  # JanusVLN's VGGTMerger attribute name, in both layouts
VGGT_PREFIX = "vggt.aggregator."
ACTION_HEAD_PREFIX = "action_head."  # the seed pipeline's parallel action head, in both layouts


class ExportError(UserError):
    """A model directory (a vlnflow export, or a checkpoint given to model.init_from) is incomplete or corrupt."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the one model.safetensors)."""
    index = directory / INDEX
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{index}: not a safetensors index ({exc})") from exc
    if (directory / SINGLE).is_file():
        return {name: SINGLE for name in tensor_names(directory / SINGLE)}
    raise ExportError(f"{directory}: no {INDEX} or {SINGLE} (not an exported model directory)")


def tensor_names(file: Path) -> list[str]:
    """The tensor names of one safetensors file; ExportError naming it when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # truncated header, foreign file, ...
        raise ExportError(f"cannot read safetensors shard {file}: {exc}") from exc


def check_shards(directory: Path, verify_digests: bool = True) -> dict[str, str]:
    """Every shard the index names exists, opens, holds its tensors and (when recorded) has its sha256.

    Returns the weight map. The first problem raises ExportError naming the file.
    """
    weight_map = weight_files(directory)
    digests = {}
    if (directory / INDEX).is_file():
        digests = json.loads((directory / INDEX).read_text()).get("metadata", {}).get("vlnflow_sha256", {})
    by_file: dict[str, set[str]] = {}
    for name, filename in weight_map.items():
        by_file.setdefault(filename, set()).add(name)
    for filename in sorted(by_file):
        if not (directory / filename).is_file():
            raise ExportError(f"{directory}: shard {filename} named in {INDEX} is missing")
    if verify_digests:
        recorded = sorted(f for f in by_file if f in digests)
        with ThreadPoolExecutor(max_workers=min(8, len(recorded) or 1)) as pool:  # hashlib releases the GIL
            actual = dict(zip(recorded, pool.map(lambda f: file_sha256(directory / f), recorded)))
        for filename in recorded:
            if actual[filename] != digests[filename]:
                raise ExportError(f"shard {directory / filename} is corrupt: its sha256 differs from the one recorded in {INDEX}")
    for filename, names in sorted(by_file.items()):
        path = directory / filename
        present = set(tensor_names(path))  # safetensors checks the data section covers the header's tensors
        if names - present:
            raise ExportError(f"shard {path} lacks {len(names - present)} tensors listed in {INDEX}, e.g. {sorted(names - present)[0]!r}")
    return weight_map


def iter_tensors(directory: Path, weight_map: Mapping[str, str], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every stored tensor whose name starts with `prefix`, one shard open at a time."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, filename in weight_map.items():
        if name.startswith(prefix):
            by_file.setdefault(filename, []).append(name)
    for filename, names in sorted(by_file.items()):
        path = directory / filename
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in sorted(names):
                    yield name, fh.get_tensor(name)
        except Exception as exc:
            raise ExportError(f"cannot read tensors from shard {path}: {exc}") from exc


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
    hf_logging.set_verbosity_error()  # its load report lists merger.* / vggt.* / action_head.* as unexpected: checked below
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
    foreign = [k for k in info.get("unexpected_keys", []) if not k.startswith((MERGER_PREFIX, "vggt.", ACTION_HEAD_PREFIX))]
    if foreign:
        raise ExportError(f"{model_dir.path}: unexpected tensors, e.g. {sorted(foreign)[0]!r}")
    return model


def merger_state(model_dir: ModelDir) -> dict[str, torch.Tensor]:
    """The VGGT merger's `ln_q.*` / `mlp.*` tensors."""
    return model_dir.tensors(MERGER_PREFIX)


def action_head_state(model_dir: ModelDir) -> dict[str, torch.Tensor] | None:
    """The action head's `0.*`, `1.*`, `3.*` tensors (a vlnflow export trained with it, or the seed's checkpoints), or None."""
    return model_dir.tensors(ACTION_HEAD_PREFIX) if model_dir.has(ACTION_HEAD_PREFIX) else None


def vggt_state(model_dir: ModelDir) -> dict[str, torch.Tensor] | None:
    """The aggregator's tensors (janusvln layout / JanusVLN checkpoints), or None."""
    return model_dir.tensors(VGGT_PREFIX) if model_dir.has(VGGT_PREFIX) else None


def trained_preprocess(model_dir: ModelDir) -> str | None:
    """The frame preprocessing (crop | pad) a vlnflow export was trained with; None when it records none.

    Exports from before crop existed were all trained on pad frames."""
    settings = model_dir.settings
    if not settings:
        return None
    return str(settings.get("spatial", {}).get("preprocess", "pad"))
