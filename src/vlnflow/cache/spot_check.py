"""Live spot checks: recompute a few cached samples with VGGT and compare them with what the cache holds.

The check must stay independent of the precompute job, so that a wrong writer or loader is caught: it
reads each picked sample's frames itself (one `load_frame` per frame, no shared-frame index), runs the
encoder's per-sample path `encode` (not `encode_indexed`), and compares the result with the stored row
found by sample id. Picks are batched by frame count and padded like precompute batches (the encoder's
shape policy), so the checks of every shard run as a few full batches.

`spot_check_cache` checks every shard of a cache in ONE job that loads VGGT once (rule spot_check_cache,
one GPU): R2R-CE's 256 shards x `cache.spot_check` samples take about a minute of GPU time, where one GPU
job per shard paid the model's set-up 256 times. `validate_shard` still checks one shard the same way
when asked (tests, direct calls).
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import pandas as pd
import torch

from vlnflow.cache import format as fmt
from vlnflow.cache import reuse

log = logging.getLogger(__name__)

# Relative Frobenius error allowed between a cached feature and a live recompute:
# bf16 storage rounds each value by up to 2^-9 relative; kernels may differ between batch shapes.
SPOT_CHECK_TOLERANCE = 2e-2


def spot_check_tolerance(dtype: str) -> float:
    """The live-recompute tolerance for a cache stored as `dtype`: the kernels' 2e-2 (which already covers
    bf16 / fp16 rounding) plus, for float8_e4m3, its guaranteed per-row round-trip bound."""
    return SPOT_CHECK_TOLERANCE + (fmt.ROUND_TRIP_BOUND[dtype] if dtype in fmt.SCALED else 0.0)


@dataclass
class Pick:
    """One sample to recompute: where it came from, its frames and its stored feature (float32)."""

    shard: str
    row: int
    sample_id: str
    frames: list[str]
    stored: torch.Tensor


def pick_rows(errors: list[str], k: int, seed: int) -> list[int]:
    """k rows that were computed (not skipped), chosen reproducibly from `seed`."""
    candidates = [r for r in range(len(errors)) if not errors[r]]
    return sorted(random.Random(seed).sample(candidates, min(k, len(candidates))))


def shard_seed(shard: str) -> int:
    return zlib.crc32(shard.encode())


def picks_of(f: h5py.File, table: pd.DataFrame, shard: str, k: int) -> list[Pick]:
    """The k spot-check samples of an open shard file, with their stored rows decoded."""
    errors = list(f[fmt.ERROR].asstr()[...])
    dtype = f.attrs["dtype"]
    picks = []
    for row in pick_rows(errors, k, shard_seed(shard)):
        scale = f[fmt.SCALE][row] if dtype in fmt.SCALED else None
        stored = fmt.decode(f[fmt.FEATURES][row], dtype, scale).float()
        picks.append(Pick(shard, row, str(table.sample_id.iloc[row]), list(table.frames.iloc[row]), stored))
    return picks


def recompute(picks: list[Pick], encoder, root: Path, timing: dict | None = None) -> list[torch.Tensor]:
    """Live features for `picks` (float32, CPU), batched by frame count, each batch padded per the encoder's
    shape policy; `timing` (if given) gets first_batch_s (synchronised, compile included) and compute_s."""
    from vlnflow.cache.warmup import synchronize
    from vlnflow.spatial.preprocess import load_frame

    out: list[torch.Tensor | None] = [None] * len(picks)
    by_frames: dict[int, list[int]] = {}
    for i, pick in enumerate(picks):
        by_frames.setdefault(len(pick.frames), []).append(i)
    size = max(1, encoder.batch_size)
    groups = [idx[j : j + size] for _, idx in sorted(by_frames.items()) for j in range(0, len(idx), size)]
    policy = getattr(encoder, "shapes", None)
    if policy is not None and not policy.pads(bool(getattr(encoder, "compile_blocks", False))):
        policy = None
    for number, group in enumerate(groups):
        frames = torch.stack([torch.stack([load_frame(root / rel, geometry=encoder.geometry) for rel in picks[i].frames]) for i in group])
        if policy is not None:
            frames = policy.pad_frames(frames)
        synchronize(encoder.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            live = encoder.encode(frames.to(encoder.device))[: len(group)].float().cpu()
        elapsed = time.perf_counter() - t0
        if timing is not None:
            timing["compute_s"] = timing.get("compute_s", 0.0) + elapsed
            if number == 0:
                timing["first_batch_s"], timing["first_batch_samples"] = elapsed, len(group)
        for i, feature in zip(group, live):
            out[i] = feature
    return out


def compare(pick: Pick, live: torch.Tensor) -> dict:
    """Relative Frobenius error of the stored row against the live one, and the worst token row's."""
    rel = ((pick.stored - live).norm() / live.norm().clamp_min(1e-12)).item()
    return {"sample_id": pick.sample_id, "rel_err": rel, "worst_row_rel_err": fmt.row_rel_error(pick.stored, live).max().item()}


