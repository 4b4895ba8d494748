"""Sharded safetensors with transformers' naming, written and checked.

Files are `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`
(`metadata.total_size`, `weight_map`), as transformers and huggingface_hub write them
(the split is huggingface_hub's). The index's metadata also carries each shard's
sha256 (`vlnflow_sha256`), so a corrupt or truncated shard is found and named before
anything is loaded. safetensors only: no pickle.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from vlnflow.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_SIZE = "5GB"


class ExportError(UserError):
    """An export (or a checkpoint directory given to model.init_from) is incomplete or corrupt."""


def write_shards(state: Mapping[str, torch.Tensor], out: Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> dict:
    """Write `state` as sharded safetensors + index into `out`; returns the index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(dict(state), filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    groups = split.filename_to_tensors
    if not split.is_sharded:  # one shard: keep the sharded naming so the layout never changes with size
        groups = {"model-00001-of-00001.safetensors": next(iter(groups.values()))}
    weight_map, digests, total, seen = {}, {}, 0, set()
    for filename, names in groups.items():
        tensors = {}
        for n in names:  # safetensors refuses tensors sharing memory (tied embeddings): store a copy
            tensor = state[n].contiguous()
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            tensors[n] = tensor.clone() if key in seen else tensor
            seen.add(key)
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        digests[filename] = file_sha256(out / filename)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: filename for n in names})
    index = {"metadata": {"total_size": total, "vlnflow_sha256": digests}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


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
