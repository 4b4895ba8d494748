"""Two same-function speed fixes for transformers' Qwen2.5-VL vision tower (no fork).

Measured on one H100 (docs/design.md, "Measured facts"): without flash_attn the stock
tower loops over windows with one SDPA call each (~9,100 launches per 9-image sample,
host-bound), and its 3420-wide MLP is not a multiple of 8 bf16 elements, so cuBLAS
picks a slow align-2 kernel. Here:

* V1: each vision attention layer makes ONE variable-length attention call over
  `cu_seqlens` (windows or whole images) instead of the per-window loop;
* V2: the vision MLP is zero-padded to a multiple of 64 (3420 -> 3456). Padded gate/up
  rows and down columns are zero, so silu(0) * 0 = 0 adds nothing, and their gradients
  are zero too, so the function stays identical even if the tower is trained.

`apply_vision_fast(visual, attention)` applies both in place to a loaded tower; `attention`
"flash_attn_4" runs V1 on flash-attn-4's varlen kernel, "torch" on torch's (vlnflow.varlen).

V3, `compile_vision_blocks(visual)`: the tower is frozen and its elementwise work (float32 rotary
upcast, RMSNorms, SiLU-mul, residual adds) took about two thirds of its kernel time on an H100
(docs/design.md). Each block becomes three calls: a torch.compile'd function for norm1 + qkv +
rotary, the varlen attention (not compiled: flash-attn-4 is opaque to the compiler), and a compiled
function for proj + residual + norm2 + MLP + residual. Two graphs with dynamic shapes serve all 32
blocks and any number of frames (`compile_stats()` counts their compilations). Same math as V1+V2.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLMLP,
    Qwen2_5_VLVisionAttention,
    Qwen2_5_VLVisionBlock,
    apply_rotary_pos_emb_vision,
)

from vlnflow.model.varlen import varlen_attention


class VarlenVisionAttention(Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL vision attention with one varlen call per layer (V1); same weights, same function."""

    attention_backend = "torch"  # or "flash_attn_4"; set per instance by use_varlen_vision_attention

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        seq_length = hidden_states.shape[0]
        query, key, value = (
            self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
        out = varlen_attention(query, key, value, cu_seqlens, max_seqlen, causal=False, scale=self.scaling,
                               backend=self.attention_backend)
        return self.proj(out.reshape(seq_length, -1))


def _pre_attention(block: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """norm1 -> qkv -> rotary: (q, k, v), each (T, heads, head_dim), as the tower computes them."""
    attn = block.attn
    x = block.norm1(hidden)
    q, k, v = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q, k, v


def _post_attention(block: nn.Module, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """proj + residual, then norm2 -> MLP + residual."""
    hidden = hidden + block.attn.proj(out.reshape(hidden.shape[0], -1))
    return hidden + block.mlp(block.norm2(hidden))


class SplitVisionBlock(Qwen2_5_VLVisionBlock):
    """A vision block as (compiled) pre-attention, varlen attention, (compiled) post-attention (V3)."""

    pre_fn = staticmethod(_pre_attention)
    post_fn = staticmethod(_post_attention)

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        cos, sin = position_embeddings
        q, k, v = self.pre_fn(self, hidden_states, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=self.attn.scaling,
                               backend=getattr(self.attn, "attention_backend", "torch"))
        return self.post_fn(self, hidden_states, out)


_COMPILED: dict[str, object] = {}


def compile_vision_blocks(visual: nn.Module, compile: bool = True) -> int:
    """V3: every vision block split around its attention, the two other parts torch.compile'd (shared by all
    blocks, dynamic shapes); `compile=False` keeps the split in eager mode (same math). Returns the block count.

    Needs V1 first (each block's attention module carries its kernel choice)."""
    if compile and not _COMPILED:
        _COMPILED["pre"] = torch.compile(_pre_attention, dynamic=True)
        _COMPILED["post"] = torch.compile(_post_attention, dynamic=True)
    count = 0
    for block in visual.blocks:
        if type(block) not in (Qwen2_5_VLVisionBlock, SplitVisionBlock):
            raise TypeError(f"compile_vision_blocks: unexpected vision block type {type(block).__name__}")
        block.__class__ = SplitVisionBlock
        block.pre_fn = _COMPILED["pre"] if compile else _pre_attention
        block.post_fn = _COMPILED["post"] if compile else _post_attention
        count += 1
    return count


def compile_stats() -> dict:
    """Frames compiled by torch.compile so far (all of them, vision and others), for the logs and benchmarks."""
    from torch._dynamo.utils import counters

    return {"frames_compiled": int(counters["stats"]["unique_graphs"]), "calls_captured": int(counters["stats"]["calls_captured"])}


def use_varlen_vision_attention(visual: nn.Module, backend: str = "torch") -> int:
    """V1: switch every vision attention module of `visual` to `VarlenVisionAttention`; returns the count.

    With flash-attn-4 only the full-attention blocks (`fullatt_block_indexes`) use it: on an H200
    (bench/check_kernels.py, docs/benchmarks.md) it took one sample's 9 whole images from 0.92 to 0.56 ms
    per layer, but the 64-token windows of the other blocks from 0.18 to 0.58 ms, so those keep torch's.
    """
    full = set(getattr(visual.config, "fullatt_block_indexes", ()) or ())
    count = 0
    for index, block in enumerate(getattr(visual, "blocks", [visual])):
        for module in block.modules():
            if type(module) in (Qwen2_5_VLVisionAttention, VarlenVisionAttention):
                module.__class__ = VarlenVisionAttention  # same state, forward replaced
                module.attention_backend = backend if backend == "torch" or index in full else "torch"
                count += 1
    return count


def pad_vision_mlp(visual: nn.Module, multiple: int = 64) -> int:
    """V2: zero-pad every vision MLP's intermediate width up to `multiple`; returns the new width.

    The original width is kept as `mlp.original_intermediate_size` so a checkpoint
    writer can slice the padding back off if it ever saves the tower.
    """
    width = None
    for module in visual.modules():
        if isinstance(module, Qwen2_5_VLMLP):
            width = _pad_mlp(module, multiple)
    if width is None:
        raise ValueError("pad_vision_mlp: no Qwen2.5-VL vision MLP found in the given module")
    return width


def apply_vision_fast(visual: nn.Module, multiple: int = 64, attention: str = "torch", compile: bool = False) -> nn.Module:
    """Apply V1 (varlen attention on `attention`'s kernel), V2 (MLP padded to `multiple`) and, with
    `compile`, V3 (compiled block parts) in place."""
    use_varlen_vision_attention(visual, attention)
    pad_vision_mlp(visual, multiple)
    if compile:
        compile_vision_blocks(visual)
    return visual


def _pad_mlp(mlp: Qwen2_5_VLMLP, multiple: int) -> int:
    width = mlp.gate_proj.out_features
    padded = -(-width // multiple) * multiple
    if padded == width:
        return width
    extra = padded - width
    with torch.no_grad():
        mlp.gate_proj = _grow_rows(mlp.gate_proj, extra)
        mlp.up_proj = _grow_rows(mlp.up_proj, extra)
        mlp.down_proj = _grow_cols(mlp.down_proj, extra)
    if not hasattr(mlp, "original_intermediate_size"):
        mlp.original_intermediate_size = width
    mlp.intermediate_size = padded
    return padded


def _grow_rows(linear: nn.Linear, extra: int) -> nn.Linear:
    """Linear with `extra` zero output rows (and zero bias entries) appended."""
    weight = linear.weight
    new = nn.Linear(linear.in_features, linear.out_features + extra, bias=linear.bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.zero_()
    new.weight[: linear.out_features] = weight
    if linear.bias is not None:
        new.bias.zero_()
        new.bias[: linear.out_features] = linear.bias
    new.requires_grad_(weight.requires_grad)
    return new


def _grow_cols(linear: nn.Linear, extra: int) -> nn.Linear:
    """Linear with `extra` zero input columns appended (bias unchanged)."""
    weight = linear.weight
    new = nn.Linear(linear.in_features + extra, linear.out_features, bias=linear.bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.zero_()
    new.weight[:, : linear.in_features] = weight
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    new.requires_grad_(weight.requires_grad)
    return new
