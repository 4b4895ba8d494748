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

Everything is in GiB (2**30 bytes), budgets included: an "80 GB" H100 / H800 exposes about
79.6 GiB to CUDA, an H200 about 139.8 GiB (`CARD_GIB`). The model is calibrated against the
peaks measured by bench/bench_train.py (docs/results/train_*.json, torch's max_memory_allocated):
per group (each DeepSpeed preset; no optimizer, the one-GPU forward+backward benchmark) the
estimate is shifted by its smallest over-estimate on those peaks, so it meets or exceeds every
one of them, and each plan states that shift and the remaining error next to its numbers.

The seed pipeline's action head (model.action_head) is part of the trainable parameters
`ModelShape.of` counts: 1.84 M at hidden 3584, i.e. 2 B replicated + 16 B / G of states, 7 MB per
rank on 8 GPUs. Its activations (one hidden state and 512-wide features per sample) and the loss
terms (a detached gather over the label tokens, vlnflow.model.objective) are negligible next to a
decoder layer's bytes per token, so they are not modelled.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
GIB = 2**30
# What CUDA exposes of a card, GiB (torch.cuda.get_device_properties(i).total_memory / 2**30, rounded down).
CARD_GIB = {"H100 / H800 80GB": 79.6, "H200": 139.8}
ALL_LAYERS_BEFORE_SELECTIVE = "1d5b24e"  # results written before this commit recomputed every decoder layer


def card_gib(device_name: str | None) -> float | None:
    """The GiB an H100 80GB / H800 / H200 exposes, by the name torch reports; None for other cards."""
    name = (device_name or "").upper()
    if "H200" in name:
        return CARD_GIB["H200"]
    if ("H100" in name and "80GB" in name.replace(" ", "")) or "H800" in name:
        return CARD_GIB["H100 / H800 80GB"]
    return None


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
    fused: bool = False  # Liger's RMSNorm and SwiGLU (vlnflow.model.fused_kernels): fewer saved activations

    @classmethod
    def of(cls, model) -> ModelShape:
        """The shape of a built JanusModel (parameter counts as they are now: frozen = requires_grad False)."""
        from vlnflow.model.fused_kernels import is_fused

        text = model.qwen.config.text_config
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        return cls(
            layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
            heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            trainable_params=float(trainable), frozen_params=float(frozen), fused=is_fused(model.qwen),
        )

    def layer_bytes_per_token(self) -> int:
        """Activations one un-checkpointed decoder layer keeps per token (bf16 compute).

        Fused (Liger): each RMSNorm keeps its bf16 input and a per-row rstd instead of the float32 copy and the
        bf16 output (4h instead of 6h), SwiGLU keeps gate and up and recomputes silu(gate) in backward (6I
        instead of 8I): 12h + 4kv + 6I + 4heads, 155 KiB for the 7B shape instead of 206."""
        kv = self.kv_heads * self.head_dim
        if self.fused:
            return 12 * self.hidden + 4 * kv + 6 * self.intermediate + 4 * self.heads
        return 16 * self.hidden + 4 * kv + 8 * self.intermediate + 4 * self.heads

    def checkpointed_bytes_per_token(self) -> int:
        """A checkpointed layer keeps its input hidden state only."""
        return 2 * self.hidden

    def same_architecture(self, other: ModelShape) -> bool:
        """Same decoder (layers, widths, heads); parameter counts may differ slightly between builds."""
        keys = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


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
        if e.get("calibration_points"):
            lo, hi = e["calibrated_error"]
            cal = (f", calibration {e['calibration']:+.1f} against {e['calibration_points']} measured peaks in docs/results "
                   f"(the calibrated model over-estimates them by {lo:.1f} to {hi:.1f} GiB)")
        else:
            cal = f", not calibrated ({e.get('calibration_note') or 'no measured peaks of this shape'})"
        return (
            f"{head} (estimate {e['total']:.1f} of {e['budget']:.1f} GiB per GPU: states {e['states']:.1f}, "
            f"activations {e['activations']:.1f}{cal}, workspace {e['workspace']:.1f}{'' if self.fits else '; DOES NOT FIT'})"
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


def model_gib(shape: ModelShape, *, tokens: int, gpus: int, checkpointed: int, optimizer: bool = True,
              bucket_elements: float = 2e8, preset: str = "zero2") -> dict:
    """The uncalibrated model of one rank's allocated memory, GiB: {"states", "activations"} (no workspace)."""
    states = state_bytes(shape, gpus, optimizer=optimizer, bucket_elements=bucket_elements, preset=preset)
    full, thin = shape.layer_bytes_per_token(), shape.checkpointed_bytes_per_token()
    other = 16 * shape.hidden  # embeddings, final norm, label-head inputs
    recompute = full if checkpointed else 0  # backward re-materialises one checkpointed layer at a time
    kept = shape.layers - checkpointed
    return {"states": states / GIB, "activations": tokens * (kept * full + checkpointed * thin + recompute + other) / GIB}


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
    calibration: Calibration | None | str = "docs",
) -> CheckpointPlan:
    """Keep the most decoder layers un-checkpointed whose activations for `tokens` (one micro-batch) fit.

    `budget_gib` (GiB) None checkpoints every layer. Checkpointed layers are spread evenly over the
    depth. If even full checkpointing exceeds the budget, the plan says so (`fits` False) and
    checkpoints everything. `calibration`: "docs" = `calibration_for(shape, group)` (the measured peaks
    in docs/results of this preset, or of no optimizer, for the shape they were measured on), None = the
    bare model.
    """
    layers = shape.layers
    if budget_gib is None:
        return CheckpointPlan(layers, tuple(range(layers)), True)
    if tokens <= 0 or gpus <= 0:
        raise ValueError(f"checkpoint_plan needs tokens > 0 and gpus > 0, got {tokens}, {gpus}")
    group = preset if optimizer else None
    cal = calibration_for(shape, group) if calibration == "docs" else calibration
    shift = cal.correction_gib if cal else 0.0

    def allocated(kept: int) -> dict:
        return model_gib(shape, tokens=tokens, gpus=gpus, checkpointed=layers - kept, optimizer=optimizer,
                         bucket_elements=bucket_elements, preset=preset)  # fmt: skip

    def total(kept: int) -> float:
        a = allocated(kept)
        return a["states"] + a["activations"] + shift + workspace_gib

    kept = max((k for k in range(layers + 1) if total(k) <= budget_gib), default=None)
    fits = kept is not None
    kept = kept or 0
    n_ckpt = layers - kept
    checkpointed = tuple(sorted({round(i * layers / n_ckpt) for i in range(n_ckpt)})) if n_ckpt else ()
    estimate = {"budget": budget_gib, **allocated(kept), "workspace": workspace_gib, "tokens": tokens, "calibration": shift,
                "calibration_points": len(cal.errors) if cal else 0, "total": total(kept)}  # fmt: skip
    if cal:
        estimate["calibrated_error"] = cal.band
    else:
        estimate["calibration_note"] = "calibration off" if calibration is None else _calibration_note(shape, group)
    return CheckpointPlan(layers, checkpointed, fits, estimate)


# ---- calibration against measured peaks ----------------------------------------------------------


@dataclass(frozen=True)
class MeasuredPeak:
    """One measured case: its configuration (as the model takes it) and torch's peak allocated GiB on rank 0."""

    source: str
    tokens: int
    gpus: int
    preset: str | None  # None: no optimizer (one-GPU forward + backward)
    checkpointed: int
    measured_gib: float
    bucket_elements: float = 2e8
    fused: bool = False  # the case ran Liger's fused kernels (fewer saved activations)

    def model(self, shape: ModelShape) -> float:
        m = model_gib(dataclasses.replace(shape, fused=self.fused), tokens=self.tokens, gpus=self.gpus,
                      checkpointed=self.checkpointed, optimizer=self.preset is not None,
                      bucket_elements=self.bucket_elements, preset=self.preset or "zero2")  # fmt: skip
        return m["states"] + m["activations"]


@dataclass(frozen=True)
class Calibration:
    """A group's shift (GiB added to the model) and the bare model's error (estimate - measured) per peak;
    `group` is the DeepSpeed preset, None for forward+backward without an optimizer."""

    group: str | None
    errors: tuple[tuple[str, float], ...]

    @property
    def correction_gib(self) -> float:
        """Minus the smallest over-estimate: the calibrated model meets or exceeds every measured peak."""
        return -min(e for _, e in self.errors)

    @property
    def band(self) -> tuple[float, float]:
        """The calibrated model's error on the measured peaks, GiB (min, max); min is 0 by construction."""
        shifted = [e + self.correction_gib for _, e in self.errors]
        return min(shifted), max(shifted)


def measured_peaks(root: Path | str | None = None) -> list[MeasuredPeak]:
    """The peaks bench/bench_train.py measured, from docs/results/train_*.json (both modes; live-VGGT
    cases left out: the model has no VGGT in it). Results written before selective checkpointing
    (1d5b24e) do not name their checkpointed layers: every layer was recomputed then."""
    from vlnflow import docs_results

    peaks, seen = [], set()
    for name in docs_results.available(root):
        if not name.startswith("train_"):
            continue
        data = docs_results.load(name, root).data
        for case in data.get("cases", []):
            point = _peak_of(name, case)
            if point is not None and (key := (point.tokens, point.gpus, point.preset, point.checkpointed, round(point.measured_gib, 3))) not in seen:
                seen.add(key)
                peaks.append(point)
    return peaks


def _peak_of(name: str, case: dict) -> MeasuredPeak | None:
    if not case.get("ok") or case.get("live"):
        return None
    summary = case.get("summary") or {}
    source = f"{name}:{case['name']}"
    if "deepspeed" in case:  # --mode zero2: the trainer under DeepSpeed
        if not summary.get("peak_gib") or not summary.get("tokens_per_sample"):
            return None
        ckpt = case.get("checkpointed_layers")
        if ckpt is None:  # written before selective checkpointing (or the plan line was not found): every layer
            ckpt = case.get("layers") or ModelShape().layers
        return MeasuredPeak(source, round(summary["tokens_per_sample"] * case["per_device_batch"]), case["gpus"], case["deepspeed"],
                            ckpt, summary["peak_gib"], float(case.get("zero_bucket_elements") or 2e8))  # fmt: skip
    # --mode fwdbwd: one GPU, no optimizer; only cases that run the whole training model (not the stock model, not
    # the vision tower or the LLM alone: their memory is another function)
    if case.get("peak_gib") and case.get("samples") and "checkpointed_layers" in case and case.get("packing") in (None, "main", "workers"):
        tokens = round(case["tokens"] / case["samples"] * case["per_device_batch"])
        return MeasuredPeak(source, tokens, 1, None, case["checkpointed_layers"], case["peak_gib"], fused=bool(case.get("fused_kernels")))
    return None


@functools.cache
def _calibrations(root: str | None) -> dict[str | None, Calibration]:
    shape, groups = ModelShape(), {}
    for peak in measured_peaks(root):
        groups.setdefault(peak.preset, []).append((peak.source, peak.model(shape) - peak.measured_gib))
    return {group: Calibration(group, tuple(errors)) for group, errors in groups.items()}


def calibration_for(shape: ModelShape, group: str | None, root: Path | str | None = None) -> Calibration | None:
    """The calibration of `group` (a DeepSpeed preset, None = no optimizer) for the 7B shape the peaks were
    measured on; None for other shapes, or where docs/results is not there (a package without the repository)."""
    if not shape.same_architecture(ModelShape()):
        return None
    try:
        return _calibrations(None if root is None else str(root)).get(group)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable docs/results leaves the model uncalibrated
        log.warning("memory plan not calibrated: %s", exc)
        return None


def _calibration_note(shape: ModelShape, group: str | None) -> str:
    if not shape.same_architecture(ModelShape()):
        return "the measured peaks are of the 7B shape"
    return f"no measured peaks in docs/results for {group or 'forward+backward without an optimizer'}"


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
        ModelShape.of(model), tokens=tokens, gpus=world, budget_gib=tcfg.get("memory_budget_gib", CARD_GIB["H100 / H800 80GB"]),
        bucket_elements=float(tcfg.get("zero_bucket_elements") or zero.get("reduce_bucket_size", 2e8)),
        preset=tcfg["deepspeed"],
    )
    (log.info if plan.fits else log.warning)("%s", plan.describe())
    return plan
