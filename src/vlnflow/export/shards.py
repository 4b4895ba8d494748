"""Write sharded safetensors with transformers' naming (the layout vlnflow.model.model_dir reads and checks).

Files are `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`
(`metadata.total_size`, `weight_map`), as transformers and huggingface_hub write them
(the split is huggingface_hub's). The index's metadata also carries each shard's
sha256 (`vlnflow_sha256`), so a reader finds and names a corrupt or truncated shard
before anything is loaded. safetensors only: no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from vlnflow.model.model_dir import INDEX, file_sha256

DEFAULT_SHARD_SIZE = "5GB"

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
