"""Fused LLM kernels from Liger-Kernel (RMSNorm, SwiGLU, RoPE), patched onto one model INSTANCE.

The 7B step spends about a quarter of its kernel time in elementwise, norm and rotary kernels (QWEN GPU
reference, docs/design.md). Liger-Kernel's Triton kernels fuse each of them; its own
`apply_liger_kernel_to_qwen2_5_vl` patches module-level names, and on transformers 5.x some of those names no
longer exist or are no longer called (Qwen2.5-VL's attention calls `apply_rotary_pos_emb`, not the
`apply_multimodal_rotary_pos_emb` Liger replaces), so its RoPE patch silently does nothing. Here every module of
the given model's language model is patched directly, and `apply_fused_kernels` returns how many of each it
patched (an RMSNorm, MLP or attention class it does not recognise is an error, never a silent miss):

* RMSNorm (`Qwen2_5_VLRMSNorm`: float32 normalisation, cast back, then times the weight = Liger's "llama" mode);
* the MLP's silu(gate) * up (`LigerSiLUMulFunction`);
* rotary embedding of q and k in attention (transformers 5.x already folds mRoPE's three sections into cos/sin,
  so the plain fused RoPE applies).

`model.fused_kernels`: auto (Liger on a CUDA device where liger-kernel imports: the gpu extra), liger, torch.
The vision tower is left to torch.compile (vlnflow.model.vision_fast).
"""

from __future__ import annotations

import functools
import logging
from types import MethodType, SimpleNamespace

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLAttention,
    Qwen2_5_VLMLP,
    Qwen2_5_VLRMSNorm,
    Qwen2MLP,
)

from vlnflow.errors import UserError

log = logging.getLogger(__name__)

LIGER = "liger"
CHOICES = (LIGER, "torch")


@functools.cache
def _liger():
    """(ops namespace, None) when liger-kernel imports, else (None, why not)."""
    try:
        from liger_kernel.transformers import functional as F  # noqa: N812, PLC0415 - optional dependency
    except Exception as exc:  # ImportError, or triton failing without a GPU
        return None, f"liger_kernel is not importable ({type(exc).__name__}: {exc})"
    ops = SimpleNamespace(
        rms_norm=lambda x, w, eps: F.liger_rms_norm(x, w, eps, offset=0.0, casting_mode="llama", in_place=False),
        swiglu=F.liger_swiglu,
        rope=lambda q, k, cos, sin: F.liger_rope(q, k, cos, sin),
    )
    return ops, None


def unavailable_reason(device) -> str | None:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return f"Liger's Triton kernels need a CUDA device (this run uses {device.type})"
    return _liger()[1]


def resolve(setting: str, device) -> str:
    """`model.fused_kernels` on this device: liger or torch; naming liger where it cannot run is an error."""
    if setting not in ("auto", *CHOICES):
        raise UserError(f"config setting 'model.fused_kernels' must be one of {['auto', *CHOICES]}, got {setting!r}")
    reason = unavailable_reason(device)
    if setting == "auto":
        return "torch" if reason else LIGER
    if setting == LIGER and reason:
        raise UserError(f"config setting 'model.fused_kernels' is 'liger', but it cannot run here: {reason}; use 'auto' "
                        f"or 'torch' (liger-kernel comes with the gpu extra: pip install -e '.[gpu]')")
    return setting


def liger_ops():
    ops, reason = _liger()
    if ops is None:
        raise UserError(f"fused kernels requested but {reason}")
    return ops


# ---- the patched forwards (bound per instance; `self._fused` holds the ops) ----------------------------------


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return self._fused.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(self._fused.swiglu(self.gate_proj(x), self.up_proj(x)))


class FusedRopeAttention(Qwen2_5_VLAttention):
    """transformers 5.x's Qwen2.5-VL text attention with the rotary embedding on `self._fused.rope`."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, position_embeddings=None, **kwargs):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

        bsz, q_len, _ = hidden_states.size()
        shape = (bsz, q_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._fused.rope(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = interface(
            self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, sliding_window=self.sliding_window, position_ids=position_ids, **kwargs,
        )
        return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights


def apply_fused_kernels(qwen: torch.nn.Module, ops=None) -> dict[str, int]:
    """Patch every RMSNorm, SwiGLU MLP and attention of `qwen`'s language model; returns the counts.

    `ops` (rms_norm, swiglu, rope) defaults to Liger's; tests pass stand-ins to check the wiring on CPU.
    """
    ops = ops or liger_ops()
    text = qwen.model.language_model
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for name, module in text.named_modules():
        kind = type(module)
        if kind is Qwen2_5_VLRMSNorm:
            module._fused = ops
            module.forward = MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif kind in (Qwen2MLP, Qwen2_5_VLMLP):
            act = getattr(getattr(module, "config", None), "hidden_act", "silu")
            if act != "silu":
                raise UserError(f"fused SwiGLU needs hidden_act silu, {name} uses {act}")
            module._fused = ops
            module.forward = MethodType(_swiglu_forward, module)
            counts["swiglu"] += 1
        elif kind in (Qwen2_5_VLAttention, FusedRopeAttention):
            module.__class__ = FusedRopeAttention
            module._fused = ops
            counts["rope"] += 1
        elif "norm" in kind.__name__.lower() or kind.__name__.endswith(("MLP", "Attention")):
            raise UserError(f"fused kernels: {name} is a {kind.__name__}, which vlnflow does not know how to fuse")
    layers = len(text.layers)
    want = {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    if counts != want:
        raise UserError(f"fused kernels patched {counts} modules, expected {want} for {layers} decoder layers")
    return counts


def remove_fused_kernels(qwen: torch.nn.Module) -> int:
    """Undo `apply_fused_kernels` (benchmarks switch one model between cases); returns the modules restored."""
    restored = 0
    for module in qwen.model.language_model.modules():
        if "_fused" not in module.__dict__:
            continue
        del module._fused
        module.__dict__.pop("forward", None)  # the class's own forward again
        if type(module) is FusedRopeAttention:
            module.__class__ = Qwen2_5_VLAttention
        restored += 1
    return restored


def is_fused(qwen: torch.nn.Module) -> bool:
    return any("_fused" in m.__dict__ for m in qwen.model.language_model.modules())
