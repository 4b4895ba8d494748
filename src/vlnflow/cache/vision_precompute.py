"""Compute one shard's per-frame vision rows: Qwen2.5-VL's frozen tower output before `visual.merger`.

Every frame of the shard's samples is stored once (a frame sits in up to 9 samples' histories), keyed by its
path relative to dataset.root, in the VGGT cache's HDF5 shard format (vlnflow.cache.format: one frame per
chunk; bf16 bits, or the row-scaled float8 layout) through the same crash-safe ShardWriter: rows are marked
done only after they are flushed, a killed job resumes from its partial file, and the file appears under its
final name only when every frame is done or recorded as skipped.

Frames are decoded and run through Qwen's pinned image processor in DataLoader workers (as training does in
its workers: vlnflow.model.frames.load_qwen_frame); the tower is built as training builds it
(vlnflow.model.vision_rows.build_tower) and its rows go to the writer thread behind a bounded queue.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlnflow.cache.precompute import BackgroundWriter, timing_event, to_host_async
from vlnflow.cache.loader_workers import loader_workers
from vlnflow.cache.vision_fingerprint import vision_fingerprint
from vlnflow.cache.writer import ShardWriter
from vlnflow.errors import DatasetError

log = logging.getLogger(__name__)

TOWER_DIGEST = "tower_digest"  # file attribute: vlnflow.model.vision_rows.tower_digest of the tower that wrote it


def unique_frames(frames: list[list[str]]) -> list[str]:
    """Every frame of the shard's samples once, in order of first appearance."""
    return list(dict.fromkeys(rel for sample in frames for rel in sample))


@dataclass
class FrameBatch:
    """What a worker hands the tower: the rows (frame indices) that loaded, their patches and grids."""

    rows: list[int]
    pixel_values: torch.Tensor  # [patches, 3 * 2 * 14 * 14]
    grid_thw: torch.Tensor  # [len(rows), 3]
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it could not be loaded

    def pin_memory(self) -> "FrameBatch":
        return FrameBatch(self.rows, self.pixel_values.pin_memory(), self.grid_thw, self.errors)


class ShardImages(Dataset):
    """Item i = batch i of frames, decoded and processed as Qwen's input (the run's frame geometry)."""

    def __init__(self, root: Path, frames: list[str], batches: list[list[int]], geometry, image_processor):
        self.root, self.frames, self.batches = root, frames, batches
        self.geometry, self.processor = geometry, image_processor

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> FrameBatch:
        from vlnflow.model.frames import load_qwen_frame

        rows, images, errors = [], [], {}
        for row in self.batches[i]:
            try:
                images.append(load_qwen_frame(self.root / self.frames[row], self.geometry))
                rows.append(row)
            except Exception as exc:  # missing file, truncated PNG, wrong size...
                errors[row] = f"cannot read frame {self.root / self.frames[row]} ({type(exc).__name__}: {exc})"
        if not images:
            return FrameBatch(rows, torch.zeros(0), torch.zeros(0, 3, dtype=torch.long), errors)
        processed = self.processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        want = [1, *self.geometry.kept_grid]
        if grid.tolist() != [want] * len(rows):
            raise DatasetError(f"Qwen's processor gave image grids {grid.tolist()[:2]}... for frames of "
                               f"{self.root}, but the frame geometry ({self.geometry.describe()}) needs {want}")
        return FrameBatch(rows, processed["pixel_values"], grid, errors)


