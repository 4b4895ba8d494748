"""The training step's kernel choices: Liger's fused RMSNorm / SwiGLU / RoPE patched per model instance, and the
vision tower's blocks split around their attention and compiled (same function, checked here on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tiny_frames import write_random_frames
from vlnflow.errors import UserError
from vlnflow.model import fused_kernels
from vlnflow.model.batching import Collator
from vlnflow.model.loading import build_model, load_processors
from vlnflow.model.vision_fast import SplitVisionBlock, compile_vision_blocks
from vlnflow.spatial.geometry import FrameGeometry

GEOMETRY = FrameGeometry("pad", 56, (64, 48))
CFG = {"preset": "tiny", "seed": 0, "lam": 0.5, "merger_hidden": 24, "vision_fast": True, "attention": "torch",
       "compile_vision": False, "fused_kernels": "torch"}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    write_random_frames(root, 4)
    tokenizer, processor = load_processors(CFG, GEOMETRY)
    collator = Collator(tokenizer, processor, GEOMETRY, dataset_root=root)
    row = dict(episode_id="e", instruction="walk to the door", action="TURN_LEFT", prompt=None, answer=None,
               sub_instruction=None, description_2d=None, description_3d=None, source_format="episodes")
    rows = [{**row, "sample_id": f"s{i}", "frames": [f"f{j}.png" for j in range(i, i + 2)]} for i in range(2)]
    torch.manual_seed(1)
    return collator(rows, [torch.randn(16, 12) for _ in rows])


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def reference_ops(calls: dict):
    """Stand-ins with Liger's signatures computing transformers' math, counting every call."""

    def count(name, fn):
        def wrapped(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return wrapped

    def rms_norm(x, w, eps):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rope(q, k, cos, sin):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)

    return SimpleNamespace(rms_norm=count("rms_norm", rms_norm), swiglu=count("swiglu", lambda a, b: torch.nn.functional.silu(a) * b),
                           rope=count("rope", rope))


def test_fused_kernels_patch_every_llm_module_and_keep_the_function(batch):
    plain = build_model(CFG, 12, (4, 4)).train()
    fused = build_model(CFG, 12, (4, 4)).train()
    calls: dict[str, int] = {}
    counts = fused_kernels.apply_fused_kernels(fused.qwen, reference_ops(calls))
    layers = len(fused.qwen.model.language_model.layers)
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    want_loss, want = loss_and_grads(plain, batch)
    got_loss, got = loss_and_grads(fused, batch)
    # every patched module really ran its fused op, once per forward
    assert calls == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    # the vision tower is not the LLM: its RMSNorms keep transformers' forward
    assert all(not hasattr(m, "_fused") for m in fused.visual.modules())


def test_fused_kernel_choice_on_cpu():
    assert fused_kernels.resolve("auto", "cpu") == "torch"
    assert fused_kernels.resolve("torch", "cpu") == "torch"
    with pytest.raises(UserError, match="model.fused_kernels' is 'liger', but it cannot run here: .*CUDA"):
        fused_kernels.resolve("liger", "cpu")
    with pytest.raises(UserError, match="must be one of"):
        fused_kernels.resolve("triton", "cpu")


def test_an_unknown_llm_module_is_an_error_not_a_silent_miss():
    model = build_model(CFG, 12, (4, 4))
    layer = model.qwen.model.language_model.layers[0]
    layer.mlp = torch.nn.Sequential()  # a container fuses nothing: fine
    with pytest.raises(UserError, match="patched .* expected"):
        fused_kernels.apply_fused_kernels(model.qwen, reference_ops({}))


def test_split_vision_blocks_are_the_same_function(batch):
    """V3's split (pre-attention, varlen attention, post-attention) in eager mode: bit-identical to V1 + V2."""
    model = build_model(CFG, 12, (4, 4)).train()
    want_loss, want = loss_and_grads(model, batch)
    with torch.no_grad():
        reference = model.image_embeddings(batch["pixel_values"], batch["image_grid_thw"])
    assert compile_vision_blocks(model.visual, compile=False) == len(model.visual.blocks)
    assert all(type(b) is SplitVisionBlock for b in model.visual.blocks)
    with torch.no_grad():
        assert torch.equal(model.image_embeddings(batch["pixel_values"], batch["image_grid_thw"]), reference)
    got_loss, got = loss_and_grads(model, batch)
    assert torch.equal(got_loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_compiled_vision_blocks_match_eager_on_cpu(batch):
    """torch.compile (inductor's CPU backend here) of the two block parts: the tower output within float32
    rounding, one pair of graphs for every block and frame count."""
    from vlnflow.model.vision_fast import compile_stats

    model = build_model(CFG, 12, (4, 4)).eval()
    with torch.no_grad():
        reference = model.image_embeddings(batch["pixel_values"], batch["image_grid_thw"])
        compile_vision_blocks(model.visual)
        before = compile_stats()["frames_compiled"]
        got = model.image_embeddings(batch["pixel_values"], batch["image_grid_thw"])
        first = compile_stats()["frames_compiled"] - before
        # three of the four frames: another number of patches reuses the dynamic graphs
        more = model.image_embeddings(batch["pixel_values"][: 3 * 16], batch["image_grid_thw"][:3])
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    assert more.shape[0] == 3 * 4
    assert 1 <= first <= 4 and compile_stats()["frames_compiled"] - before == first
