"""The HDF5 shard format: names, attributes and dtype codecs shared by writer, reader and validator.

Layout (DESIGN.md "HDF5 shard format"):
    /features  [N, P, C]  bf16 as uint16 bits (attr dtype=bfloat16), or float16 / float32, or
                          float8 e4m3 as uint8 bits (attr dtype=float8_e4m3) with
    /scale     [N, P]     float32, one per token row (float8_e4m3 only): value = fp8 * scale
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

SCALE = "scale"

STORAGE_NUMPY = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32, "float8_e4m3": np.uint8}
BYTES_PER_VALUE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3": 1}
# Storage dtypes with a float32 scale per token row (stored in /scale).
SCALED = {"float8_e4m3"}
FP8_MAX = 448.0  # largest finite torch.float8_e4m3fn value: a row's absmax maps onto it

# Guaranteed per-row relative L2 error of the stored row against the float32 input (round to nearest):
# half an ulp of the mantissa (bf16 2^-8, fp16 2^-11, e4m3 2^-4) plus headroom for e4m3's subnormals
# (absolute error <= 2^-10 * scale, tiny against a row whose absmax is 448 * scale).
ROUND_TRIP_BOUND = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 0.0, "float8_e4m3": 0.07}


# float32 value of every e4m3fn bit pattern (exact); FeatureStore dequantises with it per read.
_FP8_TO_FLOAT32 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def bytes_per_sample(tokens: int, channels: int, dtype: str) -> int:
    """Stored bytes of one [P, C] feature map (values plus per-row scales), before compression."""
    return tokens * channels * BYTES_PER_VALUE[dtype] + (tokens * 4 if dtype in SCALED else 0)


def fp8_scales(features: torch.Tensor) -> torch.Tensor:
    """[..., P, C] -> [..., P] float32 scales absmax / 448; an all-zero row gets scale 0."""
    return features.detach().float().abs().amax(dim=-1) / FP8_MAX


def encode(features: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, per-row scales or None) to store for `features` [..., P, C]."""
    if dtype not in SCALED:
        return to_storage(features, dtype), None
    q, scale = quantize_fp8(features)
    return q.view(torch.uint8).cpu().numpy(), scale.cpu().numpy()


def quantize_fp8(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., P, C] -> (float8_e4m3fn values, float32 scales [..., P]) on the tensor's own device
    (a GPU batch is quantised on the GPU: the CPU cast is ~10x slower)."""
    x = features.detach().float()
    scale = fp8_scales(x)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero row: 0 / 1 = 0, never 0 / 0
    return (x / safe.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same values `decode` gives, computed with torch ops on q's device (bf16)."""
    return (q.float() * scale.float().unsqueeze(-1)).to(torch.bfloat16)


def decode(values: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    """Stored values (and scales) -> tensor: bf16 / fp16 / fp32 as stored; float8_e4m3 dequantised to bf16."""
    if dtype not in SCALED:
        return from_storage(values, dtype)
    if scale is None:
        raise ValueError(f"cache.dtype '{dtype}' needs the per-row scales (/{SCALE})")
    out = _FP8_TO_FLOAT32[values]  # a 256-entry table: 3x faster than torch's float8 -> float32 cast on CPU
    out *= np.asarray(scale, dtype=np.float32)[..., None]
    return torch.from_numpy(out).to(torch.bfloat16)


def nonzero_rows(values: np.ndarray, dtype: str) -> np.ndarray:
    """[..., P, C] stored float8_e4m3 bits -> [..., P] bool: the row holds a non-zero value (before scaling)."""
    return (torch.from_numpy(np.ascontiguousarray(values)).view(torch.float8_e4m3fn).float() != 0).any(-1).numpy()


def row_rel_error(stored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per token row ||stored - ref|| / ||ref|| ([..., P, C] -> [..., P]); an all-zero reference row
    counts its absolute error."""
    ref = reference.float()
    norm = ref.norm(dim=-1)
    return (stored.float() - ref).norm(dim=-1) / torch.where(norm > 0, norm, torch.ones_like(norm))


def to_storage(features: torch.Tensor, dtype: str) -> np.ndarray:
    """Encode a float tensor for storage: bf16 keeps its exact bits as uint16."""
    features = features.detach().cpu()
    if dtype == "bfloat16":
        return features.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if dtype == "float16":
        return features.to(torch.float16).numpy()
    if dtype == "float32":
        return features.to(torch.float32).numpy()
    if dtype in SCALED:
        raise ValueError(f"cache.dtype '{dtype}' stores values and scales: use format.encode")
    raise ValueError(f"cache.dtype '{dtype}' is not one of {sorted(STORAGE_NUMPY)}")


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Decode stored values to a tensor of the stored precision (bf16 / fp16 / fp32)."""
    if dtype in SCALED:
        raise ValueError(f"cache.dtype '{dtype}' needs its scales: use format.decode")
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
