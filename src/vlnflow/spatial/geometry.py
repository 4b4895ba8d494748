"""Frame geometry: the one place where a frame's size becomes the VGGT input, the cached grid and the Qwen image.

JanusVLN prepares every frame once with VGGT's `load_and_preprocess_images` (target 644) and gives both models
that result (upstream `data_qwen.py` process_image_unified_vggt; the seed's `vln_data.py`):

* `crop` (upstream's default; upstream training, and every JanusVLN evaluation and DAgger script): the width
  becomes the target and the height round(h * (target / w) / 14) * 14, bicubic; a height above the target is
  centre-cropped to it. 640x480 -> 644 wide x 490 high, a 35x46 patch grid.
* `pad` (the seed's VLN training loader): the longer side becomes the target, the other side is rounded the same
  way, then white padding to a target x target square. 640x480 -> 644x644, a 46x46 grid.

Qwen gets that same image cropped (top-left) to whole 2x2 merge blocks, and the kept VGGT feature (layer -2
patch tokens) is cropped the same way before the 2x2 spatial merger, so both give one token per merge block:
crop 34x46 patches = 391 tokens per frame; pad 46x46 = 529. vlnflow pins Qwen's processor to that exact size
(min_pixels = max_pixels), so it never resizes: for 640x480 this is what upstream's bounds (16*28*28 ..
576*28*28 pixels) give too.

Every frame of a run has one geometry (the cache stores fixed-shape maps). In crop mode it depends on the
frames' size, declared as `spatial.frame_size` (width, height; R2R-CE / RxR-CE: 640x480); a frame whose
preprocessed size differs is an error naming it. In pad mode every frame gives the square.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlnflow.errors import UserError

PATCH = 14  # VGGT and Qwen2.5-VL patch side (pixels)
MERGE = 2  # Qwen2.5-VL's spatial merge: 2x2 patches per LLM image token
MODES = ("crop", "pad")


def resized_size(width: int, height: int, target: int, mode: str) -> tuple[int, int]:
    """(new_width, new_height) of the bicubic resize, in the reference's float expression order.

    480 * (644 / 640) = 483.00000000000006, so 640x480 -> 644x490 in both modes (not 476: the float sits just
    above the rounding knife edge).
    """
    if mode == "pad" and height > width:
        return round(width * (target / height) / PATCH) * PATCH, target
    if mode not in MODES:
        raise UserError(f"spatial.preprocess must be one of {MODES}, got {mode!r}")
    return target, round(height * (target / width) / PATCH) * PATCH


def input_hw(width: int, height: int, target: int, mode: str) -> tuple[int, int]:
    """(height, width) of the VGGT input tensor for a width x height frame: crop keeps at most `target` rows,
    pad is always the target square."""
    if mode == "pad":
        return target, target
    return min(resized_size(width, height, target, mode)[1], target), target


def merge_crop(grid: tuple[int, int]) -> tuple[int, int]:
    """A patch grid cut down to whole 2x2 merge blocks (the reference drops an odd last row / column)."""
    return grid[0] - grid[0] % MERGE, grid[1] - grid[1] % MERGE


@dataclass(frozen=True)
class FrameGeometry:
    """What `spatial.preprocess`, `spatial.image_size` and `spatial.frame_size` imply for every frame of a run."""

    mode: str  # crop | pad
    target: int  # spatial.image_size (644 for JanusVLN)
    frame_size: tuple[int, int]  # (width, height) of the data set's frames

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"spatial.preprocess must be one of {MODES}, got {self.mode!r}")
        if self.target <= 0 or self.target % PATCH:
            raise UserError(f"spatial.image_size must be a positive multiple of {PATCH}, got {self.target}")
        w, h = self.frame_size
        if w <= 0 or h <= 0:
            raise UserError(f"spatial.frame_size must be two positive integers (width, height), got {list(self.frame_size)}")
        if min(self.vggt_hw) < PATCH or min(self.kept_grid) < 1:
            raise UserError(
                f"spatial.frame_size {w}x{h} at spatial.image_size {self.target} ({self.mode}) gives a {self.vggt_hw[0]}x"
                f"{self.vggt_hw[1]} VGGT input, too small for one {MERGE}x{MERGE} block of {PATCH}-pixel patches"
            )

    @property
    def vggt_hw(self) -> tuple[int, int]:
        """(height, width) of the VGGT input: 490x644 (crop) or 644x644 (pad) for 640x480 frames at 644."""
        return input_hw(*self.frame_size, self.target, self.mode)

    @property
    def vggt_grid(self) -> tuple[int, int]:
        """VGGT patch grid (rows, columns): 35x46 crop, 46x46 pad."""
        return self.vggt_hw[0] // PATCH, self.vggt_hw[1] // PATCH

    @property
    def kept_grid(self) -> tuple[int, int]:
        """Grid of the cached feature map and of Qwen's image: whole merge blocks (34x46 crop, 46x46 pad)."""
        return merge_crop(self.vggt_grid)

    @property
    def qwen_hw(self) -> tuple[int, int]:
        """(height, width) of the image Qwen's processor gets: 476x644 (crop), 644x644 (pad)."""
        return self.kept_grid[0] * PATCH, self.kept_grid[1] * PATCH

    @property
    def feature_tokens(self) -> int:
        """Rows of one cached feature map: 1564 (crop) or 2116 (pad)."""
        return self.kept_grid[0] * self.kept_grid[1]

    @property
    def tokens_per_frame(self) -> int:
        """LLM image tokens per frame: 391 (crop) or 529 (pad)."""
        return self.feature_tokens // (MERGE * MERGE)

    def fingerprint_fields(self) -> dict:
        """What the cached values depend on. Pad's fields are those of vlnflow before crop existed (unchanged
        fingerprints for existing caches), plus the kept grid only where an odd grid is now cropped."""
        if self.mode == "pad":
            fields = {"mode": "pad", "image_size": self.target, "resample": "bicubic", "pad": 1.0}
            if self.kept_grid != self.vggt_grid:
                fields["kept_grid"] = list(self.kept_grid)
            return fields
        return {"mode": "crop", "image_size": self.target, "resample": "bicubic", "input_hw": list(self.vggt_hw),
                "kept_grid": list(self.kept_grid)}

    def describe(self) -> str:
        w, h = self.frame_size
        return (f"{self.mode} {w}x{h} -> VGGT {self.vggt_hw[0]}x{self.vggt_hw[1]} ({self.vggt_grid[0]}x{self.vggt_grid[1]} "
                f"patches), kept {self.kept_grid[0]}x{self.kept_grid[1]}, Qwen {self.qwen_hw[0]}x{self.qwen_hw[1]}, "
                f"{self.tokens_per_frame} tokens per frame")

    def as_dict(self) -> dict:
        """The settings that rebuild this geometry (recorded in exports)."""
        return {"preprocess": self.mode, "image_size": self.target, "frame_size": list(self.frame_size)}


DEFAULT_FRAME_SIZE = (640, 480)


def geometry_of(spatial_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None) -> FrameGeometry:
    """The run's geometry from the validated `spatial` section (and `model`, whose deprecated image_size must agree)."""
    target = int(spatial_cfg.get("image_size", 56))
    legacy = (model_cfg or {}).get("image_size")
    if legacy is not None and int(legacy) != target:
        raise UserError(
            f"config setting 'model.image_size' is {legacy} but spatial.image_size is {target}: Qwen's image now follows "
            f"spatial.preprocess / spatial.image_size (vlnflow.spatial.geometry); remove model.image_size"
        )
    size = spatial_cfg.get("frame_size") or DEFAULT_FRAME_SIZE
    return FrameGeometry(str(spatial_cfg.get("preprocess", "pad")), target, (int(size[0]), int(size[1])))
