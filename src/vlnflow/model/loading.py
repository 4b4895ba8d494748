"""Build the training model and its tokenizer/image processor from the `model:` config section.

`model.qwen_path` set: Qwen2.5-VL weights, tokenizer and processor from that local
directory (never the network). Unset: random init, `model.preset` tiny (demo, tests)
or qwen2.5-vl-7b (the real shape, for GPU benchmarks), with the tokenizer built by code.
`model.init_from` set: the whole model (Qwen + merger), tokenizer and processor from a
`vlnflow export` directory or a JanusVLN checkpoint (vlnflow.model.model_dir).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import logging

import torch

from vlnflow import fa4
from vlnflow.model import fused_kernels
from vlnflow.config import ConfigError
from vlnflow.model.janus import JanusModel
from vlnflow.model.objective import ActionHead, Objective
from vlnflow.model.packed_attention import use_packed_attention
from vlnflow.model.spatial_merger import SpatialMerger
from vlnflow.model.tiny import (
    build_image_processor,
    build_tiny_tokenizer,
    qwen7b_config,
    random_qwen,
    special_token_ids,
    tiny_config,
)
from vlnflow.model.model_dir import trained_preprocess
from vlnflow.model.vision_fast import apply_vision_fast
from vlnflow.spatial.geometry import FrameGeometry, geometry_of

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `model` section, checked against the run's frame geometry (the deprecated model.image_size must agree
    with spatial.image_size, then is dropped: Qwen's image size comes from `frame_geometry`)."""
    model_cfg = dict(config["model"])
    geometry_of(config["spatial"], model_cfg)
    model_cfg.pop("image_size", None)
    return model_cfg


def frame_geometry(config: Mapping[str, Any]) -> FrameGeometry:
    """How the run prepares every frame for VGGT and Qwen (vlnflow.spatial.geometry)."""
    return geometry_of(config["spatial"], config.get("model"))


def compute_dtype(model_cfg: Mapping[str, Any], device: torch.device | str | None) -> torch.dtype:
    """`model.dtype` on GPU; float32 on CPU (bf16 matmuls on CPU are slow and fp16 is unsupported)."""
    if device is None or torch.device(device).type == "cpu":
        return torch.float32
    return DTYPES[model_cfg.get("dtype", "bfloat16")]


def load_processors(model_cfg: Mapping[str, Any], geometry: FrameGeometry):
    """(tokenizer, image processor pinned to the geometry's Qwen image size) for the configured Qwen."""
    if model_cfg.get("init_from"):
        return _processors_from_init_dir(model_cfg, geometry)
    path = _qwen_dir(model_cfg)
    if path is None:
        tokenizer = build_tiny_tokenizer(_tiny_sizes(model_cfg)["vocab_size"])
        return tokenizer, build_image_processor(geometry.qwen_hw)
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return tokenizer, build_image_processor(geometry.qwen_hw, base=base)


def qwen_config(model_cfg: Mapping[str, Any]):
    """The Qwen2.5-VL config of qwen_path or the random-init preset, without building weights (FLOP counts);
    None with model.init_from (its config is read when the model is built)."""
    if model_cfg.get("init_from"):
        return None
    path = _qwen_dir(model_cfg)
    if path is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = build_tiny_tokenizer(_tiny_sizes(model_cfg)["vocab_size"])
    if model_cfg.get("preset", "tiny") == "qwen2.5-vl-7b":
        return qwen7b_config(special_token_ids(tokenizer))
    return tiny_config(tokenizer, _tiny_sizes(model_cfg))