def summarise(checked: list[dict], dtype: str) -> dict:
    """A shard's spot-check record (the `spot_check` entry of its validation report)."""
    return {
        "checked": checked,
        "worst_rel_err": max((c["rel_err"] for c in checked), default=0.0),
        "worst_row_rel_err": max((c["worst_row_rel_err"] for c in checked), default=0.0),
        "tolerance": spot_check_tolerance(dtype),
    }


def problem(spot: dict, dtype: str) -> str | None:
    """The validation problem a spot-check record shows, if any."""
    if spot["worst_rel_err"] > spot["tolerance"]:
        return (f"live recompute differs: worst relative error {spot['worst_rel_err']:.3g} > {spot['tolerance']:.3g} "
                f"(cache.dtype {dtype})")  # fmt: skip
    return None


def spot_check_cache(
    shards: list[tuple[str | Path, str | Path]],
    config: dict,
    *,
    encoder=None,
    process_start: float | None = None,
    gpu_wait_s: float = 0.0,
) -> dict:
    """Spot-check every (feature file, shard table) pair with one encoder; returns the report.

    The report holds per-shard records (as validate_shard's `spot_check`), `problems` naming the shard,
    and `timing`: the set-up split (imports, weights, first batch) and compute seconds of this job, the
    inputs of the validation-cost projection in the precompute benchmark.
    """
    from vlnflow.spatial import SpatialEncoder, compile_cache

    started, started_at = time.perf_counter(), time.time()
    imports_s = max(0.0, started_at - process_start - gpu_wait_s) if process_start else 0.0
    k = config["cache"]["spot_check"]
    report: dict = {"k": k, "shards": {}, "problems": [], "samples_checked": 0}
    picks: list[Pick] = []
    dtypes: dict[str, str] = {}
    for h5_path, parquet in shards:
        name = Path(h5_path).stem
        with h5py.File(h5_path, "r") as f:
            dtypes[name] = str(f.attrs["dtype"])
            picks += picks_of(f, pd.read_parquet(parquet, columns=["sample_id", "frames"]), name, k)
    read_s = time.perf_counter() - started
    weights_s = 0.0
    timing: dict = {}
    live: list[torch.Tensor] = []
    if picks:
        t0 = time.perf_counter()
        encoder = encoder or SpatialEncoder.from_config(config["spatial"])
        weights_s = time.perf_counter() - t0
        if getattr(encoder, "compile_blocks", False):  # the host's compile cache, warm from the precompute jobs
            compile_cache.activate(config["cache"].get("compile_cache"))
        live = recompute(picks, encoder, Path(config["dataset"]["root"]), timing)
    checked: dict[str, list[dict]] = {Path(h).stem: [] for h, _ in shards}
    files = {Path(h).stem: Path(h) for h, _ in shards}
    for pick, feature in zip(picks, live):
        checked[pick.shard].append(compare(pick, feature))
    for name, records in checked.items():
        spot = summarise(records, dtypes[name])
        report["shards"][name] = spot
        if (why := problem(spot, dtypes[name])) is not None:
            report["problems"].append(f"shard {name}: {why}")
            reuse.forget(files[name])  # rows of a file that fails its live check are never copied into a rebuild
    report["samples_checked"] = len(picks)
    report["ok"] = not report["problems"]
    wall = time.perf_counter() - started
    first, compute = timing.get("first_batch_s", 0.0), timing.get("compute_s", 0.0)
    later = len(picks) - timing.get("first_batch_samples", 0)
    report["timing"] = {
        "setup_split_s": {"imports": imports_s, "read": read_s, "weights": weights_s, "first_batch": first},
        "setup_s": imports_s + read_s + weights_s + first,  # the first batch (its compile) counts as set-up
        "compute_s": compute,
        "steady_s_per_sample": (compute - first) / later if later > 0 else None,  # after the first batch
        "job_wall_s": wall + imports_s,
        "device": str(encoder.device) if encoder is not None else None,
        "gpu_name": torch.cuda.get_device_name(encoder.device) if encoder is not None and encoder.device.type == "cuda" else None,
    }
    log.info("spot-checked %d samples of %d shards: %s", len(picks), len(shards), "ok" if report["ok"] else report["problems"])
    return report

