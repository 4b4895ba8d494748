"""Load a frame as the padded square image JanusVLN gives both VGGT and Qwen.

JanusVLN preprocesses each frame once (VGGT's `load_and_preprocess_images`, mode
"pad", target 644): RGBA composited on white, the longer side resized to the target
with bicubic filtering, the shorter one to round(short * (target / long) / 14) * 14
(that float expression: 640x480 -> 644x490), then padded with white to a square,
the padding split evenly (odd pixel at the bottom/right). Qwen's processor then gets
that same square at min_pixels = max_pixels = target^2, so no further resizing.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vlnflow.errors import DatasetError
from vlnflow.spatial.preprocess import pad_mode_size, to_rgb

WHITE = (255, 255, 255)


def load_padded_frame(path: str | Path, size: int) -> Image.Image:
    """RGB `size` x `size` PIL image: resized to fit, padded with white (see module doc)."""
    try:
        with Image.open(path) as raw:
            raw.load()
            image = to_rgb(raw)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read frame {path}: {exc}", path=str(path)) from exc
    return pad_to_square(image, size)


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is `size` (shorter side a multiple of 14), pad with white to a square."""
    new_w, new_h = (min(v, size) for v in pad_mode_size(*image.size, size))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if (new_w, new_h) == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas

