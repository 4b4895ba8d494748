"""Load a frame as the image Qwen's processor gets: the VGGT image, cut to whole merge blocks.

JanusVLN gives Qwen the very image VGGT sees (`load_and_preprocess_images`, crop or pad; see
vlnflow.spatial.geometry), cropped from the top-left to an even number of 14-pixel patches each way
(`process_image_unified_vggt`), with rescaling off because it is already in [0, 1]. Here the same prepared
uint8 image is cropped and handed over as PIL: its pixels are the reference's tensor x 255 exactly, and the
processor (pinned to that size) does not resize it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vlnflow.spatial.geometry import FrameGeometry
from vlnflow.spatial.preprocess import check_shape, open_rgb, prepared_image


def qwen_image(image: Image.Image, geometry: FrameGeometry, source: str = "<image>") -> Image.Image:
    """The prepared VGGT image cropped (top-left) to `geometry.qwen_hw`."""
    prepared = prepared_image(image, geometry.target, geometry.mode, source)
    check_shape(prepared, geometry.vggt_hw, source, geometry.mode, geometry.frame_size)
    qh, qw = geometry.qwen_hw
    return prepared if prepared.size == (qw, qh) else prepared.crop((0, 0, qw, qh))


def load_qwen_frame(path: str | Path, geometry: FrameGeometry) -> Image.Image:
    """Read a frame and return Qwen's RGB image of it (`geometry.qwen_hw`); errors name the file."""
    return qwen_image(open_rgb(path), geometry, str(path))
