"""The encoder fingerprint from settings alone, cheap enough for Snakemake's parse time.

It identifies what the cached features depend on: weights content, architecture,
preprocessing (crop or pad, sizes: vlnflow.spatial.geometry), kept layer, frame order, configured compute dtype and a code version.
It deliberately uses the *configured* `spatial.dtype` (not whether this process has a
GPU), so the login node that parses the workflow, the GPU precompute jobs and the
training ranks all agree. The weights' content digest is computed once per file and
remembered by (path, size, mtime) in ~/.cache/vlnflow (override: VLNFLOW_CACHE_DIR).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vlnflow.errors import UserError
from vlnflow.spatial.geometry import geometry_of

CODE_VERSION = "1"  # bump when a code change alters the features computed from the same settings


def _digest_cache() -> Path:
    root = Path(os.environ.get("VLNFLOW_CACHE_DIR", Path.home() / ".cache" / "vlnflow"))
    return root / "weights-digests.json"


def _stat_key(file: Path) -> str:
    st = file.stat()
    return f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def remember_digest(file: Path, digest: str) -> None:
    """Record a digest computed while loading, so parse-time fingerprints need not reread the file."""
    cache = _digest_cache()
    try:
        known = json.loads(cache.read_text()) if cache.exists() else {}
        known[_stat_key(file)] = digest
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs a recomputation next time


def weights_digest(path: str | Path) -> str:
    """Content digest of the aggregator weights in `path` (same value load_aggregator_weights returns)."""
    from vlnflow.spatial.checkpoint import _digest_update, aggregator_keys, find_weights_file, open_tensors

    file = find_weights_file(Path(path).expanduser())
    cache = _digest_cache()
    try:
        known = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        known = {}
    key = _stat_key(file)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open_tensors(file) as (shapes, read):
        names = aggregator_keys(list(shapes), str(file))
        for name in sorted(names):
            _digest_update(digest, name, read(names[name]))
    value = digest.hexdigest()
    remember_digest(file, value)
    return value


def weights_id(spatial_cfg: dict) -> str:
    weights = spatial_cfg.get("weights")
    if weights:
        return "sha256:" + weights_digest(weights)
    return f"random:{spatial_cfg.get('preset', 'tiny')}:seed={int(spatial_cfg.get('seed', 0))}"


def _preset(spatial_cfg: dict):
    from vlnflow.spatial.aggregator import PRESETS

    preset = spatial_cfg.get("preset", "tiny")
    if preset not in PRESETS:
        raise UserError(f"spatial.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def fingerprint_fields(spatial_cfg: dict, weights: str | None = None) -> dict:
    """Everything that determines the cached values; `weights` skips recomputing the weights id."""
    arch = _preset(spatial_cfg)
    depth = arch.depth
    layer = int(spatial_cfg.get("layer", -2))
    if not -depth <= layer < depth:
        raise UserError(f"spatial.layer={layer} is outside the aggregator's {depth} layers")
    return {
        "code_version": CODE_VERSION,
        "weights": weights or weights_id(spatial_cfg),
        "architecture": arch.as_dict(),
        "preprocess": geometry_of(spatial_cfg).fingerprint_fields(),
        "layer": layer % depth,
        "reference_frame": spatial_cfg.get("reference_frame", "last"),
        "compute_dtype": spatial_cfg.get("dtype", "bfloat16"),
    }


def fingerprint_of(fields: dict) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def encoder_fingerprint(spatial_cfg: dict) -> str:
    """sha256 of `fingerprint_fields`: equal settings and weights give the same string in any process."""
    return fingerprint_of(fingerprint_fields(spatial_cfg))


def spatial_output(spatial_cfg: dict) -> tuple[tuple[int, int], int]:
    """((grid_h, grid_w), channels) of one cached feature map, without building the model: the kept grid of
    the run's frame geometry (crop 34x46, pad 46x46 for 640x480 frames at 644) and 2 x the VGGT width."""
    arch = _preset(spatial_cfg)
    return geometry_of(spatial_cfg).kept_grid, 2 * arch.embed_dim
