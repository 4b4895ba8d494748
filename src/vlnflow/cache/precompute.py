"""Compute one shard's cached VGGT features: decode frames in DataLoader workers, encode on the GPU.

Samples of one episode share most frames, so each batch loads every unique frame
once and the encoder runs DINOv2 once per unique image (`encode_indexed`).
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

from vlnflow.cache.writer import ShardWriter
from vlnflow.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass
class LoadedBatch:
    """What a worker hands the encoder: rows that loaded, their unique images and per-row frame indices."""

    rows: list[int]
    images: torch.Tensor  # [U, 3, H, W] in [0, 1]
    frame_index: torch.Tensor  # [len(rows), S] into images
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it could not be loaded


def make_batches(pending: list[int], frame_counts: list[int], batch_size: int) -> list[list[int]]:
    """Group pending rows into batches of equal frame count (one block-causal pass needs one S),
    keeping dataset order inside each group so consecutive steps of an episode share frames."""
    by_count: dict[int, list[int]] = {}
    for row in pending:
        by_count.setdefault(frame_counts[row], []).append(row)
    batches = []
    for count in sorted(by_count):
        group = by_count[count]
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


class ShardFrames(Dataset):
    """Item i = batch i, its unique frames decoded and preprocessed once."""

    def __init__(self, root: Path, sample_ids: list[str], frames: list[list[str]], batches: list[list[int]], image_size: int):
        self.root, self.sample_ids, self.frames, self.batches, self.image_size = root, sample_ids, frames, batches, image_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> LoadedBatch:
        from vlnflow.spatial.preprocess import load_frame

        loaded: dict[str, torch.Tensor] = {}
        bad: dict[str, str] = {}
        for row in self.batches[i]:
            for rel in self.frames[row]:
                if rel in loaded or rel in bad:
                    continue
                try:
                    loaded[rel] = load_frame(self.root / rel, self.image_size)
                except Exception as exc:  # missing file, truncated PNG, not an image...
                    bad[rel] = f"{type(exc).__name__}: {exc}"
        rows, index, errors = [], [], {}
        order = {rel: k for k, rel in enumerate(loaded)}
        for row in self.batches[i]:
            broken = [rel for rel in self.frames[row] if rel in bad]
            if broken:
                errors[row] = f"sample {self.sample_ids[row]}: cannot read image {self.root / broken[0]} ({bad[broken[0]]})"
                continue
            rows.append(row)
            index.append([order[rel] for rel in self.frames[row]])
        images = torch.stack(list(loaded.values())) if loaded else torch.empty(0)
        width = len(self.frames[self.batches[i][0]])  # one frame count per batch (make_batches); explicit for a batch with no good row
        return LoadedBatch(rows, images, torch.tensor(index, dtype=torch.long).reshape(len(rows), width), errors)


def precompute_shard(
    shard_parquet: str | Path,
    shard_fingerprint: str,
    out_h5: str | Path,
    partial_h5: str | Path,
    config: dict,
    *,
    encoder=None,
    progress: bool = True,
) -> dict:
    """Fill `out_h5` with every sample of the shard (resuming `partial_h5` if present); returns stats."""
    from vlnflow.spatial import SpatialEncoder

    started = time.perf_counter()
    table = pd.read_parquet(shard_parquet)
    sample_ids = table.sample_id.tolist()
    frames = [list(f) for f in table.frames]
    encoder = encoder or SpatialEncoder.from_config(config["spatial"])
    cache_cfg = config["cache"]
    writer = ShardWriter(
        out_h5,
        partial_h5,
        sample_ids,
        grid=encoder.grid,
        channels=encoder.feature_shape[1],
        dtype=cache_cfg["dtype"],
        compression=cache_cfg["compression"],
        encoder_fingerprint=encoder.fingerprint(),
        shard_fingerprint=shard_fingerprint,
        layer=config["spatial"]["layer"],
    )
    with writer:
        pending = writer.pending
        batches = make_batches(pending, [len(f) for f in frames], config["spatial"]["batch_size"])
        dataset = ShardFrames(Path(config["dataset"]["root"]), sample_ids, frames, batches, config["spatial"]["image_size"])
        workers = cache_cfg["loader_workers"]
        device = encoder.device
        loader = DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
        n_skipped = n_done = 0
        encode_s = 0.0
        bar = tqdm(total=len(pending), unit="sample", desc=Path(out_h5).stem, disable=not progress, smoothing=0.1)
        for batch in loader:
            for row, why in batch.errors.items():
                if config["dataset"]["on_error"] == "fail":
                    raise DatasetError(why)
                log.warning("skipped %s", why)
                writer.skip(row, why)
                n_skipped += 1
            if batch.rows:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    feats = encoder.encode_indexed(
                        batch.images.to(device, non_blocking=True), batch.frame_index.to(device, non_blocking=True)
                    )
                feats = feats.cpu()
                encode_s += time.perf_counter() - t0
                writer.write(batch.rows, feats)
                n_done += len(batch.rows)
            bar.update(len(batch.rows) + len(batch.errors))
        bar.close()
        writer.finalize()
    wall = time.perf_counter() - started
    stats = {
        "shard": Path(out_h5).stem,
        "samples": len(sample_ids),
        "computed": n_done,
        "resumed": len(sample_ids) - len(pending),
        "skipped": n_skipped,
        "frames": int(sum(len(frames[r]) for b in batches for r in b)),
        "wall_s": wall,
        "encode_s": encode_s,
        "samples_per_s": n_done / wall if wall > 0 else 0.0,
    }
    log.info("precompute %s: %s", stats["shard"], stats)
    return stats
