"""VGGT input preprocessing: "pad" (640x480 -> 644x490 -> white-padded 644x644) and "crop" (-> 490x644), as upstream."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from vlnflow.errors import DatasetError
from vlnflow.spatial.preprocess import load_frame, pad_mode_size, preprocess_image


def test_knife_edge_rounding_gives_490_not_476():
    assert pad_mode_size(640, 480, 644) == (644, 490)
    # exact arithmetic would round 34.5 half-to-even and give 476: the float order matters
    assert round(Fraction(480 * 644, 640) / 14) * 14 == 476
    assert pad_mode_size(640, 480, 518) == (518, 392)
    assert pad_mode_size(480, 640, 644) == (490, 644)  # portrait: width follows
    assert pad_mode_size(640, 480, 56) == (56, 42)


def test_640x480_frame_becomes_padded_644_square(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, size=(480, 640, 3), dtype=np.uint8)  # never pure white
    path = tmp_path / "frame.png"
    Image.fromarray(pixels).save(path)
    x = load_frame(path, 644)
    assert x.shape == (3, 644, 644) and x.dtype == torch.float32
    assert torch.all(x[:, :77] == 1.0) and torch.all(x[:, 567:] == 1.0)
    content = x[:, 77:567]
    assert not torch.any(content.amin(dim=(0, 2)) == 1.0)  # no content row is all white
    resized = Image.fromarray(pixels).resize((644, 490), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(content, expected)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :14, 3] = 0  # left half fully transparent
    rgba[:, 14:, 3] = 255
    x = preprocess_image(Image.fromarray(rgba, "RGBA"), 28)
    assert torch.all(x[:, :, :12] == 1.0)  # white (away from the bicubic seam)
    assert torch.allclose(x[:, :, 16:], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))


def test_grayscale_and_portrait_frames(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((640, 480), 10, dtype=np.uint8), "L").save(path)
    x = load_frame(path, 644)
    assert x.shape == (3, 644, 644)
    assert torch.all(x[:, :, :77] == 1.0) and torch.all(x[:, :, 567:] == 1.0)
    assert torch.allclose(x[:, :, 77:567], torch.full((3, 644, 490), 10 / 255))


def test_unreadable_frame_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_frame(bad, 56)
    with pytest.raises(DatasetError, match="missing.png"):
        load_frame(tmp_path / "missing.png", 56)


def test_target_size_must_be_multiple_of_14():
    with pytest.raises(ValueError, match="image_size"):
        preprocess_image(Image.new("RGB", (64, 48)), 50)


# ---- "crop" mode: upstream JanusVLN's default -----------------------------------------------------------------


def upstream_crop(image: Image.Image, target: int = 644) -> torch.Tensor:
    """A re-implementation of upstream `vggt/utils/load_fn.py::load_and_preprocess_images([image], mode="crop")`
    (MIV-XJTU/JanusVLN, target_size 644), written from its documented steps, independent of vlnflow's code:

    1. RGBA is alpha-composited on an opaque white RGBA background, then the image converts to RGB;
    2. new_width = target; new_height = round(height * (new_width / width) / 14) * 14, in that float order;
    3. PIL bicubic resize to (new_width, new_height);
    4. torchvision ToTensor: uint8 HWC -> float32 CHW divided by 255;
    5. if new_height > target: keep rows [(new_height - target) // 2, ... + target) (centre crop);
    6. no padding (one image, so the multi-shape padding step never applies).
    """
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB")
    width, height = image.size
    new_width = target
    new_height = round(height * (new_width / width) / 14) * 14
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    if new_height > target:
        start = (new_height - target) // 2
        tensor = tensor[:, start : start + target, :]
    return tensor


@pytest.mark.parametrize(
    "size, shape",
    [
        ((640, 480), (490, 644)),  # R2R-CE / RxR-CE frames: 35x46 patches
        ((480, 640), (644, 644)),  # portrait: 644 x 854 resized, centre-cropped to 644 rows
        ((1280, 720), (364, 644)),
        ((500, 375), (476, 644)),  # 375 * 1.288 = 483.0 exactly: 34.5 rounds half to even -> 476
        ((30, 20), (434, 644)),  # a tiny frame is upscaled
    ],
)
def test_crop_equals_upstream_load_and_preprocess_images(size, shape):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = upstream_crop(image)
    ours = preprocess_image(image, 644, preprocess="crop")
    assert tuple(expected.shape) == (3, *shape)
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() == 0.0
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    assert torch.equal(preprocess_image(rgba, 644, preprocess="crop"), upstream_crop(rgba))


def test_crop_geometry_of_r2r_frames():
    from vlnflow.spatial.geometry import FrameGeometry

    crop = FrameGeometry("crop", 644, (640, 480))
    assert (crop.vggt_hw, crop.vggt_grid, crop.kept_grid, crop.qwen_hw) == ((490, 644), (35, 46), (34, 46), (476, 644))
    assert (crop.feature_tokens, crop.tokens_per_frame) == (1564, 391)
    pad = FrameGeometry("pad", 644, (640, 480))
    assert (pad.vggt_hw, pad.kept_grid, pad.qwen_hw, pad.tokens_per_frame) == ((644, 644), (46, 46), (644, 644), 529)
    # the pad fingerprint fields are those vlnflow recorded before crop existed (existing caches stay valid)
    assert pad.fingerprint_fields() == {"mode": "pad", "image_size": 644, "resample": "bicubic", "pad": 1.0}
    assert crop.fingerprint_fields()["kept_grid"] == [34, 46]


def test_crop_frame_of_another_size_is_an_error_naming_it(tmp_path):
    from vlnflow.spatial.geometry import FrameGeometry

    Image.new("RGB", (1280, 720)).save(tmp_path / "wide.png")
    with pytest.raises(DatasetError, match=r"wide.png gives a 364x644 crop image, but spatial.frame_size 640x480"):
        load_frame(tmp_path / "wide.png", geometry=FrameGeometry("crop", 644, (640, 480)))
    # pad mode gives every frame the square, whatever its size
    assert load_frame(tmp_path / "wide.png", geometry=FrameGeometry("pad", 644, (640, 480))).shape == (3, 644, 644)
    with pytest.raises(DatasetError, match="too narrow"):
        preprocess_image(Image.new("RGB", (1000, 5)), 644, preprocess="crop")


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1280, 720), (500, 375), (30, 20)])
def test_qwen_grid_is_upstreams_and_matches_the_merged_vggt_feature(size):
    """Upstream gives Qwen's processor the VGGT image cut to an even patch grid, with min_pixels 16*28*28 and
    max_pixels 576*28*28 (its train.sh): the grid it makes there must be vlnflow's, and one image token per
    2x2 block of the kept VGGT feature."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # no torchvision here

    from vlnflow.model.frames import qwen_image
    from vlnflow.model.tiny import build_image_processor
    from vlnflow.spatial.geometry import FrameGeometry

    geometry = FrameGeometry("crop", 644, size)
    _, h, w = upstream_crop(Image.new("RGB", size)).shape
    h, w = h - (h // 14) % 2 * 14, w - (w // 14) % 2 * 14  # process_image_unified_vggt's even-grid crop
    up_h, up_w = smart_resize(h, w, factor=28, min_pixels=16 * 28 * 28, max_pixels=576 * 28 * 28)
    processor = build_image_processor(geometry.qwen_hw)
    image = qwen_image(Image.new("RGB", size, (90, 120, 30)), geometry)
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == [1, up_h // 14, up_w // 14] == [1, *geometry.kept_grid]
    assert grid[1] * grid[2] // 4 == geometry.tokens_per_frame == geometry.feature_tokens // 4
    if size == (640, 480):
        assert grid == [1, 34, 46] and geometry.tokens_per_frame == 391
