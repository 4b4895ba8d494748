"""FLOP counts of what each path executes, and MFU against two named denominators.

One place for every bench/ script's FLOP arithmetic (tests/test_flops.py checks each formula
against hand-computed values). Conventions: 2 FLOPs per multiply-add; matmuls and attention
only (norms, activations, RoPE and residual adds are left out); grids are (grid_h, grid_w)
pairs of patches, never assumed square.

- VGGT (frozen, inference): `vggt_minimum` is the least work for one sample's kept feature
  (what `encode` executes), `vggt_streaming` what frame-by-frame streaming executes, and
  `vggt_indexed` what `encode_indexed` executes for a batch: DINOv2 once per UNIQUE image.
- Training step: LLM linears + causal attention per packed sample (sum of T_i^2, not B x
  mean(T)^2) + the label-only head on the batch's real label count; the frozen Qwen vision
  tower (forward only) with its windowed and full-attention blocks and its merger; the
  trained spatial merger. `recompute` (the forward of checkpointed decoder layers, run again
  in backward) is reported apart from the model FLOPs, which MFU uses.

MFU: `mfu_vs_peak` divides by the card's datasheet dense bf16 rate (None for cards not listed),
`mfu_vs_matmul` by the bf16 matmul rate measured in the same run; both are always named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# ---- building blocks ---------------------------------------------------------------------------


def linear(tokens: float, d_in: int, d_out: int) -> float:
    """One dense layer over `tokens` rows."""
    return 2.0 * tokens * d_in * d_out


def attention(queries: float, keys: float, dim: int) -> float:
    """softmax(QK^T)V for `queries` x `keys` at total width `dim` (heads x head dim): QK^T and PV."""
    return 4.0 * queries * keys * dim


def causal_attention(tokens: float, dim: int) -> float:
    """Causal self-attention over one sequence: half of the full square (as flash kernels execute it)."""
    return 2.0 * tokens * tokens * dim


# ---- VGGT aggregator (frozen; per the AggregatorConfig fields) ----------------------------------


def _vggt_block(tokens: float, d: int, hidden: int) -> float:
    """qkv + proj + 2-layer MLP of one ViT block (no attention)."""
    return linear(tokens, d, 3 * d) + linear(tokens, d, d) + linear(tokens, d, hidden) + linear(tokens, hidden, d)


def vggt_dino(cfg, grid: tuple[int, int]) -> float:
    """One image through the patch embedding (DINOv2 with registers, or the plain conv)."""
    p = grid[0] * grid[1]
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    conv = linear(p, 3 * cfg.patch_size**2, d)
    if cfg.patch_embed != "dinov2":
        return conv
    t = 1 + cfg.dino_register_tokens + p
    return conv + cfg.dino_depth * (_vggt_block(t, d, hidden) + attention(t, t, d))


def _frame_tokens(cfg, grid) -> int:
    return grid[0] * grid[1] + 1 + cfg.num_register_tokens


def vggt_trunk(cfg, grid: tuple[int, int], frames: int, keep: int) -> float:
    """The aggregator after the patch embedding, block-causal, stopping at layer `keep` of the last frame
    (Aggregator.last_frame_features): frame blocks 0..keep on every frame, global blocks 0..keep-1
    (frame f attends to frames 0..f), and in global block `keep` only the earlier frames' keys and values."""
    t, d, hidden, s = _frame_tokens(cfg, grid), cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), frames
    frame_blocks = s * (keep + 1) * (_vggt_block(t, d, hidden) + attention(t, t, d))
    global_blocks = keep * (s * _vggt_block(t, d, hidden) + sum(attention(t, (f + 1) * t, d) for f in range(s)))
    kept_global = (s - 1) * linear(t, d, 2 * d) + _vggt_block(t, d, hidden) + attention(t, s * t, d)
    return frame_blocks + global_blocks + kept_global


