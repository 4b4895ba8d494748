"""VGGT input preprocessing as JanusVLN's training pipeline does it ("pad" mode).

The longer side is resized to `target_size`, the other to the multiple of 14
nearest to the proportional size (computed in the same float order as the
reference: 480 * (644 / 640) = 483.00000000000006, so a 640x480 frame becomes
644x490, not 644x476), PIL bicubic, then padded with white (1.0) to a
target_size square. RGBA is composited on white first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlnflow.errors import DatasetError

PATCH = 14


def pad_mode_size(width: int, height: int, target_size: int) -> tuple[int, int]:
    """(new_width, new_height) before padding; the float expression order matters (see module doc)."""
    if width >= height:
        return target_size, round(height * (target_size / width) / PATCH) * PATCH
    return round(width * (target_size / height) / PATCH) * PATCH, target_size


def to_rgb(img: Image.Image) -> Image.Image:
    """RGBA composited on white, then any mode converted to RGB."""
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def preprocess_image(img: Image.Image, target_size: int, source: str = "<image>") -> torch.Tensor:
    """A PIL image -> float32 tensor (3, target_size, target_size) in [0, 1], white-padded."""
    if target_size <= 0 or target_size % PATCH:
        raise ValueError(f"spatial.image_size must be a positive multiple of {PATCH}, got {target_size}")
    img = to_rgb(img)
    new_w, new_h = pad_mode_size(*img.size, target_size)
    if new_w <= 0 or new_h <= 0:
        raise DatasetError(f"frame {source} of size {img.size} is too narrow to resize to {target_size}", path=source)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
    pad_h, pad_w = target_size - new_h, target_size - new_w
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=1.0)
    return x.contiguous()


def load_frame(path: str | Path, target_size: int) -> torch.Tensor:
    """Read an image file and preprocess it: (3, target_size, target_size) float32 in [0, 1]."""
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess_image(img, target_size, str(path))
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read frame image {path}: {exc}", path=str(path)) from exc
