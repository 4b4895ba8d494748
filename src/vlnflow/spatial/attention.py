"""Global attention across frames without a dense mask.

Block-causal attention (a query in frame k sees the keys of frames 0..k) is
computed as one unmasked SDPA call per query frame over the key prefix of
frames 0..k: every call is a plain flash/cuDNN attention on contiguous slices,
the FLOPs are exactly the block-causal ones, and there is no (L x L) mask. On
CUDA, FlexAttention with a frame-level block mask is the alternative
(`backend="flex"`); both are measured in bench/bench_spatial.py.

`kernel` picks what runs each unmasked call: "sdpa" (PyTorch's choice of flash/cuDNN)
or "flash_attn_4" (vlnflow.fa4, CUDA sm90+, bf16), which takes the (B, S, H, D) layout
directly, so the prefix slices need no transposes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vlnflow import fa4

KERNELS = ("sdpa", fa4.FA4)


def _bhtd(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*S, T, H, D) frames -> (B, H, S*T, D) view of the whole sequence per sample."""
    _, t, h, d = x.shape
    return x.reshape(batch, -1, h, d).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
    """Unmasked attention over (N, Tq, H, D) queries and (N, Tk, H, D) keys/values -> (N, Tq, H, D)."""
    if kernel == fa4.FA4 and fa4.usable_for(q):
        return fa4.dense(q, k, v)
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r} ({' | '.join(KERNELS)})")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, backend: str = "prefix", kernel: str = "sdpa"
) -> torch.Tensor:
    """q, k, v (B*S, T, H, D) with S = `frames` per sample -> (B*S, T, H, D) block-causal output."""
    n, t, h, d = q.shape
    batch = n // frames
    if kernel == fa4.FA4 and backend == "prefix":
        qs, ks, vs = (x.reshape(batch, frames * t, h, d) for x in (q, k, v))
        outs = [attend(qs[:, f * t : (f + 1) * t], ks[:, : (f + 1) * t], vs[:, : (f + 1) * t], kernel) for f in range(frames)]
        return torch.cat(outs, dim=1).reshape(n, t, h, d)
    qs, ks, vs = _bhtd(q, batch), _bhtd(k, batch), _bhtd(v, batch)
    if backend == "flex":
        out = _flex_block_causal(qs, ks, vs, t, frames)
        return out.transpose(1, 2).reshape(n, t, h, d)
    if backend != "prefix":
        raise ValueError(f"unknown global attention backend {backend!r} (prefix | flex)")
    outs = []
    for f in range(frames):
        end = (f + 1) * t
        o = F.scaled_dot_product_attention(qs[:, :, f * t : end], ks[:, :, :end], vs[:, :, :end])
        outs.append(o.transpose(1, 2))  # (B, T, H, D)
    return torch.cat(outs, dim=1).reshape(n, t, h, d)


def last_frame_attention(q_last: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, kernel: str = "sdpa") -> torch.Tensor:
    """Queries of each sample's last frame (B, T, H, D) against all its frames' keys (B*S, T, H, D)."""
    batch = q_last.shape[0]
    if kernel == fa4.FA4:
        _, t, h, d = k.shape
        return attend(q_last, k.reshape(batch, frames * t, h, d), v.reshape(batch, frames * t, h, d), kernel)
    out = F.scaled_dot_product_attention(q_last.transpose(1, 2), _bhtd(k, batch), _bhtd(v, batch))
    return out.transpose(1, 2)


@functools.cache
def _flex_kernel():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _frame_block_mask(tokens_per_frame: int, frames: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_frames(b, h, q_idx, kv_idx):
        return kv_idx // tokens_per_frame <= q_idx // tokens_per_frame

    length = tokens_per_frame * frames
    return create_block_mask(causal_frames, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


def _flex_block_causal(q, k, v, tokens_per_frame: int, frames: int) -> torch.Tensor:
    if q.device.type != "cuda":
        raise ValueError("the flex attention backend needs a CUDA device; use backend 'prefix'")
    mask = _frame_block_mask(tokens_per_frame, frames, str(q.device))
    return _flex_kernel()(q, k, v, block_mask=mask)
