"""Which earlier frames a sample shows the model: JanusVLN's history sampling.

For step j with H = history.max_frames: every frame 0..j while j <= H, otherwise
H+1 frames spread evenly over 0..j (numpy integer linspace, so frame 0 and the
current frame j are always included). `repeat_first` left-pads short histories
with frame 0 up to H+1 frames, as the seed's episode loader does. H = 0 means the
current frame alone.
"""

from __future__ import annotations

import functools

import numpy as np

PADS = ("none", "repeat_first")


def history_indices(j: int, max_frames: int, pad: str = "none") -> list[int]:
    """Ordered frame indices (oldest first, current frame last) for the sample at step j."""
    return list(cached_history_indices(j, max_frames, pad))


@functools.lru_cache(maxsize=65536)
def cached_history_indices(j: int, max_frames: int, pad: str = "none") -> tuple[int, ...]:
    """history_indices as an immutable tuple, memoised (the index asks for the same j in every episode)."""
    if j < 0:
        raise ValueError(f"step must be >= 0, got {j}")
    if max_frames < 0:
        raise ValueError(f"history.max_frames must be >= 0, got {max_frames}")
    if pad not in PADS:
        raise ValueError(f"history.pad must be one of {PADS}, got {pad!r}")
    if max_frames == 0:  # no history: the current frame (linspace with one point would give frame 0)
        return (j,)
    if j <= max_frames:
        indices = list(range(j + 1))
        if pad == "repeat_first":
            indices = [0] * (max_frames + 1 - len(indices)) + indices
        return tuple(indices)
    return tuple(np.linspace(0, j, max_frames + 1, dtype=int).tolist())