def precompute_vision_shard(
    shard_parquet: str | Path,
    shard_fingerprint: str,
    out_h5: str | Path,
    partial_h5: str | Path,
    config: dict,
    *,
    tower=None,
    image_processor=None,
    device: torch.device | str | None = None,
    progress: bool = True,
    jobs_per_node: int = 1,
) -> dict:
    """Fill `out_h5` with the rows of every frame of the shard (resuming `partial_h5`); returns stats.

    `jobs_per_node`: GPU jobs sharing this node's cores (sizes `cache.loader_workers: auto`).

    `tower`, `image_processor`, `device`: ready ones (tests, validation); by default built from config on
    spatial.device (the precompute jobs' device setting) exactly as training builds them."""
    from vlnflow.model.loading import frame_geometry, load_processors, resolve_model_config
    from vlnflow.model.vision_rows import build_tower, tower_digest, tower_rows
    from vlnflow.spatial.encoder import resolve_device

    started, started_at = time.perf_counter(), time.time()
    table = pd.read_parquet(shard_parquet, columns=["sample_id", "frames"])
    frames = unique_frames([list(f) for f in table.frames])
    model_cfg = resolve_model_config(config)
    geometry = frame_geometry(config)
    device = torch.device(device) if device is not None else resolve_device(config["spatial"].get("device", "auto"))
    if image_processor is None:
        _, image_processor = load_processors(model_cfg, geometry)
    tower = tower if tower is not None else build_tower(model_cfg, device)
    digest = tower_digest(tower)
    cache_cfg = config["cache"]
    writer_args = dict(
        grid=geometry.kept_grid, channels=int(tower.config.hidden_size), dtype=cache_cfg["vision_dtype"],
        compression=cache_cfg["compression"], encoder_fingerprint=vision_fingerprint(config),
        shard_fingerprint=shard_fingerprint, layer=int(tower.config.depth) - 1,
    )
    writer = ShardWriter(out_h5, partial_h5, frames, **writer_args)
    if writer.file.attrs.get(TOWER_DIGEST, digest) != digest:  # same settings, other weights (random init on another device)
        log.info("partial file %s was written by another tower (digest): starting over", partial_h5)
        writer.close()
        Path(partial_h5).unlink()
        writer = ShardWriter(out_h5, partial_h5, frames, **writer_args)
    writer.file.attrs[TOWER_DIGEST] = digest
    with writer:
        pending = writer.pending
        size = int(cache_cfg["vision_batch"])
        batches = [pending[i : i + size] for i in range(0, len(pending), size)]
        workers = loader_workers(cache_cfg["loader_workers"], jobs_per_node)
        loader = DataLoader(
            ShardImages(Path(config["dataset"]["root"]), frames, batches, geometry, image_processor),
            batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        n_done = n_skipped = 0
        compute_s = data_wait = 0.0
        with tqdm(total=len(pending), unit="frame", desc=Path(out_h5).stem, disable=not progress, smoothing=0.1) as bar, \
                BackgroundWriter(writer) as background:
            loop_started = time.perf_counter()
            it = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                data_wait += time.perf_counter() - t0
                if batch is None:
                    break
                n_skipped += background.skip_errors(batch.errors, config["dataset"]["on_error"])
                if batch.rows:
                    t0 = time.perf_counter()
                    start = timing_event(device)
                    pixels = batch.pixel_values.to(device, non_blocking=True)
                    with torch.inference_mode():
                        rows = torch.stack(tower_rows(tower, pixels, batch.grid_thw))
                    host, end = to_host_async(rows)
                    compute_s += time.perf_counter() - t0
                    background.write(batch.rows, host, (start, end))
                    n_done += len(batch.rows)
                bar.update(len(batch.rows) + len(batch.errors))
        loop_s = time.perf_counter() - loop_started
        writer.finalize()
    wall = time.perf_counter() - started
    from vlnflow.cache.format import bytes_per_sample

    stats = {
        "shard": Path(out_h5).stem,
        "samples": len(table),
        "frames": len(frames),
        "frame_refs": int(sum(len(f) for f in table.frames)),  # frames over all samples' histories (what live encodes)
        "computed": n_done,
        "resumed": len(frames) - len(pending),
        "skipped": n_skipped,
        "bytes_per_frame": bytes_per_sample(geometry.feature_tokens, writer_args["channels"], writer_args["dtype"]),
        "dtype": writer_args["dtype"],
        "wall_s": wall,
        "encode_s": compute_s,
        "frames_per_s": n_done / wall if wall > 0 else 0.0,
        "loop_s": loop_s,
        "loop_frames_per_s": n_done / loop_s if loop_s > 0 else 0.0,
        "setup_s": loop_started - started,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "started_at": started_at,
        "finished_at": time.time(),
        "time_split_s": {"data_wait": data_wait, "compute": compute_s, "write_wait": background.wait_s,
                         "device_busy": background.device_s if device.type == "cuda" else compute_s,
                         "writer_hdf5": background.hdf5_s},
    }
    log.info("precompute_vision %s: %s", stats["shard"], stats)
    return stats
