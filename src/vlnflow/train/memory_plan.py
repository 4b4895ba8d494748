"""Which decoder layers to recompute in backward: as few as fit `train.memory_budget_gib` per GPU.

Full activation checkpointing recomputes every decoder layer's forward in backward (a
quarter of backward time on the 7B shape, docs/benchmarks.md). A layer that is not
checkpointed keeps its activations instead; this module estimates, per rank, the bytes
of weights, gradients and optimizer states (ZeRO-2: weights replicated, fp32 gradients,
master weights and Adam moments sharded over G GPUs) plus the activations of one packed
micro-batch, and keeps as many layers un-checkpointed as the budget allows.

Activation bytes per token of a Qwen2/LLaMA-style decoder layer in bf16 (what autograd
saves, read off the layer's ops): two RMSNorms (fp32 input 4h + bf16 normed 2h each),
q and the flash kernel's flattened q/k/v copies (2h + 4kv), the attention output (2h),
the MLP's gate, silu(gate), up and their product (4 x 2I), and the fp32 lse (4 heads):
16h + 4kv + 8I + 4heads bytes, 206 KiB for the 7B shape. A checkpointed layer keeps only
its input (2h); backward then re-materialises one layer at a time. The estimate is
deliberately simple; `workspace_gib` covers the CUDA context, allocator slack, NCCL and
the frozen vision tower's transient forward.

The seed pipeline's action head (model.action_head) is part of the trainable parameters
`ModelShape.of` counts: 1.84 M at hidden 3584, i.e. 2 B replicated + 16 B / G of states, 7 MB per
rank on 8 GPUs. Its activations (one hidden state and 512-wide features per sample) and the loss
terms (a detached gather over the label tokens, vlnflow.model.objective) are negligible next to a
decoder layer's bytes per token, so they are not modelled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of the LLM (defaults: Qwen2.5-VL-7B + merger, vision tower frozen)."""

    layers: int = 28
    hidden: int = 3584
    intermediate: int = 18944
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    trainable_params: float = 7.66e9  # LLM 7.61e9 (untied embedding and lm_head) + merger 48e6
    frozen_params: float = 0.676e9  # vision tower

    @classmethod
    def of(cls, model) -> ModelShape:
        """The shape of a built JanusModel (parameter counts as they are now: frozen = requires_grad False)."""
        text = model.qwen.config.text_config
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        return cls(
            layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
            heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            trainable_params=float(trainable), frozen_params=float(frozen),
        )

    def layer_bytes_per_token(self) -> int:
        """Activations one un-checkpointed decoder layer keeps per token (bf16 compute)."""
        kv = self.kv_heads * self.head_dim
        return 16 * self.hidden + 4 * kv + 8 * self.intermediate + 4 * self.heads

    def checkpointed_bytes_per_token(self) -> int:
        """A checkpointed layer keeps its input hidden state only."""
        return 2 * self.hidden


@dataclass(frozen=True)
class CheckpointPlan:
    """`checkpointed`: decoder layer indices recomputed in backward; the estimate behind it in GiB."""

    layers: int
    checkpointed: tuple[int, ...]
    fits: bool
    estimate_gib: dict = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.layers - len(self.checkpointed)

    def describe(self) -> str:
        e = self.estimate_gib
        head = f"activation checkpointing: {len(self.checkpointed)} of {self.layers} decoder layers recomputed"
        if not e:
            return head
        return (
            f"{head} (estimate {e['total']:.1f} of {e['budget']:.0f} GiB per GPU: states {e['states']:.1f}, "
            f"activations {e['activations']:.1f}, workspace {e['workspace']:.1f}{'' if self.fits else '; DOES NOT FIT'})"
        )


def state_bytes(
    shape: ModelShape, gpus: int, *, optimizer: bool = True, bucket_elements: float = 2e8, preset: str = "zero2"
) -> float:
    """Per-rank bytes of weights, gradients and optimizer states.

    With the optimizer (ZeRO-2, bf16 weights + fp32 master): bf16 weights replicated (2 B/param, frozen
    ones too), sharded fp32 gradients, master weights and Adam m, v (16 B/param / G), and the bf16
    reduce buckets (two in flight with overlap_comm). zero2_offload keeps the sharded 16 B/param on
    the CPU; zero3 also shards the trainable bf16 weights. Without an optimizer (one-GPU
    forward+backward benchmarks): bf16 weights and bf16 gradients only.
    """
    trainable, frozen = shape.trainable_params, shape.frozen_params
    if not optimizer:
        return 2.0 * (trainable + frozen) + 2.0 * trainable
    buckets = 2 * 2.0 * bucket_elements
    if preset == "zero2_offload":
        return 2.0 * (trainable + frozen) + buckets
    if preset == "zero3":
        return 2.0 * trainable / gpus + 2.0 * frozen + 16.0 * trainable / gpus + buckets
    return 2.0 * (trainable + frozen) + 16.0 * trainable / gpus + buckets


