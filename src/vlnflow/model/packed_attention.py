"""LLM attention for packed batches: causal inside each sample, never across samples.

transformers 5.24's Qwen2.5-VL already packs exactly with `sdpa` when given 4-row
position_ids (row 0 = per-sample text positions restarting at 0): it builds a
block-diagonal causal mask. But a dense mask keeps SDPA off its fast causal kernels
(measured 4.7x slower LLM attention, docs/design.md "Measured facts"). This registers
an attention implementation that takes the per-sample boundaries as `cu_seq_lens_q`
and runs one causal varlen call per layer (flash on CUDA, exact SDPA fallback
elsewhere). Select it with `use_packed_attention(model)`; `use_packed_attention(model,
"flash_attn_4")` selects a second registration that runs flash-attn-4's varlen kernel.

It is for packed, unpadded training batches only: it ignores `attention_mask`
(transformers builds none for an unregistered mask type) and has no KV cache.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from vlnflow.fa4 import FA4
from vlnflow.model.varlen import varlen_attention

PACKED_ATTENTION = "vlnflow_packed_varlen"
PACKED_ATTENTION_FA4 = "vlnflow_packed_fa4"
PACKED_IMPLEMENTATIONS = {"torch": PACKED_ATTENTION, FA4: PACKED_ATTENTION_FA4}


def packed_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    *,
    backend: str = "torch",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, T, Hq, D).

    Without `cu_seq_lens_q` each batch row is one causal sequence.
    """
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} does not implement attention dropout (got {dropout})")
    if attention_mask is not None:
        raise ValueError(f"{PACKED_ATTENTION} takes no attention mask: pack samples instead of padding them")
    batch, heads, length, head_dim = query.shape
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        max_length_q = length
    elif batch != 1:
        raise ValueError(f"{PACKED_ATTENTION}: packed batches have one row, got {batch}")

    def flat(x):  # (B, H, T, D) -> (B*T, H, D)
        return x.transpose(1, 2).reshape(-1, x.shape[1], head_dim)

    out = varlen_attention(
        flat(query), flat(key), flat(value), cu_seq_lens_q, max_length_q, causal=True, scale=scaling, backend=backend
    )
    return out.view(batch, length, heads, head_dim), None


def packed_fa4_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """`packed_varlen_attention` on flash-attn-4's varlen kernel."""
    return packed_varlen_attention(module, query, key, value, attention_mask, dropout, scaling, backend=FA4, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, packed_varlen_attention)
AttentionInterface.register(PACKED_ATTENTION_FA4, packed_fa4_attention)


def use_packed_attention(model, backend: str = "torch") -> None:
    """Route the LLM (text config) of a Qwen2.5-VL model through the packed varlen attention."""
    model.config.text_config._attn_implementation = PACKED_IMPLEMENTATIONS[backend]


def is_packed(implementation: str | None) -> bool:
    """True for either packed registration (the model then passes cu_seqlens, not a mask)."""
    return implementation in PACKED_IMPLEMENTATIONS.values()
