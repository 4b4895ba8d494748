"""Inputs for the collator- and model-level tests: random 64x48 PNG frames and samples.parquet-style rows.

Every such test draws its frames the same way (one generator seeded 0, frame after frame), so a frame file of the
same name holds the same pixels in every test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FRAME_SIZE = (64, 48)  # width, height: FrameGeometry("pad", 56, FRAME_SIZE) gives a 4x4 patch grid


def write_random_frames(root: Path, n: int, size: tuple[int, int] = FRAME_SIZE, seed: int = 0) -> Path:
    """root/f0.png .. f{n-1}.png of uniform random RGB noise; returns root."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / f"f{i}.png")
    return root


def index_row(sample_id: str, frames: list[str], **extra) -> dict:
    """A samples.parquet row of episode "e" with the seed's description fields; `extra` overrides any field."""
    base = dict(sample_id=sample_id, episode_id="e", frames=frames, instruction="walk to the table", action="MOVE_FORWARD",
                prompt=None, answer=None, sub_instruction="walk forward", description_2d="a table",
                description_3d="one meter ahead", source_format="episodes")
    return {**base, **extra}