def checkpoint_plan(
    shape: ModelShape,
    *,
    tokens: int,
    gpus: int,
    budget_gib: float | None,
    optimizer: bool = True,
    bucket_elements: float = 2e8,
    workspace_gib: float = 6.0,
    preset: str = "zero2",
) -> CheckpointPlan:
    """Keep the most decoder layers un-checkpointed whose activations for `tokens` (one micro-batch) fit.

    `budget_gib` None checkpoints every layer (today's behaviour). Checkpointed layers are spread
    evenly over the depth. If even full checkpointing exceeds the budget, the plan says so
    (`fits` False) and checkpoints everything.
    """
    layers = shape.layers
    if budget_gib is None:
        return CheckpointPlan(layers, tuple(range(layers)), True)
    if tokens <= 0 or gpus <= 0:
        raise ValueError(f"checkpoint_plan needs tokens > 0 and gpus > 0, got {tokens}, {gpus}")
    states = state_bytes(shape, gpus, optimizer=optimizer, bucket_elements=bucket_elements, preset=preset)
    full, thin = shape.layer_bytes_per_token(), shape.checkpointed_bytes_per_token()
    other = 16 * shape.hidden  # embeddings, final norm, label-head inputs

    def activations(kept: int) -> float:
        recompute = full if kept < layers else 0  # backward re-materialises one checkpointed layer at a time
        return tokens * (kept * full + (layers - kept) * thin + recompute + other)

    budget = budget_gib * GIB - workspace_gib * GIB - states
    kept = max((k for k in range(layers + 1) if activations(k) <= budget), default=None)
    fits = kept is not None
    kept = kept or 0
    n_ckpt = layers - kept
    checkpointed = tuple(sorted({round(i * layers / n_ckpt) for i in range(n_ckpt)})) if n_ckpt else ()
    estimate = {
        "budget": budget_gib, "states": states / GIB, "activations": activations(kept) / GIB,
        "workspace": workspace_gib, "tokens": tokens,
    }
    estimate["total"] = estimate["states"] + estimate["activations"] + workspace_gib
    return CheckpointPlan(layers, checkpointed, fits, estimate)


def tokens_per_sample(tokens_per_frame: int, frames: int, text_tokens: int = 550) -> int:
    """LLM tokens of one sample: image tokens per frame (vlnflow.spatial.geometry) x frames, plus the text.

    5,311 for 9 pad frames at 644 (529 per frame), which is what the R2R-CE samples measure (~5.3k); 4,069 with
    crop (391 per frame).
    """
    return frames * tokens_per_frame + text_tokens


def plan_for_run(config: dict, model, world: int) -> CheckpointPlan | None:
    """The run's plan from train.gradient_checkpointing / train.memory_budget_gib; None = no checkpointing. Logs it."""
    from vlnflow.train.deepspeed_config import load_preset

    tcfg = config["train"]
    if not tcfg["gradient_checkpointing"]:
        log.info("activation checkpointing off (train.gradient_checkpointing: false)")
        return None
    from vlnflow.spatial.geometry import geometry_of

    per_frame = geometry_of(config["spatial"], config["model"]).tokens_per_frame
    tokens = tcfg["per_device_batch"] * tokens_per_sample(per_frame, int(config["history"]["max_frames"]) + 1)
    zero = load_preset(tcfg["deepspeed"]).get("zero_optimization", {})
    plan = checkpoint_plan(
        ModelShape.of(model), tokens=tokens, gpus=world, budget_gib=tcfg.get("memory_budget_gib", 80),
        bucket_elements=float(tcfg.get("zero_bucket_elements") or zero.get("reduce_bucket_size", 2e8)),
        preset=tcfg["deepspeed"],
    )
    (log.info if plan.fits else log.warning)("%s", plan.describe())
    return plan
