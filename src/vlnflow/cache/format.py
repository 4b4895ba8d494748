"""The HDF5 shard format: names, attributes and dtype codecs shared by writer, reader and validator.

Layout (DESIGN.md "HDF5 shard format"):
    /features  [N, P, C]  bf16 as uint16 bits (attr dtype=bfloat16), or float16 / float32
    /sample_id [N] utf-8   /done [N] bool   /error [N] utf-8 ('' = fine; else why it was skipped)
One sample per chunk, so a training read touches exactly one chunk.
"""

from __future__ import annotations

import numpy as np
import torch

FORMAT_VERSION = 1

FEATURES = "features"
SAMPLE_ID = "sample_id"
DONE = "done"
ERROR = "error"

# Attributes every complete shard carries.
REQUIRED_ATTRS = (
    "format_version",
    "dtype",
    "grid_h",
    "grid_w",
    "channels",
    "layer",
    "encoder_fingerprint",
    "shard_fingerprint",
    "vlnflow_version",
    "created_at",
    "complete",
)

STORAGE_NUMPY = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
BYTES_PER_VALUE = {"bfloat16": 2, "float16": 2, "float32": 4}


def to_storage(features: torch.Tensor, dtype: str) -> np.ndarray:
    """Encode a float tensor for storage: bf16 keeps its exact bits as uint16."""
    features = features.detach().cpu()
    if dtype == "bfloat16":
        return features.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if dtype == "float16":
        return features.to(torch.float16).numpy()
    if dtype == "float32":
        return features.to(torch.float32).numpy()
    raise ValueError(f"cache.dtype '{dtype}' is not one of {sorted(STORAGE_NUMPY)}")


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Decode stored values to a tensor of the stored precision (bf16 / fp16 / fp32)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def h5_compression(setting: str | None) -> dict:
    """Map the config value (None, 'lzf', 'gzip-N') to h5py dataset keyword arguments."""
    if setting is None:
        return {}
    if setting == "lzf":
        return {"compression": "lzf"}
    if setting.startswith("gzip-"):
        return {"compression": "gzip", "compression_opts": int(setting.split("-", 1)[1])}
    raise ValueError(f"cache.compression '{setting}' is not null, 'lzf' or 'gzip-1'..'gzip-9'")