def vggt_minimum(cfg, grid: tuple[int, int], frames: int, keep: int) -> float:
    """Per sample: every frame through the patch embedding + the trunk (what `encode` executes)."""
    return frames * vggt_dino(cfg, grid) + vggt_trunk(cfg, grid, frames, keep)


def vggt_indexed(cfg, grid: tuple[int, int], frames: int, keep: int, samples: int, unique_images: int) -> float:
    """One `encode_indexed` call: the patch embedding once per unique image, the trunk per sample."""
    return unique_images * vggt_dino(cfg, grid) + samples * vggt_trunk(cfg, grid, frames, keep)


def vggt_streaming(cfg, grid: tuple[int, int], frames: int, layers: int | None = None) -> float:
    """Per sample, frame-by-frame streaming through a KV cache: `layers` (default all) full layers of every
    frame (frame and global block; frame f's global attention over the f+1 cached frames)."""
    t, d, hidden = _frame_tokens(cfg, grid), cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_layer = frames * (2 * _vggt_block(t, d, hidden) + attention(t, t, d)) + sum(attention(t, (f + 1) * t, d) for f in range(frames))
    return frames * vggt_dino(cfg, grid) + (cfg.depth if layers is None else layers) * per_layer


# ---- Qwen2.5-VL: LLM, vision tower, spatial merger ----------------------------------------------


