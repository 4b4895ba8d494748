"""The VGGT aggregator, state-dict compatible with the official VGGT-1B `aggregator.*` keys.

Per frame the token order is [camera, registers, patches]; the camera/register
slot 0 goes to the first frame of a sample and slot 1 to every later one. Frame
blocks attend within a frame, global blocks across the sample's frames, here
block-causally (frame k sees frames <= k) as JanusVLN's copy does, which equals
streaming the frames one by one through a KV cache. Layer i's output is the
channel concat of frame block i's and global block i's outputs.

Three ways to run it:
* `forward` — one pass, every layer and frame (the reference's full-batch mode;
  used by the parity tests);
* `last_frame_features` — the fast path: stops at the kept layer and, in that
  layer, computes only what the last frame needs;
* `stream_frame` — one frame at a time with a KV cache (the reference's
  training-time mode; tests and benchmark only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vlnflow.spatial.attention import attend, block_causal_attention, last_frame_attention
from vlnflow.spatial.dinov2 import ConvPatchEmbed, DinoV2
from vlnflow.spatial.layers import Block, Rope, sdpa_heads
from vlnflow.spatial.rope import rope_tables

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AggregatorConfig:
    """Sizes of the aggregator; the defaults are VGGT-1B's."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    patch_size: int = 14
    qk_norm: bool = True
    rope_base: float = 100.0
    eps: float = 1e-5
    patch_embed: str = "dinov2"  # dinov2 | conv
    dino_depth: int = 24
    dino_heads: int = 16
    dino_pos_grid: int = 37  # position table made for 518 / 14
    dino_register_tokens: int = 4
    dino_eps: float = 1e-6

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, AggregatorConfig] = {
    "vggt-1b": AggregatorConfig(),
    # Same shapes as the DINOv2 parity fixture: width 32, 2 heads, depth 3 (+ DINOv2 depth 2).
    "tiny": AggregatorConfig(embed_dim=32, depth=3, num_heads=2, dino_depth=2, dino_heads=2, dino_pos_grid=5),
}


@dataclass
class StreamCache:
    """Per global block, the keys (after qk-norm and RoPE) and values of the frames streamed so far."""

    keys: list[list[torch.Tensor]] = field(default_factory=list)
    values: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return len(self.keys[0]) if self.keys else 0


