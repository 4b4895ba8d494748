"""Prove a cache complete, well-formed and faithful before training depends on it.

`validate_shard` checks one feature file against its shard's index rows (and moves a
corrupt file aside so the next run rebuilds exactly that shard): structure, every chunk's
checksum and finite values, on the CPU. The live recompute of a few samples per shard runs
for all shards in one GPU job (vlnflow.cache.spot_check; validate_shard still does it for
one shard when asked). `validate_cache` combines the per-shard reports and the spot-check
report with the manifest and the index.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from vlnflow.cache import format as fmt
from vlnflow.cache import reuse
from vlnflow.cache import spot_check as spot
from vlnflow.cache.spot_check import SPOT_CHECK_TOLERANCE, spot_check_tolerance  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)


def _quarantine(path: Path, quarantine_dir: Path) -> Path:
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / f"{path.stem}.{int(time.time())}{path.suffix}"
    shutil.move(str(path), target)
    return target


def _check_structure(f: h5py.File, expected_ids: list[str], expected: dict, problems: list[str]) -> None:
    attrs = f.attrs
    missing = [k for k in fmt.REQUIRED_ATTRS if k not in attrs]
    if missing:
        problems.append(f"missing attributes {missing}")
        return
    if not attrs["complete"]:
        problems.append("file is not marked complete")
    if attrs["format_version"] != fmt.FORMAT_VERSION:
        problems.append(f"format_version {attrs['format_version']} != {fmt.FORMAT_VERSION}")
    for key in ("encoder_fingerprint", "shard_fingerprint", "dtype"):
        if key in expected and attrs[key] != expected[key]:
            problems.append(f"{key} is {attrs[key]!r}, expected {expected[key]!r} (stale: rerun precompute)")
    ds = f[fmt.FEATURES]
    want_shape = (len(expected_ids), int(attrs["grid_h"]) * int(attrs["grid_w"]), int(attrs["channels"]))
    if ds.shape != want_shape:
        problems.append(f"features shape {ds.shape} != {want_shape}")
    if attrs["dtype"] not in fmt.STORAGE_NUMPY:
        problems.append(f"unknown storage dtype {attrs['dtype']!r}")
        return
    if ds.dtype != np.dtype(fmt.STORAGE_NUMPY[attrs["dtype"]]):
        problems.append(f"features dtype {ds.dtype} does not store {attrs['dtype']}")
    if attrs["dtype"] in fmt.SCALED:
        scale = f.get(fmt.SCALE)
        if scale is None or scale.shape != want_shape[:2] or scale.dtype != np.float32:
            got = "missing" if scale is None else f"{scale.shape} {scale.dtype}"
            problems.append(f"/{fmt.SCALE} must be float32 {want_shape[:2]} for {attrs['dtype']}, got {got}")
    bound = fmt.ROUND_TRIP_BOUND[attrs["dtype"]]
    worst = float(attrs.get("max_row_rel_error", 0.0))
    if worst > bound * 1.0001 + 1e-7:  # what the writer measured against the encoder output
        problems.append(f"round-trip error {worst:.3g} (worst token row, relative) exceeds the {attrs['dtype']} bound {bound:.3g}")
    if "feature_shape" in expected and tuple(ds.shape[1:]) != tuple(expected["feature_shape"]):
        problems.append(f"feature shape {ds.shape[1:]} != configured {tuple(expected['feature_shape'])}")
    ids = list(f[fmt.SAMPLE_ID].asstr()[...])
    if ids != expected_ids:
        extra = sorted(set(ids) - set(expected_ids))[:5]
        lost = sorted(set(expected_ids) - set(ids))[:5]
        dups = len(ids) - len(set(ids))
        problems.append(f"sample ids differ from the shard index: missing {lost}, unexpected {extra}, duplicates {dups}")
    done = f[fmt.DONE][...]
    if not done.all():
        problems.append(f"{int((~done).sum())} samples not done")


def _check_values(f: h5py.File, problems: list[str]) -> None:
    """Read every chunk once: fletcher32 catches corruption, and values must be finite."""
    ds, dtype = f[fmt.FEATURES], f.attrs["dtype"]
    errors = f[fmt.ERROR].asstr()[...]
    bad_rows, bad_scales = [], []
    for row in range(ds.shape[0]):
        if errors[row]:
            continue
        raw = ds[row]
        scale = f[fmt.SCALE][row] if dtype in fmt.SCALED else None
        values = fmt.decode(raw, dtype, scale)
        if not torch.isfinite(values).all():
            bad_rows.append(row)
        # a scale is absmax / 448: finite and >= 0, and 0 only for a row stored as all zeros
        if scale is not None and (not np.isfinite(scale).all() or (scale < 0).any() or fmt.nonzero_rows(raw, dtype)[scale == 0].any()):
            bad_scales.append(row)
    ids = f[fmt.SAMPLE_ID].asstr()[...]
    if bad_rows:
        problems.append(f"NaN/Inf in {len(bad_rows)} samples, e.g. {[ids[r] for r in bad_rows[:5]]}")
    if bad_scales:
        problems.append(f"invalid per-row scales in {len(bad_scales)} samples, e.g. {[ids[r] for r in bad_scales[:5]]}")


def _spot_check(f: h5py.File, table: pd.DataFrame, config: dict, encoder, k: int, shard: str) -> dict:
    """Recompute k random samples of this shard live and compare with the stored features."""
    picks = spot.picks_of(f, table, shard, k)
    live = spot.recompute(picks, encoder, Path(config["dataset"]["root"]))
    return spot.summarise([spot.compare(p, x) for p, x in zip(picks, live)], f.attrs["dtype"])


def validate_shard(
    h5_path: str | Path,
    shard_parquet: str | Path,
    expected: dict,
    config: dict,
    *,
    encoder=None,
    quarantine_dir: str | Path | None = None,
    spot_check: int | None = None,
) -> dict:
    """Check one feature file; returns a report dict with `ok` and human-readable `problems`.

    `expected` holds encoder_fingerprint, shard_fingerprint, dtype and feature_shape. `spot_check`
    samples are recomputed live (None: config cache.spot_check; the workflow passes 0 and checks every
    shard's samples in one GPU job instead).
    A file that cannot be read (truncated, corrupt chunk) is moved to `quarantine_dir`
    so that the next `snakemake precompute_all` rebuilds this shard alone; a file with any
    problem is also dropped as the shard's previous rows (vlnflow.cache.reuse), so the
    rebuild computes every row.
    """
    h5_path, table = Path(h5_path), pd.read_parquet(shard_parquet)
    report = {"shard": h5_path.stem, "file": str(h5_path), "samples": len(table), "problems": []}
    problems = report["problems"]
    try:
        with h5py.File(h5_path, "r") as f:
            _check_structure(f, table.sample_id.tolist(), expected, problems)
            if not problems:
                _check_values(f, problems)
            report["skipped"] = int(sum(1 for e in f[fmt.ERROR].asstr()[...] if e)) if fmt.ERROR in f else 0
            k = config["cache"]["spot_check"] if spot_check is None else spot_check
            if not problems and k > 0:
                if encoder is None:
                    from vlnflow.spatial import SpatialEncoder

                    encoder = SpatialEncoder.from_config(config["spatial"])
                checked = _spot_check(f, table, config, encoder, k, h5_path.stem)
                report["spot_check"] = checked
                if (why := spot.problem(checked, f.attrs["dtype"])) is not None:
                    problems.append(why)
    except (OSError, KeyError, ValueError) as exc:
        problems.append(f"unreadable or corrupt: {type(exc).__name__}: {exc}")
        if quarantine_dir is not None and h5_path.exists():
            moved = _quarantine(h5_path, Path(quarantine_dir))
            report["quarantined"] = str(moved)
            problems.append(f"moved to {moved}; the next run rebuilds this shard")
    if problems:  # never copy rows of a file that failed validation into the shard's rebuild
        reuse.forget(h5_path)
    report["ok"] = not problems
    return report


def validate_cache(
    manifest_json: str | Path,
    shard_reports: list[str | Path],
    samples_parquet: str | Path,
    expected_fingerprint: str,
    out_json: str | Path,
    spot_report: str | Path | None = None,
) -> dict:
    """Combine per-shard reports, the spot-check report (if any), the manifest and the index into validation.json.

    A shard's live spot check comes from `spot_report` (the one GPU job) when given, else from its own report.
    """
    manifest = json.loads(Path(manifest_json).read_text())
    table = pd.read_parquet(Path(manifest_json).with_suffix(".parquet"))
    index = pd.read_parquet(samples_parquet, columns=["sample_id"])
    reports = [json.loads(Path(p).read_text()) for p in shard_reports]
    problems = [f"shard {r['shard']}: {p}" for r in reports for p in r["problems"]]
    if spot_report is not None:
        live = json.loads(Path(spot_report).read_text())
        problems += live["problems"]
        missing = sorted(r["shard"] for r in reports if r["shard"] not in live["shards"])
        if missing and live.get("k", 0) > 0:
            problems.append(f"no live spot check for shards {missing[:5]} (spot-check report {spot_report} is older than them)")
        for r in reports:
            if r["shard"] in live["shards"]:
                r["spot_check"] = live["shards"][r["shard"]]
    cached = table.sample_id
    dup = cached[cached.duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} samples cached more than once, e.g. {list(dup[:5])}")
    skipped = manifest.get("skipped", 0)
    missing = sorted(set(index.sample_id) - set(cached))
    if len(missing) != skipped:
        problems.append(f"{len(missing)} indexed samples are not in the cache (skipped on error: {skipped}), e.g. {missing[:5]}")
    unknown = sorted(set(cached) - set(index.sample_id))
    if unknown:
        problems.append(f"{len(unknown)} cached samples are not in the index, e.g. {unknown[:5]}")
    fps = {s["encoder_fingerprint"] for s in manifest["shards"]}
    if fps != {expected_fingerprint}:
        problems.append(f"encoder fingerprints {sorted(fps)} != configured {expected_fingerprint}")
    worst = max((r.get("spot_check", {}).get("worst_rel_err", 0.0) for r in reports), default=0.0)
    result = {
        "ok": not problems,
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "samples_indexed": int(len(index)),
        "samples_cached": int(len(cached)),
        "samples_skipped": int(skipped),
        "shards": len(reports),
        "spot_checked": int(sum(len(r.get("spot_check", {}).get("checked", [])) for r in reports)),
        "worst_spot_rel_err": worst,
        "tolerance": spot_check_tolerance(manifest.get("dtype", "bfloat16")),
        "encoder_fingerprint": expected_fingerprint,
        "problems": problems,
    }
    Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_text(result: dict) -> str:
    """A readable multi-line summary for the log and the terminal."""
    head = "cache OK" if result["ok"] else f"cache INVALID: {len(result['problems'])} problem(s)"
    lines = [
        head,
        f"  samples: {result['samples_cached']} cached of {result['samples_indexed']} indexed ({result['samples_skipped']} skipped on error)",
        f"  spot check: {result['spot_checked']} samples recomputed live, worst relative error {result['worst_spot_rel_err']:.3g} (tolerance {result['tolerance']})",
    ]
    lines += [f"  - {p}" for p in result["problems"]]
    return "\n".join(lines)
