"""Training samples for the DataLoader: per-sample work (frames, tokens, cached features) in workers.

A sample whose features are not in the cache carries its VGGT frames instead, and the
trainer encodes it live in the main process (counted and logged). With the per-frame vision
cache (vlnflow.train.vision_source), a sample whose frames it all holds carries their Qwen
vision rows instead of decoded, processed images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from vlnflow.model.batching import Collator, EncodedSample
from vlnflow.train.spatial_source import SpatialSource


@dataclass
class TrainItem:
    encoded: EncodedSample
    features: torch.Tensor | None  # cached [P, C], or None -> encode `vggt_frames` live
    vggt_frames: torch.Tensor | None  # [S, 3, H, W] in [0, 1], only when features is None


class TrainSamples(Dataset):
    """Rows of samples.parquet -> TrainItem."""

    def __init__(self, samples: pd.DataFrame, collator: Collator, source: SpatialSource, dataset_root: str | Path,
                 vision=None):
        """`vision`: a VisionSource (cached Qwen vision rows per frame), or None to run the tower for every frame."""
        self.rows = samples.to_dict("records")
        self.collator = collator
        self.source = source
        self.root = Path(dataset_root)
        self.vision = vision

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> TrainItem:
        row = self.rows[i]
        vision_rows = self.vision.rows(row["frames"]) if self.vision is not None else None
        encoded = self.collator.encode(row, vision_rows=vision_rows)
        features = self.source.lookup(row["sample_id"])
        frames = None
        if features is None:
            from vlnflow.spatial.preprocess import load_frame

            frames = torch.stack([load_frame(self.root / rel, geometry=self.collator.geometry) for rel in row["frames"]])
        return TrainItem(encoded, features, frames)


def keep_items(items: list[TrainItem]) -> list[TrainItem]:
    """collate_fn: hand the items through; packing happens after live features are filled in."""
    return items


def micro_batches(n_samples: int, per_device: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded permutation, split evenly across ranks
    (the tail that does not fill a global micro-step is dropped), so resume can skip exactly."""
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    step = per_device * world
    usable = (n_samples // step) * step
    return [order[start + rank * per_device : start + (rank + 1) * per_device] for start in range(0, usable, step)]
