"""One attention call over many independent segments of a packed sequence.

Both the Qwen vision tower (one segment per window or image) and the packed LLM
batch (one segment per sample) need attention that never crosses a segment
boundary. On CUDA with half precision this is torch's flash `varlen_attn`
(one kernel per layer instead of a Python loop of SDPA calls); elsewhere it is
an exact SDPA over the segments padded to the longest one, so CPU tests run the
same layout code. `backend="flash_attn_4"` runs flash-attn-4's varlen kernel instead
(vlnflow.fa4; forward and backward, GQA without repeating K/V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlnflow import fa4

try:  # torch >= 2.9 ships flash varlen attention (CUDA only)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch
    _torch_varlen_attn = None

HALF_DTYPES = (torch.float16, torch.bfloat16)


def uses_flash_varlen(query: torch.Tensor) -> bool:
    """True when `varlen_attention` will run torch's flash varlen kernel for this tensor."""
    return _torch_varlen_attn is not None and query.is_cuda and query.dtype in HALF_DTYPES


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool,
    scale: float | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Attention inside each segment [cu_seqlens[i], cu_seqlens[i+1]).

    query: (T, Hq, D); key, value: (T, Hkv, D) with Hq a multiple of Hkv (grouped-query).
    Returns (T, Hq, D). Pass `max_seqlen` (a host int): computing it here reads it back
    from the device.
    """
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if backend == fa4.FA4 and fa4.usable_for(query):
        return fa4.varlen(query, key, value, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    if uses_flash_varlen(query):
        return _flash_varlen(query, key, value, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    return _padded_sdpa(query, key, value, cu_seqlens, max_seqlen, causal=causal, scale=scale)


def _flash_varlen(query, key, value, cu_seqlens, max_seqlen, *, causal, scale):
    """torch's varlen_attn; its keywords changed across torch 2.9-2.13 (is_causal -> window_size, enable_gqa)."""
    params = _varlen_params()
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and scale != query.shape[-1] ** -0.5:
        raise RuntimeError("this torch's varlen_attn has no `scale`; upgrade torch or use the SDPA fallback")
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    return _torch_varlen_attn(query, key, value, cu, cu, max_seqlen, max_seqlen, **kwargs)


_PARAMS: frozenset[str] | None = None


def _varlen_params() -> frozenset[str]:
    global _PARAMS
    if _PARAMS is None:
        import inspect

        _PARAMS = frozenset(inspect.signature(_torch_varlen_attn).parameters)
    return _PARAMS


def _padded_sdpa(query, key, value, cu_seqlens, max_seqlen, *, causal, scale):
    """Exact fallback: gather segments into a [N, L] padded batch, one masked SDPA, scatter back."""
    total = query.shape[0]
    cu = cu_seqlens.to(device=query.device, dtype=torch.long)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    keep = lengths > 0  # empty segments would give all-masked rows (NaN gradients)
    starts, lengths = starts[keep], lengths[keep]
    offsets = torch.arange(max_seqlen, device=query.device)
    valid = offsets[None, :] < lengths[:, None]  # [N, L]
    index = (starts[:, None] + offsets[None, :]).clamp(max=total - 1)

    def pad(x):  # (T, H, D) -> (N, H, L, D)
        return x[index].transpose(1, 2)

    mask = valid[:, None, None, :]  # key padding
    if causal:
        mask = mask & torch.ones(max_seqlen, max_seqlen, dtype=torch.bool, device=query.device).tril()
    out = F.scaled_dot_product_attention(
        pad(query),
        pad(key),
        pad(value),
        attn_mask=mask,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)[valid]  # segments are contiguous and ordered -> original token order