def load_qwen(model_cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32, device=None):
    """Qwen2_5_VLForConditionalGeneration with sdpa attention, from qwen_path or random per preset."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if model_cfg.get("init_from"):
        return _qwen_from_init_dir(model_cfg, dtype, device)
    path = _qwen_dir(model_cfg)
    if path is not None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
    else:
        with torch.device(device or "cpu"):
            model = random_qwen(qwen_config(model_cfg), int(model_cfg.get("seed", 0)), dtype)
    return model.to(device) if device is not None else model


def build_model(
    model_cfg: Mapping[str, Any],
    spatial_channels: int,
    grid: tuple[int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> JanusModel:
    """The composed JanusVLN-style model for spatial maps of `grid` (gh, gw) x `spatial_channels`."""
    dtype = dtype or compute_dtype(model_cfg, device)
    kernel = attention_kernel(model_cfg, device, dtype)
    qwen = load_qwen(model_cfg, dtype, device)
    vision = "transformers' own (vision_fast off)"
    if model_cfg.get("vision_fast", True):
        compiled = vision_compile(model_cfg, device)
        apply_vision_fast(qwen.model.visual, attention=kernel, compile=compiled)
        vision = f"{kernel} varlen" + (", blocks torch.compile'd" if compiled else "")
    llm = "sdpa (transformers' block-diagonal mask)"
    if model_cfg.get("llm_attention", "varlen") == "varlen":
        use_packed_attention(qwen, kernel)
        llm = f"{kernel} varlen, causal per sample" + ("" if kernel == fa4.FA4 else " (flash on CUDA, SDPA elsewhere)")
    fused = fused_kernels.resolve(model_cfg.get("fused_kernels", "auto"), device)
    if fused == fused_kernels.LIGER:
        counts = fused_kernels.apply_fused_kernels(qwen)
        llm += f"; Liger RMSNorm x{counts['rms_norm']}, SwiGLU x{counts['swiglu']}, RoPE x{counts['rope']}"
    log.info("kernels: LLM %s; vision tower %s (model.attention=%s, model.fused_kernels=%s)", llm, vision,
             model_cfg.get("attention", "auto"), model_cfg.get("fused_kernels", "auto"))
    merger = _build_merger(model_cfg, spatial_channels, qwen.config.text_config.hidden_size)
    merger.to(device=device or "cpu", dtype=dtype)
    head = _build_action_head(model_cfg, qwen.config)
    if head is not None:
        head.to(device=device or "cpu", dtype=dtype)
    return JanusModel(
        qwen,
        merger,
        grid,
        lam=float(model_cfg.get("lam", 0.2)),
        freeze_vision=bool(model_cfg.get("freeze_vision", True)),
        train_visual_merger=bool(model_cfg.get("train_visual_merger", False)),
        action_head=head,
        objective=Objective.from_model_config(model_cfg),
    )


def vision_compile(model_cfg: Mapping[str, Any], device) -> bool:
    """`model.compile_vision`: auto compiles the frozen tower's blocks on CUDA (vlnflow.model.vision_fast V3)."""
    setting = model_cfg.get("compile_vision", "auto")
    if setting not in ("auto", True, False):
        raise ConfigError(f"config setting 'model.compile_vision' must be auto, true or false, got {setting!r}")
    if setting == "auto":
        return device is not None and torch.device(device).type == "cuda"
    return bool(setting)


def _build_action_head(model_cfg: Mapping[str, Any], qwen_config) -> ActionHead | None:
    """The seed's action head when model.action_head.enabled: from model.init_from's `action_head.*` when the
    directory has them, else a seeded fresh init (as the seed's from_pretrained inits a head the weights lack)."""
    if not (model_cfg.get("action_head") or {}).get("enabled"):
        if model_cfg.get("init_from"):
            from vlnflow.model.model_dir import ACTION_HEAD_PREFIX

            if _init_dir(model_cfg).has(ACTION_HEAD_PREFIX):
                log.info("model.init_from %s has an action head; model.action_head.enabled is false: it is not used",
                         model_cfg["init_from"])
        return None
    hidden = qwen_config.text_config.hidden_size
    std = float(getattr(qwen_config.text_config, "initializer_range", None) or getattr(qwen_config, "initializer_range", 0.02))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(model_cfg.get("seed", 0)) + 2)
        head = ActionHead(hidden, std)
    if model_cfg.get("init_from"):
        from vlnflow.model.model_dir import action_head_state

        model_dir = _init_dir(model_cfg)
        state = action_head_state(model_dir)
        if state is None:
            log.warning("model.init_from %s has no action_head.* tensors: the action head starts from a fresh init",
                        model_dir.path)
            return head
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"config setting 'model.init_from': {model_dir.path} action head does not fit: {exc}") from exc
    return head


def attention_kernel(model_cfg: Mapping[str, Any], device, dtype: torch.dtype) -> str:
    """`model.attention` resolved for this device: flash_attn_4 or torch (vlnflow.model.varlen)."""
    setting = model_cfg.get("attention", "auto")
    kernel = fa4.resolve(setting, "model.attention", device, "torch", (fa4.FA4, "torch"))
    if kernel == fa4.FA4 and dtype not in fa4.HALF:
        if setting == fa4.FA4:
            raise ConfigError(f"config setting 'model.attention' is {fa4.FA4!r}, which needs model.dtype bfloat16 or float16, not {dtype}")
        kernel = "torch"
    return kernel


