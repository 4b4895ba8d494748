"""The pre-norm transformer block shared by DINOv2 and the VGGT aggregator.

Parameter names match the official checkpoint (norm1, attn.qkv, attn.q_norm,
attn.k_norm, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma).

Dtypes mirror the reference run under bf16 autocast: the residual stream,
LayerNorms and LayerScale stay in the dtype of the norm weights (float32), the
matmuls run in the dtype of the Linear weights (bf16 on GPU), and qk-norm plus
RoPE run in float32 before the attention inputs are cast down. When every weight
is float32 (CPU) all of it is plain float32.

A block is split into `qkv_heads` (norm1 -> q, k, v) and `residual` (attention
output -> proj -> LayerScale -> MLP) so the callers can run the attention
between them in different ways (per frame, block-causal, streaming) and can
compile the two halves on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlnflow.spatial.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor] | None


def linear(layer: nn.Linear, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """`layer(x)` computed in the layer's weight dtype; `rows` keeps only those output features."""
    weight, bias = layer.weight, layer.bias
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    return F.linear(x.to(weight.dtype), weight, bias)


class LayerScale(nn.Module):
    """Per-channel learned scale on a residual branch (`gamma`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, F.gelu(linear(self.fc1, x)))


class Attention(nn.Module):
    """qkv projection (+ optional per-head LayerNorm on q and k, + optional RoPE) and output projection."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        return y.unflatten(-1, (self.num_heads, self.head_dim))

    def _norm_rope(self, t: torch.Tensor, norm: nn.LayerNorm | None, rope: Rope, out_dtype) -> torch.Tensor:
        if norm is not None:
            t = F.layer_norm(t.to(norm.weight.dtype), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        if rope is not None:
            t = apply_rope(t.to(rope[0].dtype), *rope)
        return t.to(out_dtype)

    def qkv_heads(self, h: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (..., T, C) normed input -> q, k, v each (..., T, H, D) in the matmul dtype."""
        qkv = linear(self.qkv, h).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=-3)
        dtype = self.qkv.weight.dtype
        return self._norm_rope(q, self.q_norm, rope, dtype), self._norm_rope(k, self.k_norm, rope, dtype), v

    def q_heads(self, h: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Queries only (for the kept layer, where only the last frame asks)."""
        dim = self.proj.weight.shape[0]
        q = self._heads(linear(self.qkv, h, slice(0, dim)))
        return self._norm_rope(q, self.q_norm, rope, self.qkv.weight.dtype)

    def kv_heads(self, h: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values only (earlier frames in the kept layer)."""
        dim = self.proj.weight.shape[0]
        kv = linear(self.qkv, h, slice(dim, 3 * dim)).unflatten(-1, (2, self.num_heads, self.head_dim))
        k, v = kv.unbind(dim=-3)
        return self._norm_rope(k, self.k_norm, rope, self.qkv.weight.dtype), v


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qk_norm: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, eps=eps)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def qkv_heads(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual x (..., T, C) -> q, k, v (..., T, H, D)."""
        return self.attn.qkv_heads(self.norm1(x), rope)

    def residual(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Finish the block from the attention output (..., T, H, D) (or already flattened heads)."""
        if attn_out.dim() == x.dim() + 1:
            attn_out = attn_out.flatten(-2)
        x = x + self.ls1(linear(self.attn.proj, attn_out))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        """Self-attention within each sequence of x (N, T, C)."""
        q, k, v = self.qkv_heads(x, rope)
        return self.residual(x, sdpa_heads(q, k, v))


def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over (N, T, H, D) inputs, returning (N, Tq, H, D) (no mask, default 1/sqrt(D) scale)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
