"""One block-causal pass equals frame-by-frame streaming; encode_indexed equals encode; frame order."""


from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlnflow.spatial import SpatialEncoder
from vlnflow.spatial.aggregator import AggregatorConfig, StreamCache
from vlnflow.spatial.attention import block_causal_attention
from vlnflow.spatial.init import build_aggregator, init_random_

FIXTURES = Path(__file__).parent / "fixtures" / "vggt_parity"

CONFIGS = {
    "dinov2": AggregatorConfig(embed_dim=32, depth=3, num_heads=2, dino_depth=2, dino_heads=2, dino_pos_grid=5),
    "conv-deeper": AggregatorConfig(embed_dim=48, depth=4, num_heads=3, patch_embed="conv"),
    "dinov2-wide-heads": AggregatorConfig(embed_dim=64, depth=2, num_heads=4, dino_depth=1, dino_heads=4, dino_pos_grid=3),
}


def streamed(model, frames, layer):
    out = []
    for sample in frames:
        cache = StreamCache()
        for frame in sample:
            kept = model.stream_frame(frame[None], cache, layers=[layer])[0]
        out.append(kept[0, model.patch_start_idx :])
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 5), (3, 2), (2, 7)])
def test_block_causal_pass_equals_streaming(name, batch, frames):
    model = init_random_(build_aggregator(CONFIGS[name]), seed=batch * 10 + frames).double().eval()
    gen = torch.Generator().manual_seed(frames)
    x = torch.rand(batch, frames, 3, 42, 56, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        for layer in (-2, -1, 0):
            keep = model.layer_index(layer)
            patches = model.embed(x.flatten(0, 1)).unflatten(0, (batch, frames))
            fast = model.last_frame_features(patches, (3, 4), layer)
            full = model(x, layers=[layer])[0][:, -1, model.patch_start_idx :]
            ref = streamed(model, x, keep)
            assert fast.shape == (batch, 12, 2 * model.config.embed_dim)
            assert (fast - ref).abs().max() <= 1e-10 * ref.abs().max()
            assert (full - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_every_frame_of_full_pass_equals_its_stream_step():
    model = init_random_(build_aggregator(CONFIGS["dinov2"]), seed=5).double().eval()
    x = torch.rand(2, 4, 3, 28, 42, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(x)
        for b in range(2):
            cache = StreamCache()
            for f in range(4):
                layers = model.stream_frame(x[b, f][None], cache)
                for i, layer in enumerate(layers):
                    assert torch.allclose(layer[0], full[i][b, f], atol=1e-11, rtol=0)


def test_prefix_attention_equals_masked_attention():
    gen = torch.Generator().manual_seed(0)
    b, s, t, h, d = 2, 3, 5, 2, 8
    q, k, v = (torch.randn(b * s, t, h, d, generator=gen, dtype=torch.float64) for _ in range(3))
    out = block_causal_attention(q, k, v, s)
    frame = torch.arange(s * t) // t
    mask = frame[None, :] <= frame[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(y.reshape(b, s * t, h, d).transpose(1, 2) for y in (q, k, v)), attn_mask=mask
    ).transpose(1, 2).reshape(b * s, t, h, d)
    assert torch.allclose(out, ref, atol=1e-12)
    with pytest.raises(ValueError, match="backend"):
        block_causal_attention(q, k, v, s, backend="dense")


def tiny_encoder(**kw):
    cfg = {"preset": "tiny", "seed": 7, "image_size": 56, "device": "cpu", **kw}
    return SpatialEncoder.from_config(cfg)


@pytest.mark.parametrize("reference_frame", ["first", "last"])
def test_encode_indexed_equals_encode_exactly(reference_frame):
    enc = tiny_encoder(reference_frame=reference_frame)
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 56, 56, generator=gen)
    index = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [1, 3, 5, 5, 2]])
    a = enc.encode(images[index])
    b = enc.encode_indexed(images, index)
    assert a.shape == (3, 16, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.equal(a, enc.encode_streaming(images[index]))
    with pytest.raises(Exception, match="image 6"):
        enc.encode_indexed(images, torch.tensor([[0, 6]]))


@pytest.mark.parametrize("reference_frame", ["first", "last"])
def test_crop_frames_through_the_encoder_equal_streaming_cut_to_merge_blocks(reference_frame):
    """640x480 crop frames at 56: a 42x56 input (3x4 patches, DINOv2's table resampled to a non-square grid);
    every path gives the streamed last frame's layer -2 map cut to the first 2 rows (whole 2x2 blocks)."""
    enc = tiny_encoder(reference_frame=reference_frame, preprocess="crop", frame_size=[640, 480])
    assert enc.geometry.vggt_hw == (42, 56) and enc.grid == (2, 4) and enc.feature_shape == (8, 64)
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(5, 3, 42, 56, generator=gen)
    index = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 4, 1]])
    a = enc.encode(images[index])
    assert a.shape == (3, 8, 64)
    assert torch.equal(a, enc.encode_indexed(images, index))
    assert torch.equal(a, enc.encode_streaming(images[index]))
    frames = images[index].flip(1) if reference_frame == "last" else images[index]
    with torch.inference_mode():
        full = streamed(enc.model, frames, enc.layer).view(3, 3, 4, 64)  # the whole 3x4 grid
    assert torch.allclose(a, full[:, :2].reshape(3, 8, 64), atol=1e-5, rtol=1e-5)


def fixture_encoder(tmp_path, reference_frame):
    """A tiny encoder loading the DINOv2 fixture's weights through the checkpoint path."""
    tensors = load_file(str(FIXTURES / "vggt_parity_dinov2reg.safetensors"))
    state = {"aggregator." + k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = {"preset": "tiny", "weights": str(tmp_path), "image_size": 56, "device": "cpu", "reference_frame": reference_frame}
    return SpatialEncoder.from_config(cfg), tensors


def test_reference_frame_semantics_on_fixture(tmp_path, monkeypatch):
    monkeypatch.setenv("VLNFLOW_CACHE_DIR", str(tmp_path / "digests"))
    first, t = fixture_encoder(tmp_path, "first")
    last, _ = fixture_encoder(tmp_path, "last")
    images = t["inputs.images"].float()
    expected = t["outputs.stream_patch_tokens_m2"][:, -1]  # frames streamed in stored order
    out_first = first.encode(images)
    assert ((out_first - expected).abs().max() / expected.abs().max()) <= 1e-4
    # last = the frames reversed before streaming: equals streaming the reversed input oldest-first
    out_last = last.encode(images)
    assert torch.allclose(out_last, first.encode_streaming(images.flip(1)), atol=1e-5, rtol=0)
    assert torch.allclose(out_last, last.encode_streaming(images), atol=1e-5, rtol=0)
    assert (out_last - out_first).abs().max() > 1e-2 * out_first.abs().max()
    assert first.fingerprint() != last.fingerprint()