def _build_merger(model_cfg: Mapping[str, Any], channels: int, out_dim: int) -> SpatialMerger:
    if model_cfg.get("init_from"):
        return _merger_from_init_dir(model_cfg, channels, out_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(model_cfg.get("seed", 0)) + 1)
        merger = SpatialMerger(channels, int(model_cfg.get("merger_hidden", 4096)), out_dim)
    weights = model_cfg.get("merger_weights")
    if weights:
        from safetensors.torch import load_file

        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"config setting 'model.merger_weights': file not found: {path}")
        state = {k.removeprefix("merger."): v for k, v in load_file(str(path)).items() if not k.startswith("vggt.")}
        state = {k: v for k, v in state.items() if k.startswith(("ln_q.", "mlp."))}
        try:
            merger.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"config setting 'model.merger_weights': {path} does not fit the merger: {exc}") from exc
    return merger


def _qwen_dir(model_cfg: Mapping[str, Any]) -> Path | None:
    path = model_cfg.get("qwen_path")
    if not path:
        return None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"config setting 'model.qwen_path': no Qwen2.5-VL checkpoint (config.json) in {path}")
    return path


def _tiny_sizes(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    from vlnflow.model.tiny import TINY_DEFAULTS

    return {**TINY_DEFAULTS, **(model_cfg.get("tiny") or {})}


# ---- model.init_from: a vlnflow export or a JanusVLN checkpoint directory ----------------------


def _init_dir(model_cfg: Mapping[str, Any]):
    """The checked model directory of `model.init_from` (the reader checks each directory once per process)."""
    from vlnflow.model.model_dir import open_model_dir

    path = Path(model_cfg["init_from"])
    if model_cfg.get("qwen_path"):
        raise ConfigError("config settings 'model.init_from' and 'model.qwen_path' are both set: keep one")
    if not path.is_dir():
        raise ConfigError(f"config setting 'model.init_from': directory not found: {path}")
    return open_model_dir(path)


def _processors_from_init_dir(model_cfg: Mapping[str, Any], geometry: FrameGeometry):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = _init_dir(model_cfg).path
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return tokenizer, build_image_processor(geometry.qwen_hw, base=base)


def check_init_preprocess(model_cfg: Mapping[str, Any], geometry: FrameGeometry) -> None:
    """`model.init_from` trained on the other frame preprocessing (crop vs pad) is an error naming both, unless
    model.allow_preprocess_mismatch; a JanusVLN checkpoint records none and is only logged."""
    if not model_cfg.get("init_from"):
        return
    model_dir = _init_dir(model_cfg)
    trained = trained_preprocess(model_dir)
    if trained is None:
        log.warning("model.init_from %s records no frame preprocessing (a JanusVLN checkpoint: upstream JanusVLN trains "
                    "with crop); this run uses %s", model_dir.path, geometry.mode)
        return
    if trained != geometry.mode:
        message = (f"model.init_from {model_dir.path} was trained on {trained!r} frames but this run's "
                   f"spatial.preprocess is {geometry.mode!r}: its evaluation would see frames unlike its training")
        if not model_cfg.get("allow_preprocess_mismatch"):
            raise ConfigError(message + "; set spatial.preprocess to match, or model.allow_preprocess_mismatch: true "
                              "for a deliberate experiment")
        log.warning("%s (model.allow_preprocess_mismatch set)", message)


def _qwen_from_init_dir(model_cfg: Mapping[str, Any], dtype: torch.dtype, device):
    from vlnflow.model.model_dir import load_qwen_from_dir

    return load_qwen_from_dir(_init_dir(model_cfg), dtype, device)


def _merger_from_init_dir(model_cfg: Mapping[str, Any], channels: int, out_dim: int) -> SpatialMerger:
    """The directory's `merger.*` as a SpatialMerger; its width comes from the weights, not model.merger_hidden."""
    from vlnflow.model.model_dir import merger_state

    model_dir = _init_dir(model_cfg)
    state = merger_state(model_dir)
    if "mlp.0.weight" not in state or "ln_q.weight" not in state:
        raise ConfigError(f"config setting 'model.init_from': {model_dir.path} has no merger.ln_q / merger.mlp.0 weights")
    if state["ln_q.weight"].shape[0] != channels:
        raise ConfigError(
            f"config setting 'model.init_from': the merger in {model_dir.path} takes {state['ln_q.weight'].shape[0]} "
            f"spatial channels, the configured VGGT gives {channels}"
        )
    with torch.device("meta"):
        merger = SpatialMerger(channels, int(state["mlp.0.weight"].shape[0]), out_dim)
    merger = merger.to_empty(device="cpu")
    try:
        merger.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"config setting 'model.init_from': {model_dir.path} merger does not fit: {exc}") from exc
    return merger
