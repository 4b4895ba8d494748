"""Prove the per-frame vision cache complete, well-formed and faithful; merge its manifest.

The same checks as the VGGT cache (vlnflow.cache.validate: attributes, shapes, ids, every chunk read through
its checksum, finite values, fp8 scales; a corrupt file is moved aside so the next run rebuilds that shard),
with frames instead of samples: a shard file must hold every frame of the shard's samples once, and a few
frames are recomputed live with the tower and compared with the stored rows.
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from datetime import datetime, timezone
from pathlib import Path

import h5py
import pandas as pd
import torch

from vlnflow.cache import format as fmt
from vlnflow.cache.manifest import _atomic_write, merge_manifest
from vlnflow.cache.validate import _check_structure, _check_values, _quarantine, spot_check_tolerance
from vlnflow.cache.vision_precompute import TOWER_DIGEST, unique_frames
from vlnflow.errors import UserError

log = logging.getLogger(__name__)


def merge_vision_manifest(shard_files: list[str | Path], out_json: str | Path, out_parquet: str | Path) -> dict:
    """merge_manifest (sample_id = frame path) plus the tower digest every file must share."""
    digests = {}
    for path in shard_files:
        with h5py.File(path, "r") as f:
            digests[Path(path).stem] = f.attrs.get(TOWER_DIGEST)
    if len(set(digests.values())) > 1 or None in digests.values():
        raise UserError(f"vision cache files were written by different (or unrecorded) towers: {digests}; rebuild them")
    manifest = merge_manifest(shard_files, out_json, out_parquet)
    manifest["tower_digest"] = next(iter(digests.values()))
    manifest["kind"] = "vision"
    _atomic_write(Path(out_json), lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


def _spot_check(f: h5py.File, frames: list[str], config: dict, tower, processor, device, k: int, seed: int) -> dict:
    """Recompute k random frames alone with the tower; compare with the stored rows."""
    from vlnflow.model.frames import load_qwen_frame
    from vlnflow.model.loading import frame_geometry
    from vlnflow.model.vision_rows import tower_rows

    errors = f[fmt.ERROR].asstr()[...]
    candidates = [r for r in range(len(frames)) if not errors[r]]
    rows = sorted(random.Random(seed).sample(candidates, min(k, len(candidates))))
    root, geometry, dtype = Path(config["dataset"]["root"]), frame_geometry(config), f.attrs["dtype"]
    worst, checked = 0.0, []
    for row in rows:
        processed = processor(images=[load_qwen_frame(root / frames[row], geometry)], return_tensors="pt")
        with torch.inference_mode():
            live = tower_rows(tower, processed["pixel_values"].to(device), processed["image_grid_thw"])[0].cpu()
        scale = f[fmt.SCALE][row] if dtype in fmt.SCALED else None
        stored = fmt.decode(f[fmt.FEATURES][row], dtype, scale)
        identical = bool(torch.equal(stored, live.to(stored.dtype)))  # as stored: a bf16 tower's rows in bf16 are exact
        stored, live = stored.float(), live.float()
        rel = ((stored - live).norm() / live.norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
        checked.append({"frame": frames[row], "rel_err": rel, "identical": identical})
    return {"checked": checked, "worst_rel_err": worst}


def validate_vision_shard(h5_path: str | Path, shard_parquet: str | Path, expected: dict, config: dict, *,
                          tower=None, image_processor=None, device=None, quarantine_dir: str | Path | None = None) -> dict:
    """Check one vision cache file; returns a report with `ok` and readable `problems`.

    `expected`: encoder_fingerprint (the vision fingerprint), shard_fingerprint, dtype."""
    h5_path = Path(h5_path)
    table = pd.read_parquet(shard_parquet, columns=["sample_id", "frames"])
    frames = unique_frames([list(f) for f in table.frames])
    report = {"shard": h5_path.stem, "file": str(h5_path), "frames": len(frames), "problems": []}
    problems = report["problems"]
    try:
        with h5py.File(h5_path, "r") as f:
            _check_structure(f, frames, expected, problems)
            if not problems:
                _check_values(f, problems)
            report["skipped"] = int(sum(1 for e in f[fmt.ERROR].asstr()[...] if e)) if fmt.ERROR in f else 0
            k = config["cache"]["spot_check"]
            if not problems and k > 0:
                from vlnflow.model.loading import frame_geometry, load_processors, resolve_model_config
                from vlnflow.model.vision_rows import build_tower, tower_digest
                from vlnflow.spatial.encoder import resolve_device

                device = torch.device(device) if device is not None else resolve_device(config["spatial"].get("device", "auto"))
                if image_processor is None:
                    _, image_processor = load_processors(resolve_model_config(config), frame_geometry(config))
                tower = tower if tower is not None else build_tower(resolve_model_config(config), device)
                if f.attrs.get(TOWER_DIGEST) != tower_digest(tower):
                    problems.append(f"written by tower {f.attrs.get(TOWER_DIGEST)!r}, this config builds "
                                    f"{tower_digest(tower)!r} (stale: rerun vision_cache_all)")
                else:
                    spot = _spot_check(f, frames, config, tower, image_processor, device, k, zlib.crc32(h5_path.stem.encode()))
                    spot["tolerance"] = spot_check_tolerance(f.attrs["dtype"])
                    report["spot_check"] = spot
                    if spot["worst_rel_err"] > spot["tolerance"]:
                        problems.append(f"live recompute differs: worst relative error {spot['worst_rel_err']:.3g} > "
                                        f"{spot['tolerance']:.3g} (cache.vision_dtype {f.attrs['dtype']})")
    except (OSError, KeyError, ValueError) as exc:
        problems.append(f"unreadable or corrupt: {type(exc).__name__}: {exc}")
        if quarantine_dir is not None and h5_path.exists():
            moved = _quarantine(h5_path, Path(quarantine_dir))
            report["quarantined"] = str(moved)
            problems.append(f"moved to {moved}; the next run rebuilds this shard")
    report["ok"] = not problems
    return report


def validate_vision_cache(manifest_json: str | Path, shard_reports: list[str | Path], samples_parquet: str | Path,
                          expected_fingerprint: str, out_json: str | Path) -> dict:
    """Combine per-shard reports, the manifest and the index: every indexed frame is cached (or skipped on error)."""
    manifest = json.loads(Path(manifest_json).read_text())
    cached = pd.read_parquet(Path(manifest_json).with_suffix(".parquet"), columns=["sample_id"]).sample_id
    index = pd.read_parquet(samples_parquet, columns=["frames"])
    wanted = set(unique_frames([list(f) for f in index.frames]))
    reports = [json.loads(Path(p).read_text()) for p in shard_reports]
    problems = [f"shard {r['shard']}: {p}" for r in reports for p in r["problems"]]
    dup = cached[cached.duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} frames cached more than once, e.g. {list(dup[:5])}")
    skipped = manifest.get("skipped", 0)
    missing = sorted(wanted - set(cached))
    if len(missing) != skipped:
        problems.append(f"{len(missing)} frames of indexed samples are not in the cache (skipped on error: {skipped}), e.g. {missing[:5]}")
    unknown = sorted(set(cached) - wanted)
    if unknown:
        problems.append(f"{len(unknown)} cached frames belong to no indexed sample, e.g. {unknown[:5]}")
    fps = {s["encoder_fingerprint"] for s in manifest["shards"]}
    if fps != {expected_fingerprint}:
        problems.append(f"vision fingerprints {sorted(fps)} != configured {expected_fingerprint}")
    checked = [c for r in reports for c in r.get("spot_check", {}).get("checked", [])]
    result = {
        "ok": not problems,
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frames_indexed": len(wanted),
        "frames_cached": int(len(cached)),
        "frames_skipped": int(skipped),
        "shards": len(reports),
        "bytes": int(manifest["bytes"]),
        "spot_checked": len(checked),
        "spot_identical": int(sum(c["identical"] for c in checked)),
        "worst_spot_rel_err": max((c["rel_err"] for c in checked), default=0.0),
        "tolerance": spot_check_tolerance(manifest.get("dtype", "bfloat16")),
        "vision_fingerprint": expected_fingerprint,
        "problems": problems,
    }
    Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_text(result: dict) -> str:
    head = "vision cache OK" if result["ok"] else f"vision cache INVALID: {len(result['problems'])} problem(s)"
    lines = [
        head,
        f"  frames: {result['frames_cached']} cached of {result['frames_indexed']} indexed ({result['frames_skipped']} skipped on error), "
        f"{result['bytes'] / 1e9:.3g} GB",
        f"  spot check: {result['spot_checked']} frames recomputed live ({result['spot_identical']} bit-identical), worst "
        f"relative error {result['worst_spot_rel_err']:.3g} (tolerance {result['tolerance']})",
    ]
    return "\n".join(lines + [f"  - {p}" for p in result["problems"]])
