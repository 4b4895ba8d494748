"""samples.parquet rows + their spatial features -> one packed training batch.

Samples are PACKED into a single row (no padding, no attention mask): the model gets
per-sample boundaries (`cu_seqlens`) and restarts positions at every sample, so
attention never crosses samples (exact with transformers' sdpa packed mask and with
the varlen attention of `packed_attention`). Padding would force a dense mask on
SDPA, measured slower per sample than batch 1 (docs/design.md, "Measured facts").

Batch keys (tensors on CPU; the trainer moves them):
  input_ids [1, T], labels [1, T] (-100 off the answers), mm_token_type_ids [1, T]
  cu_seqlens [B+1] int32, max_seqlen int, seq_lens list[int] (the same lengths on the host), label_positions [L] (index p: predict
  labels[p] from position p-1; never a sample's first token)
  label_segments [L] (answer segment of each label token, vlnflow.model.segments)
  head_positions [B] (where the action head reads: the token before a sample's first
  label; the last token of a sample without labels, i.e. a prompt at inference)
  action_labels [B] (the sample's action id, the seed's mapping)
  pixel_values [patches, 3*2*14*14], image_grid_thw [images, 3], image_sample_index [images]
  spatial_features [B, P, C], sample_ids list[str]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlnflow.errors import DatasetError
from vlnflow.model.chat import IGNORE_INDEX, conversation, tokenize_conversation
from vlnflow.model.frames import load_qwen_frame
from vlnflow.model.segments import ACTION_SEGMENT, action_id, answer_segments
from vlnflow.spatial.geometry import FrameGeometry


@dataclass
class EncodedSample:
    """One sample ready to pack: tokens, labels and Qwen pixel patches of its frames."""

    sample_id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # [patches, 1176]
    image_grid_thw: torch.Tensor  # [frames, 3]
    segments: list[int] | None = None  # answer segment per label token; None: one segment (the action)
    action: int | None = None  # action id for the head (STOP 0 .. TURN_RIGHT 3); None: no head label (ignored)


class Collator:
    """`Collator(tokenizer, image_processor, geometry, dataset_root=...)(rows, features) -> batch`.

    `encode(row)` does the per-sample work (frames, processor, tokens) and can run in a
    DataLoader worker; `pack(encoded, features)` joins samples into one batch. Frames are
    prepared by `geometry` (vlnflow.spatial.geometry: crop or pad), the same way VGGT's are.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        geometry: FrameGeometry,
        *,
        dataset_root: str | Path,
        load_frame: Callable[[Path, FrameGeometry], Any] = load_qwen_frame,
    ):
        if not isinstance(geometry, FrameGeometry):
            raise TypeError(f"Collator takes the run's FrameGeometry (vlnflow.spatial.geometry), got {type(geometry).__name__}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.geometry = geometry
        self.root = Path(dataset_root)
        self.load_frame = load_frame
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self.grid_thw = [1, *geometry.kept_grid]

    def __call__(self, rows: Sequence[Mapping[str, Any]], features: Sequence[torch.Tensor] | torch.Tensor) -> dict:
        return self.pack([self.encode(row) for row in rows], features)

    def encode(self, row: Mapping[str, Any]) -> EncodedSample:
        sample_id = str(row["sample_id"])
        frames = list(row["frames"]) if row.get("frames") is not None else []
        if not frames:
            raise DatasetError(f"sample {sample_id!r} has no frames", episode=row.get("episode_id"))
        images = [self.load_frame(self.root / f, self.geometry) for f in frames]
        processed = self.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        if grid.tolist() != [self.grid_thw] * len(frames):
            raise DatasetError(
                f"sample {sample_id!r}: Qwen's processor gave image grids {grid.tolist()}, but the frame geometry "
                f"({self.geometry.describe()}) needs {self.grid_thw} per frame: the image processor is not pinned to "
                f"{self.geometry.qwen_hw[0]}x{self.geometry.qwen_hw[1]}", episode=row.get("episode_id"),
            )
        counts = (grid.prod(-1) // (self.merge * self.merge)).tolist()
        prompt, answer = conversation(row, len(frames))
        input_ids, labels = tokenize_conversation(self.tokenizer, prompt, answer, counts)
        try:
            segments = answer_segments(self.tokenizer, answer, [t for t in labels if t != IGNORE_INDEX])
        except ValueError as exc:
            raise DatasetError(f"sample {sample_id!r}: {exc}", episode=row.get("episode_id")) from None
        return EncodedSample(sample_id, input_ids, labels, processed["pixel_values"], grid, segments, action_id(row, answer))

    def pack(self, samples: Sequence[EncodedSample], features: Sequence[torch.Tensor] | torch.Tensor) -> dict:
        if len(samples) != len(features):
            raise ValueError(f"{len(samples)} samples but {len(features)} spatial feature maps")
        return {**self.pack_tokens(samples), "spatial_features": stack_features([s.sample_id for s in samples], features)}

    def pack_tokens(self, samples: Sequence[EncodedSample]) -> dict:
        """Every batch key except `spatial_features` (for workers, where live samples have no features yet)."""
        lengths = [len(s.input_ids) for s in samples]
        cu = np.concatenate([[0], np.cumsum(lengths)])
        input_ids = torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.long)[None]
        labels = torch.tensor([t for s in samples for t in s.labels], dtype=torch.long)[None]
        supervised = labels[0] != IGNORE_INDEX
        supervised[torch.as_tensor(cu[:-1], dtype=torch.long)] = False  # a sample's first token has no context
        label_positions = supervised.nonzero().squeeze(1)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32),
            "cu_seqlens": torch.as_tensor(cu, dtype=torch.int32),
            "max_seqlen": int(max(lengths)),
            "seq_lens": lengths,  # host ints (FLOP counts without reading cu_seqlens back from the GPU)
            "label_positions": label_positions,
            "label_segments": label_segments(samples, len(label_positions)),
            "head_positions": torch.tensor([int(start) + head_position(s) for start, s in zip(cu[:-1], samples)]),
            "action_labels": torch.tensor([IGNORE_INDEX if s.action is None else s.action for s in samples]),
            "pixel_values": torch.cat([s.pixel_values for s in samples]),
            "image_grid_thw": torch.cat([s.image_grid_thw for s in samples]),
            "image_sample_index": torch.cat(
                [torch.full((len(s.image_grid_thw),), i, dtype=torch.long) for i, s in enumerate(samples)]
            ),
            "sample_ids": [s.sample_id for s in samples],
        }


