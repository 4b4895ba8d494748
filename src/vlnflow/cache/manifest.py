"""Merge per-shard feature files into one manifest: what the cache holds and where each sample lives."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import h5py
import pandas as pd

from vlnflow import __version__
from vlnflow.cache import format as fmt
from vlnflow.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def _read_shard_summary(path: Path) -> tuple[dict, pd.DataFrame]:
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            ids = f[fmt.SAMPLE_ID].asstr()[...]
            errors = f[fmt.ERROR].asstr()[...]
            n, p, c = f[fmt.FEATURES].shape
    except (OSError, KeyError) as exc:
        raise UserError(f"cache shard {path} is unreadable ({exc}); delete it and rerun precompute") from None
    if not attrs.get("complete"):
        raise UserError(f"cache shard {path} is not marked complete")
    rows = pd.DataFrame({"sample_id": ids, "row": range(n), "error": errors})
    summary = {
        "name": path.stem,
        "file": path.name,
        "n_samples": int(n - (rows.error != "").sum()),
        "n_skipped": int((rows.error != "").sum()),
        "bytes": path.stat().st_size,
        "shard_fingerprint": attrs["shard_fingerprint"],
        "encoder_fingerprint": attrs["encoder_fingerprint"],
        "dtype": attrs["dtype"],
        "feature_shape": [int(p), int(c)],
        "grid": [int(attrs["grid_h"]), int(attrs["grid_w"])],
        "layer": int(attrs["layer"]),
    }
    return summary, rows


def merge_manifest(shard_files: list[str | Path], out_json: str | Path, out_parquet: str | Path) -> dict:
    """Write manifest.json (totals, per-shard facts) and manifest.parquet (sample_id -> shard file, row)."""
    shards, tables = [], []
    for path in sorted(Path(p) for p in shard_files):
        summary, rows = _read_shard_summary(path)
        shards.append(summary)
        rows = rows[rows.error == ""].drop(columns="error")
        rows.insert(1, "shard", summary["name"])
        rows.insert(2, "file", summary["file"])
        tables.append(rows)
    if not shards:
        raise UserError("no cache shard files to merge")
    for key in ("encoder_fingerprint", "dtype", "feature_shape", "layer"):
        values = {json.dumps(s[key]) for s in shards}
        if len(values) > 1:
            by = {s["name"]: s[key] for s in shards}
            raise UserError(f"cache shards disagree on {key}: {by}")
    table = pd.concat(tables, ignore_index=True)
    dup = table.sample_id[table.sample_id.duplicated()]
    if len(dup):
        raise UserError(f"samples present in more than one shard, e.g. {list(dup[:5])}")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vlnflow_version": __version__,
        "samples": int(len(table)),
        "skipped": int(sum(s["n_skipped"] for s in shards)),
        "shards": shards,
        "n_shards": len(shards),
        "bytes": int(sum(s["bytes"] for s in shards)),
        "dtype": shards[0]["dtype"],
        "feature_shape": shards[0]["feature_shape"],
        "grid": shards[0]["grid"],
        "layer": shards[0]["layer"],
        "encoder_fingerprint": shards[0]["encoder_fingerprint"],
    }
    _atomic_write(Path(out_parquet), lambda p: table.to_parquet(p, index=False))
    _atomic_write(Path(out_json), lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    log.info("manifest: %d samples in %d shards, %.3f GB", manifest["samples"], len(shards), manifest["bytes"] / 1e9)
    return manifest


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def load_manifest(path: str | Path) -> dict:
    """Read manifest.json, with a clear error when it is missing or not a vlnflow manifest."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"cache manifest not found: {path} (run `snakemake precompute_all`)")
    manifest = json.loads(path.read_text())
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise UserError(f"{path} is not a vlnflow manifest of version {MANIFEST_VERSION}")
    return manifest
