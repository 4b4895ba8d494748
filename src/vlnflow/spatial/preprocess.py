"""VGGT input preprocessing as JanusVLN does it: VGGT's `load_and_preprocess_images`, mode "crop" or "pad".

`prepared_image` returns the resized (and centre-cropped, or white-padded) RGB image; `preprocess_image` turns it
into the float32 tensor in [0, 1] VGGT gets (uint8 / 255, as torchvision's ToTensor divides), and Qwen's image is
the same prepared image cut to whole merge blocks (vlnflow.model.frames). Sizes follow
vlnflow.spatial.geometry.resized_size: the longer side (pad) or the width (crop) becomes the target, the other
side round(side * (target / long) / 14) * 14 in the reference's float order (640x480 -> 644x490), PIL bicubic.
crop: rows above the target are centre-cropped (start (h - target) // 2), no padding. pad: white (255 / 1.0) to a
target square, the odd pixel at the bottom / right. RGBA is composited on white first, as the reference does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlnflow.errors import DatasetError
from vlnflow.spatial.geometry import MODES, PATCH, resized_size

WHITE = (255, 255, 255)


def pad_mode_size(width: int, height: int, target_size: int) -> tuple[int, int]:
    """(new_width, new_height) before padding (pad mode); see geometry.resized_size."""
    return resized_size(width, height, target_size, "pad")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGBA composited on white, then any mode converted to RGB."""
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def prepared_image(img: Image.Image, target_size: int, preprocess: str = "pad", source: str = "<image>") -> Image.Image:
    """RGB PIL image exactly as VGGT sees it (before the division by 255): crop -> target wide, at most target
    high; pad -> target x target."""
    if target_size <= 0 or target_size % PATCH:
        raise ValueError(f"spatial.image_size must be a positive multiple of {PATCH}, got {target_size}")
    if preprocess not in MODES:
        raise ValueError(f"spatial.preprocess must be one of {MODES}, got {preprocess!r}")
    img = to_rgb(img)
    new_w, new_h = resized_size(*img.size, target_size, preprocess)
    if new_w <= 0 or new_h <= 0:
        raise DatasetError(
            f"frame {source} of size {img.size[0]}x{img.size[1]} is too narrow to resize to {target_size} ({preprocess})",
            path=source,
        )
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if preprocess == "crop":
        if new_h > target_size:
            top = (new_h - target_size) // 2
            img = img.crop((0, top, new_w, top + target_size))
        return img
    if (new_w, new_h) == (target_size, target_size):
        return img
    canvas = Image.new("RGB", (target_size, target_size), WHITE)
    canvas.paste(img, ((target_size - new_w) // 2, (target_size - new_h) // 2))
    return canvas


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB -> float32 (3, H, W) in [0, 1]: value / 255 in float32, as torchvision's ToTensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1).contiguous()


def preprocess_image(img: Image.Image, target_size: int, source: str = "<image>", preprocess: str = "pad") -> torch.Tensor:
    """A PIL image -> float32 tensor (3, H, W) in [0, 1]: (target, target) in pad mode, (<= target, target) in crop."""
    return to_tensor(prepared_image(img, target_size, preprocess, source))


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully; an unreadable one is a DatasetError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read frame image {path}: {exc}", path=str(path)) from exc


def check_shape(x, expect_hw: tuple[int, int] | None, path, preprocess: str, frame_size) -> None:
    """A frame whose preprocessed (H, W) is not the run's geometry is an error naming it (the cache has one shape)."""
    hw = (x.shape[-2], x.shape[-1]) if torch.is_tensor(x) else (x.size[1], x.size[0])
    if expect_hw is not None and tuple(hw) != tuple(expect_hw):
        raise DatasetError(
            f"frame {path} gives a {hw[0]}x{hw[1]} {preprocess} image, but spatial.frame_size "
            f"{frame_size[0]}x{frame_size[1]} gives {expect_hw[0]}x{expect_hw[1]}: every frame of a data set must have "
            f"one size; set spatial.frame_size to it (width, height)", path=str(path),
        )


def load_frame(path: str | Path, target_size: int | None = None, preprocess: str = "pad", geometry=None) -> torch.Tensor:
    """Read an image file and preprocess it for VGGT: float32 (3, H, W) in [0, 1].

    `geometry` (vlnflow.spatial.geometry.FrameGeometry) checks the result has the run's (H, W) and gives the
    mode and target instead of the two arguments.
    """
    if geometry is not None:
        target_size, preprocess = geometry.target, geometry.mode
    elif target_size is None:
        raise TypeError("load_frame needs a target_size or a geometry")
    x = preprocess_image(open_rgb(path), target_size, str(path), preprocess)
    if geometry is not None:
        check_shape(x, geometry.vggt_hw, path, preprocess, geometry.frame_size)
    return x