@dataclass(frozen=True)
class LlmShape:
    """The decoder's matmul shapes (defaults: Qwen2.5-VL-7B's text model)."""

    layers: int = 28
    hidden: int = 3584
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    intermediate: int = 18944
    vocab: int = 152064

    @classmethod
    def of(cls, text_config) -> LlmShape:
        c = text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim,
                   c.intermediate_size, c.vocab_size)  # fmt: skip

    @property
    def block_weights(self) -> int:
        """Matmul weights of one decoder layer: q, k, v, o and the gated MLP (gate, up, down)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * q + 2 * self.hidden * kv + q * self.hidden + 3 * self.hidden * self.intermediate


def llm_forward(shape: LlmShape, seq_lens: Sequence[int], labels: int) -> dict:
    """Forward FLOPs of one packed batch: {"linear", "attention", "head"}.

    seq_lens: each packed sample's token count (attention is per sample: causal, varlen);
    labels: positions the label-only head runs on (the batch's real count).
    """
    return llm_forward_sums(shape, sum(seq_lens), sum(t * t for t in seq_lens), labels)


def llm_forward_sums(shape: LlmShape, tokens: int, tokens_sq: int, labels: int) -> dict:
    """llm_forward from sums: tokens = sum T_i, tokens_sq = sum T_i^2 (what the trainer's metrics log per step)."""
    width = shape.heads * shape.head_dim
    return {
        "linear": shape.layers * 2.0 * shape.block_weights * tokens,
        "attention": shape.layers * 2.0 * tokens_sq * width,  # causal_attention per sample, summed
        "head": linear(labels, shape.hidden, shape.vocab),
    }


@dataclass(frozen=True)
class VisionShape:
    """Qwen2.5-VL's vision tower (defaults: the 7B's): ViT blocks, windowed except `full_blocks`, and its merger."""

    depth: int = 32
    hidden: int = 1280
    intermediate: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    merge: int = 2
    window_size: int = 112  # pixels
    full_blocks: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden: int = 3584

    @classmethod
    def of(cls, vision_config) -> VisionShape:
        c = vision_config
        return cls(c.depth, c.hidden_size, c.intermediate_size, c.patch_size, c.temporal_patch_size, c.in_channels,
                   c.spatial_merge_size, c.window_size, tuple(c.fullatt_block_indexes), c.out_hidden_size)  # fmt: skip


def window_sizes(shape: VisionShape, grid: tuple[int, int]) -> list[int]:
    """Patches per attention window of one image: the merged grid cut into windows of window_size px
    (window_size / patch / merge merged units a side), edge windows smaller, as transformers'
    get_vision_window_index does."""
    units = shape.window_size // shape.patch_size // shape.merge
    mh, mw = grid[0] // shape.merge, grid[1] // shape.merge
    rows = [min(units, mh - r) for r in range(0, mh, units)]
    cols = [min(units, mw - c) for c in range(0, mw, units)]
    return [r * c * shape.merge**2 for r in rows for c in cols]


def vision_forward(shape: VisionShape, grid: tuple[int, int]) -> dict:
    """Forward FLOPs of one image of (grid_h, grid_w) patches: {"patch_embed", "linear", "attention", "merger"}."""
    p = grid[0] * grid[1]
    h = shape.hidden
    windowed = sum(attention(n, n, h) for n in window_sizes(shape, grid))
    full = attention(p, p, h)
    n_full = sum(1 for i in shape.full_blocks if i < shape.depth)
    merged, wide = p // shape.merge**2, h * shape.merge**2
    return {
        "patch_embed": linear(p, shape.in_channels * shape.temporal_patch_size * shape.patch_size**2, h),
        "linear": shape.depth * (linear(p, h, 3 * h) + linear(p, h, h) + 3 * linear(p, h, shape.intermediate)),
        "attention": n_full * full + (shape.depth - n_full) * windowed,
        "merger": linear(merged, wide, wide) + linear(merged, wide, shape.out_hidden),
    }


def spatial_merger_forward(spatial_grid: tuple[int, int], channels: int, hidden: int, out: int, merge: int = 2) -> float:
    """vlnflow's SpatialMerger on one sample's (grid_h, grid_w) feature map: 2x2 blocks -> hidden -> out."""
    tokens = (spatial_grid[0] // merge) * (spatial_grid[1] // merge)
    return linear(tokens, channels * merge * merge, hidden) + linear(tokens, hidden, out)


@dataclass(frozen=True)
class BatchWork:
    """What one or more (micro-)batches hold, from host-side facts: samples, tokens, the sum of squared
    per-sample token counts, label positions, and each image's (grid_h, grid_w) of vision patches."""

    samples: int
    tokens: int
    tokens_sq: int
    labels: int
    image_grids: tuple[tuple[int, int], ...]

    @classmethod
    def of_lengths(cls, seq_lens: Sequence[int], labels: int, image_grids) -> BatchWork:
        return cls(len(seq_lens), sum(seq_lens), sum(t * t for t in seq_lens), labels, tuple(tuple(g) for g in image_grids))

    @classmethod
    def of(cls, batch: dict) -> BatchWork:
        """From a packed batch (vlnflow.model.batching): host `seq_lens` when present, else `cu_seqlens`
        (a device tensor is read back: call outside timed regions)."""
        if batch.get("seq_lens") is not None:
            lens = [int(n) for n in batch["seq_lens"]]
        else:
            cu = [int(v) for v in batch["cu_seqlens"].tolist()]
            lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        grids = [(int(g[1]), int(g[2])) for g in batch["image_grid_thw"].tolist()]
        return cls.of_lengths(lens, int(batch["label_positions"].numel()), grids)

    def __add__(self, other: BatchWork) -> BatchWork:
        return BatchWork(self.samples + other.samples, self.tokens + other.tokens, self.tokens_sq + other.tokens_sq,
                         self.labels + other.labels, self.image_grids + other.image_grids)  # fmt: skip


def training_step(work: BatchWork, llm: LlmShape, vision: VisionShape, *, spatial_grid: tuple[int, int] | None,
                  spatial_channels: int = 0, merger_hidden: int = 0, recomputed_layers: int = 0) -> dict:
    """FLOPs of forward + backward over `work` (no optimizer).

    model: LLM x3 (forward + backward of trainable weights; backward = 2x forward), frozen vision
    tower x1 (forward only), spatial merger x3 per sample; recompute: the forward of the
    `recomputed_layers` checkpointed decoder layers (linear + attention), kept apart from `model`.
    """
    fwd = llm_forward_sums(llm, work.tokens, work.tokens_sq, work.labels)
    tower = [vision_forward(vision, g) for g in work.image_grids]
    out = {
        "llm": 3 * sum(fwd.values()),
        "llm_forward": fwd,
        "vision": sum(sum(v.values()) for v in tower),
        "merger": 3 * work.samples * spatial_merger_forward(spatial_grid, spatial_channels, merger_hidden, llm.hidden)
        if spatial_grid is not None else 0.0,
        "recompute": recomputed_layers / llm.layers * (fwd["linear"] + fwd["attention"]),
    }
    out["model"] = out["llm"] + out["vision"] + out["merger"]
    out["executed"] = out["model"] + out["recompute"]
    return out


# ---- MFU denominators ------------------------------------------------------------------------

# Dense bf16 tensor-core peak from NVIDIA's datasheets (the sparse figure halved), TFLOP/s. Matched on the
# name torch reports; PCIe and NVL parts run at lower clocks and power and are not listed (-> None).
DATASHEET_DENSE_BF16_TFLOPS = {
    "H100 SXM": 989.4,  # torch: "NVIDIA H100 80GB HBM3"
    "H800 SXM": 989.4,  # torch: "NVIDIA H800"
    "H200 SXM": 989.4,  # torch: "NVIDIA H200"
}


def datasheet_peak_tflops(device_name: str | None) -> float | None:
    """The datasheet dense bf16 TFLOP/s of an H100 SXM / H800 / H200 by the name torch reports; None otherwise."""
    if not device_name:
        return None
    name = device_name.upper()
    if "PCIE" in name or "NVL" in name:
        return None
    if "H100" in name and ("HBM3" in name or "SXM" in name):
        return DATASHEET_DENSE_BF16_TFLOPS["H100 SXM"]
    if "H800" in name:
        return DATASHEET_DENSE_BF16_TFLOPS["H800 SXM"]
    if "H200" in name:
        return DATASHEET_DENSE_BF16_TFLOPS["H200 SXM"]
    return None


def mfu(flop: float, seconds: float, *, gpus: int = 1, matmul_tflops: float | None = None,
        device_name: str | None = None) -> dict:
    """{"tflops_per_s_per_gpu", "mfu_vs_peak", "mfu_vs_matmul", "peak_tflops"}; a denominator not known -> None."""
    if seconds <= 0 or gpus <= 0:
        raise ValueError(f"mfu needs seconds > 0 and gpus > 0, got {seconds}, {gpus}")
    rate = flop / seconds / gpus / 1e12
    peak = datasheet_peak_tflops(device_name)
    return {
        "tflops_per_s_per_gpu": rate,
        "mfu_vs_peak": rate / peak if peak else None,
        "mfu_vs_matmul": rate / matmul_tflops if matmul_tflops else None,
        "peak_tflops": peak,
    }


def step_counter(config: dict):
    """`count(work, recomputed_layers=0) -> training_step(...)` with the shapes of `config`'s model (qwen_path or
    the random-init preset) and spatial path; `count.image_grid` is the Qwen patch grid of one frame (for counts
    that know only the number of images, such as the trainer's per-step metrics)."""
    from vlnflow.model.loading import frame_geometry, qwen_config, resolve_model_config
    from vlnflow.spatial.fingerprint import spatial_output

    model_cfg = resolve_model_config(config)
    geometry = frame_geometry(config)
    qc = qwen_config(model_cfg)
    if qc is None:
        raise ValueError("step_counter: model.init_from has no config to count from before the model is built")
    llm, vision = LlmShape.of(qc.text_config), VisionShape.of(qc.vision_config)
    grid, channels = spatial_output(config["spatial"])
    hidden = int(model_cfg["merger_hidden"])

    def count(work: BatchWork, recomputed_layers: int = 0) -> dict:
        return training_step(work, llm, vision, spatial_grid=tuple(grid), spatial_channels=channels, merger_hidden=hidden,
                             recomputed_layers=recomputed_layers)  # fmt: skip

    count.image_grid = geometry.kept_grid  # Qwen's patch grid of one frame (34x46 crop, 46x46 pad at 644)
    count.llm, count.vision = llm, vision
    return count