def head_position(sample: EncodedSample) -> int:
    """Where the action head reads in the sample's own sequence: the token before its first label (training),
    or its last token when it has no labels (a prompt at inference); the same token either way."""
    first = next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), None)
    if first is None:
        return len(sample.input_ids) - 1
    if first == 0:
        raise DatasetError(f"sample {sample.sample_id!r}: its first token is a label, no prompt precedes the answer")
    return first - 1


def label_segments(samples: Sequence[EncodedSample], n_labels: int) -> torch.Tensor:
    """[L] segment ids of the packed label positions, in position order (each sample's labels in order)."""
    ids: list[int] = []
    for s in samples:
        n = sum(1 for label in s.labels if label != IGNORE_INDEX)
        if s.segments is not None and len(s.segments) != n:
            raise ValueError(f"sample {s.sample_id!r}: {len(s.segments)} segment ids for {n} label tokens")
        ids.extend(s.segments if s.segments is not None else [ACTION_SEGMENT] * n)
    if len(ids) != n_labels:
        raise ValueError(f"{len(ids)} segment ids for {n_labels} label positions")
    return torch.tensor(ids, dtype=torch.long)


def stack_features(sample_ids: Sequence[str], features) -> torch.Tensor:
    """[B, P, C] from one [P, C] map per sample; every map must have the same shape."""
    maps = [torch.as_tensor(f) for f in features]
    first = maps[0].shape
    for sample_id, fmap in zip(sample_ids, maps):
        if fmap.dim() != 2 or fmap.shape != first:
            raise DatasetError(
                f"sample {sample_id!r}: spatial feature shape {tuple(fmap.shape)} differs from "
                f"{tuple(first)} (expected [grid_h*grid_w, channels] for every sample)"
            )
    return torch.stack(maps)
