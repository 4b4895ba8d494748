"""Reference "pad" preprocessing: 640x480 -> 644x490 -> white-padded 644x644."""

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
