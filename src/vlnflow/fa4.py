"""flash-attn-4 (CuTe DSL, `flash_attn.cute`): detection, the config choice, and two thin calls.

The kernels are an optional extra (`pip install -e '.[gpu]'`, package flash-attn-4); they
need a CUDA device of compute capability 9.0 or newer (Hopper, Blackwell) and bf16/fp16
tensors. Every caller keeps its current kernel as the fallback, so CPU runs and CI never
import them. A setting of `auto` picks flash-attn-4 where it can run; naming it where it
cannot is a UserError that says why (the package missing, no CUDA, an older GPU).

Layouts are flash-attn's: dense (B, S, H, D); varlen (total, H, D) with int32 cu_seqlens.
Keys/values may have fewer heads than queries (GQA) and are never repeated here.
"""

from __future__ import annotations

import functools
import logging

import torch

from vlnflow.errors import UserError

log = logging.getLogger(__name__)

FA4 = "flash_attn_4"
HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _module():
    """The imported flash_attn.cute module, or the reason it cannot be imported."""
    try:
        import flash_attn.cute as cute  # noqa: PLC0415 - optional dependency
    except Exception as exc:  # ImportError, or cutlass failing to load without a GPU driver
        return None, f"flash_attn.cute is not importable ({type(exc).__name__}: {exc})"
    return cute, None


def unavailable_reason(device: torch.device | str | None) -> str | None:
    """None when flash-attn-4 can run on `device`, else a sentence saying why not."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return f"it needs a CUDA device (this run uses {device.type if device is not None else 'cpu'})"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"it needs compute capability 9.0 or newer, this GPU has {major}.{minor}"
    return _module()[1]


def resolve(setting: str, key: str, device, fallback: str, choices: tuple[str, ...]) -> str:
    """The kernel a config setting means on this device: `auto` -> flash_attn_4 where it runs, else `fallback`.

    `key` names the setting in the error, e.g. 'model.attention'.
    """
    if setting not in ("auto", *choices):
        raise UserError(f"config setting {key!r} must be one of {['auto', *choices]}, got {setting!r}")
    if setting == "auto":
        return fallback if unavailable_reason(device) else FA4
    if setting == FA4:
        reason = unavailable_reason(device)
        if reason:
            raise UserError(
                f"config setting {key!r} is {FA4!r}, but flash-attn-4 cannot run here: {reason}; use 'auto' or "
                f"{fallback!r} (flash-attn-4 comes with the gpu extra: pip install -e '.[gpu]')"
            )
    return setting


# Head dims whose flash-attn-4 BACKWARD matched the current kernels on an H200 (bench/check_kernels.py,
# 2026-12-02, docs/benchmarks.md): hd 128 (the 7B LLM) dq/dk/dv rms rel <= 2.7e-3. At hd 80 (Qwen's vision
# tower) and hd 16 (the tiny test model) dq came back wrong (rms rel ~1) while the forward matched, so
# with autograd those calls keep the current kernel.
BACKWARD_HEAD_DIMS = (128,)


def usable_for(query: torch.Tensor) -> bool:
    """Whether this call may go to flash-attn-4: always without autograd, with it only at a verified head dim."""
    needs_backward = torch.is_grad_enabled() and query.requires_grad
    return not needs_backward or query.shape[-1] in BACKWARD_HEAD_DIMS


def _out(result) -> torch.Tensor:
    """flash_attn.cute returns (out, lse); keep only out (lse is None unless it was asked for)."""
    return result[0] if isinstance(result, tuple) else result


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D); Sq may differ from Sk (no mask when not causal)."""
    cute = _module()[0]
    return _out(cute.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))


def varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention inside each segment of cu_seqlens: q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    cute = _module()[0]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _out(
        cute.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=int(max_seqlen), max_seqlen_k=int(max_seqlen),
            softmax_scale=scale, causal=causal,
        )
    )