class Aggregator(nn.Module):
    def __init__(self, config: AggregatorConfig = AggregatorConfig()):
        super().__init__()
        c = config
        self.config = c
        if c.patch_embed == "dinov2":
            self.patch_embed = DinoV2(
                c.embed_dim,
                c.dino_depth,
                c.dino_heads,
                patch_size=c.patch_size,
                pos_grid=c.dino_pos_grid,
                num_register_tokens=c.dino_register_tokens,
                mlp_ratio=c.mlp_ratio,
                eps=c.dino_eps,
            )
        elif c.patch_embed == "conv":
            self.patch_embed = ConvPatchEmbed(c.embed_dim, c.patch_size)
        else:
            raise ValueError(f"unknown patch_embed {c.patch_embed!r} (dinov2 | conv)")

        def blocks():
            return nn.ModuleList(
                Block(c.embed_dim, c.num_heads, mlp_ratio=c.mlp_ratio, qk_norm=c.qk_norm, eps=c.eps)
                for _ in range(c.depth)
            )

        self.frame_blocks = blocks()
        self.global_blocks = blocks()
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        self.patch_start_idx = 1 + c.num_register_tokens
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._rope_cache: dict = {}
        # Hooks so a caller (the encoder on GPU) can swap in compiled versions of the two block halves.
        self.qkv_fn = Block.qkv_heads
        self.residual_fn = Block.residual
        self.global_backend = "prefix"
        self.attention_kernel = "sdpa"  # or "flash_attn_4" (frame, global and DINOv2 attention; not streaming)

    # ---- pieces -------------------------------------------------------------------------

    @property
    def residual_dtype(self) -> torch.dtype:
        return self.camera_token.dtype

    def layer_index(self, layer: int) -> int:
        """Normalise a Python-style layer index (-2 = second to last) and check it."""
        depth = self.config.depth
        if not -depth <= layer < depth:
            raise ValueError(f"spatial.layer={layer} is outside the aggregator's {depth} layers")
        return layer % depth

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> patch tokens (N, P, C) in the residual dtype."""
        p = self.config.patch_size
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image height and width must be multiples of {p}, got {tuple(images.shape[-2:])}")
        x = ((images.to(self.image_mean.dtype) - self.image_mean) / self.image_std).to(self.residual_dtype)
        if isinstance(self.patch_embed, DinoV2):
            return self.patch_embed(x, run_block=self._dino_block)
        return self.patch_embed(x).to(self.residual_dtype)

    def rope(self, grid: tuple[int, int], device) -> Rope:
        """cos/sin tables for this grid (cached per grid, device and dtype; no host sync)."""
        if self.config.rope_base <= 0:
            return None
        key = (grid, str(device), self.residual_dtype)
        if key not in self._rope_cache:
            head_dim = self.config.embed_dim // self.config.num_heads
            self._rope_cache[key] = rope_tables(
                *grid, self.patch_start_idx, head_dim, base=self.config.rope_base, dtype=self.residual_dtype, device=device
            )
        return self._rope_cache[key]

    def frame_tokens(self, patches: torch.Tensor, starts_sequence: bool = True) -> torch.Tensor:
        """Patch tokens (B, S, P, C) -> (B*S, T, C) with camera and register tokens prepended.

        Frame 0 gets slot 0 and the others slot 1; with `starts_sequence=False` (a
        streamed frame after the first) every frame gets slot 1.
        """
        b, s, p, c = patches.shape
        special = torch.cat([self.camera_token, self.register_token], dim=2)  # (1, 2, 5, C)
        n_first = 1 if starts_sequence else 0
        slots = torch.cat([special[:, :1].expand(1, n_first, -1, -1), special[:, 1:].expand(1, s - n_first, -1, -1)], dim=1)
        tokens = torch.cat([slots.expand(b, -1, -1, -1).to(patches.dtype), patches], dim=2)
        return tokens.reshape(b * s, -1, c)

    @staticmethod
    def grid_of(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
        return images.shape[-2] // patch_size, images.shape[-1] // patch_size

    def _dino_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_fn(block, x, None)
        return self.residual_fn(block, x, attend(q, k, v, self.attention_kernel))

    def _frame_block(self, i: int, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        block = self.frame_blocks[i]
        q, k, v = self.qkv_fn(block, x, rope)
        return self.residual_fn(block, x, attend(q, k, v, self.attention_kernel))

    def _global_block(self, i: int, x: torch.Tensor, rope: Rope, frames: int) -> torch.Tensor:
        block = self.global_blocks[i]
        q, k, v = self.qkv_fn(block, x, rope)
        return self.residual_fn(block, x, block_causal_attention(q, k, v, frames, self.global_backend, self.attention_kernel))

    # ---- full pass ----------------------------------------------------------------------

    def forward(self, images: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Images (B, S, 3, H, W) in [0, 1] -> per-layer outputs (B, S, T, 2C), block-causal.

        `layers` selects which layer outputs to return (default all); the pass stops
        after the last one asked for.
        """
        b, s = images.shape[:2]
        grid = self.grid_of(images, self.config.patch_size)
        patches = self.embed(images.flatten(0, 1)).view(b, s, -1, self.config.embed_dim)
        wanted = sorted({self.layer_index(i) for i in (layers if layers is not None else range(self.config.depth))})
        x = self.frame_tokens(patches)
        rope = self.rope(grid, x.device)
        outputs = []
        for i in range(wanted[-1] + 1):
            x = self._frame_block(i, x, rope)
            frame_out = x
            x = self._global_block(i, x, rope, s)
            if i in wanted:
                outputs.append(torch.cat([frame_out, x], dim=-1).view(b, s, x.shape[1], -1))
        return outputs

    # ---- fast path ----------------------------------------------------------------------

    def last_frame_features(self, patches: torch.Tensor, grid: tuple[int, int], layer: int = -2) -> torch.Tensor:
        """Patch tokens (B, S, P, C) -> the last frame's layer-`layer` patch tokens (B, P, 2C).

        Layers after the kept one are not run; in the kept layer the earlier frames
        contribute only keys and values, and only the last frame runs the rest of the
        global block.
        """
        b, s = patches.shape[:2]
        keep = self.layer_index(layer)
        x = self.frame_tokens(patches)
        rope = self.rope(grid, x.device)
        for i in range(keep):
            x = self._frame_block(i, x, rope)
            x = self._global_block(i, x, rope, s)
        x = self._frame_block(keep, x, rope)
        t, c = x.shape[1:]
        last = x.view(b, s, t, c)[:, -1]  # (B, T, C)
        block = self.global_blocks[keep]
        h = block.norm1(x)
        k, v = block.attn.kv_heads(h, rope)
        q = block.attn.q_heads(h.view(b, s, t, c)[:, -1], rope)
        out = self.residual_fn(block, last, last_frame_attention(q, k, v, s, self.attention_kernel))
        start = self.patch_start_idx
        return torch.cat([last[:, start:], out[:, start:]], dim=-1)

    # ---- streaming ----------------------------------------------------------------------

    def stream_frame(self, images: torch.Tensor, cache: StreamCache, layers: list[int] | None = None) -> list[torch.Tensor]:
        """One frame per sample (B, 3, H, W) through a KV cache -> per-layer outputs (B, T, 2C).

        The first call on an empty cache uses the first-frame token slot, later calls
        the other slot; global blocks attend from this frame to all cached frames. Pass
        the same `layers` for every frame of a stream: layers after the last one asked
        for are neither run nor cached.
        """
        grid = self.grid_of(images, self.config.patch_size)
        patches = self.embed(images).unsqueeze(1)
        x = self.frame_tokens(patches, starts_sequence=cache.frames == 0)
        rope = self.rope(grid, x.device)
        if not cache.keys:
            cache.keys = [[] for _ in range(self.config.depth)]
            cache.values = [[] for _ in range(self.config.depth)]
        wanted = sorted({self.layer_index(i) for i in (layers if layers is not None else range(self.config.depth))})
        outputs = []
        for i in range(wanted[-1] + 1):
            x = self._frame_block(i, x, rope)
            frame_out = x
            block = self.global_blocks[i]
            q, k, v = self.qkv_fn(block, x, rope)
            cache.keys[i].append(k)
            cache.values[i].append(v)
            keys = torch.cat(cache.keys[i], dim=1)  # (B, frames * T, H, D)
            values = torch.cat(cache.values[i], dim=1)
            x = self.residual_fn(block, x, sdpa_heads(q, keys, values))
            if i in wanted:
                outputs.append(torch.cat([frame_out, x], dim=-1))
        return outputs
