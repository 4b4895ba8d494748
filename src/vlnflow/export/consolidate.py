"""One ZeRO checkpoint of a run -> the full model's tensors, under their on-disk names.

The checkpoint is consolidated by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`
(lazy: one tensor at a time). `train.checkpoints.save` writes tags `step_XXXXXXX` and
marks a finished save with `vlnflow_complete`; only such tags are exported. It saves with
`exclude_frozen_parameters=True`, so frozen parameters (the vision blocks; everything
whose learning rate is 0) are not in it: they are taken from the base model the run
started from, rebuilt the way `train.trainer` built it (`model.qwen_path`, or the seeded
random init in the training dtype, which is recorded in the checkpoint's ds_config; a
random base trained on GPU is rebuilt on a GPU, where its init was drawn).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlnflow.errors import UserError
from vlnflow.export.names import ACTION_HEAD_PREFIX, MERGER_PREFIX, qwen_to_disk, to_disk, unpad_vision_mlp
from vlnflow.train import checkpoints

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Consolidated:
    """The model of one checkpoint: Qwen tensors (disk names), merger tensors (`merger.*`), the action head's
    (`action_head.*`, empty without one), provenance."""

    qwen: dict[str, torch.Tensor]
    merger: dict[str, torch.Tensor]
    qwen_config: object  # transformers Qwen2_5_VLConfig of the base model
    step: int
    tag: str
    trained: list[str] = field(default_factory=list)  # disk names that came from the checkpoint
    frozen_from: str = ""
    action_head: dict[str, torch.Tensor] = field(default_factory=dict)


def select_tag(ckpt_dir: Path, step: int | None) -> str:
    """The newest complete checkpoint tag, or the one of `step`; UserError when there is none."""
    tags = checkpoints.complete_tags(ckpt_dir)
    if not tags:
        raise UserError(f"{ckpt_dir}: no complete checkpoint (a step_XXXXXXX folder with vlnflow_complete); train first")
    if step is None:
        return tags[-1]
    tag = checkpoints.tag_for(step)
    if tag not in tags:
        raise UserError(f"{ckpt_dir}: no complete checkpoint for step {step}; complete ones: {', '.join(tags)}")
    return tag


def training_dtype(tag_dir: Path) -> torch.dtype:
    """The dtype the run trained in, from the ds_config saved in the checkpoint's model states."""
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{tag_dir}: no DeepSpeed model states file (*model_states.pt)")
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)  # DeepSpeed's own format
    ds = state.get("ds_config") or {}
    if (ds.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def consolidate(run_dir: Path, model_cfg: dict, step: int | None = None, dtype: torch.dtype = torch.bfloat16) -> Consolidated:
    """Consolidate run_dir/checkpoints/<tag> into full-model tensors cast to `dtype`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vlnflow.model.loading import load_qwen

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = select_tag(ckpt_dir, step)
    trained_in = training_dtype(ckpt_dir / tag)
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)

    device = _base_device(model_cfg, trained_in)
    base = load_qwen(model_cfg, trained_in, device)
    width = base.config.vision_config.intermediate_size
    qwen, merger, head, trained = {}, {}, {}, []
    for name, lazy_tensor in lazy.items():
        disk = to_disk(name)
        tensor = unpad_vision_mlp(disk, lazy_tensor.contiguous(), width).to(dtype)
        part = merger if disk.startswith(MERGER_PREFIX) else head if disk.startswith(ACTION_HEAD_PREFIX) else qwen
        part[disk] = tensor
        trained.append(disk)
    if not merger:
        raise UserError(f"{ckpt_dir / tag}: the checkpoint holds no merger weights (merger.*): not a vlnflow run")
    frozen = 0
    for name, tensor in base.state_dict().items():
        disk = qwen_to_disk(name)
        if disk not in qwen:
            qwen[disk] = tensor.detach().to("cpu", dtype)
            frozen += 1
        elif tuple(qwen[disk].shape) != tuple(tensor.shape):
            raise UserError(f"{ckpt_dir / tag}: {disk} has shape {tuple(qwen[disk].shape)}, the base model {tuple(tensor.shape)}")
    source = model_cfg.get("qwen_path") or f"random init (preset {model_cfg.get('preset', 'tiny')}, seed {model_cfg.get('seed', 0)}, {trained_in}, {device})"
    log.info("consolidated %s: %d tensors from the checkpoint, %d frozen ones from %s", tag, len(trained), frozen, source)
    return Consolidated(qwen, merger, base.config, int(tag[5:]), tag, sorted(trained), str(source), head)


def _base_device(model_cfg: dict, trained_in: torch.dtype) -> str:
    """Where to rebuild the base: a random init drawn on GPU (bf16/fp16 runs) is only reproduced on a GPU."""
    if model_cfg.get("qwen_path") or trained_in == torch.float32:
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(
            "this run trained a random-init Qwen on GPU; its frozen weights were drawn there and can only be "
            "rebuilt exactly on a GPU: run the export on a GPU node"
        )
    return "cuda"
