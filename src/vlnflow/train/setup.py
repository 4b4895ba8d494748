"""Build one training run: distributed init, samples, model, DeepSpeed engine -> `TrainRun`.

Everything the loop needs and that does not change while it runs lives in `TrainRun`;
what changes per step (counters, losses) lives in the loop (vlnflow.train.trainer).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from vlnflow.errors import UserError
from vlnflow.train import dist_check
from vlnflow.train.data import TrainSamples
from vlnflow.train.deepspeed_config import build_ds_config
from vlnflow.train.memory_plan import plan_for_run
from vlnflow.train.spatial_source import SpatialSource

log = logging.getLogger("vlnflow.train")


@dataclass
class TrainRun:
    """The fixed parts of a run: where it writes, who this rank is, the engine and its data."""

    config: dict
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    dist: Any  # torch.distributed, initialised
    engine: Any  # deepspeed.DeepSpeedEngine around the JanusModel
    collator: Any  # vlnflow.model.batching.Collator
    source: SpatialSource
    dataset: TrainSamples
    val: TrainSamples | None  # held-out episodes (dataset.val_fraction), None without any
    total: int  # optimizer steps this run trains to
    per_epoch: int  # optimizer steps per epoch

    @property
    def tcfg(self) -> dict:
        return self.config["train"]

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def accum(self) -> int:
        return self.tcfg["grad_accum"]

    @property
    def micro_per_epoch(self) -> int:
        return self.per_epoch * self.accum

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def build_run(config: dict, run_dir: str | Path, *, use_cache: bool = True, max_steps: int | None = None) -> TrainRun:
    """Every rank calls this: join the job, check it, then build data, model and engine."""
    tcfg = config["train"]
    run_dir = Path(run_dir)
    device, dist = init_distributed(config, run_dir, use_cache)
    torch.manual_seed(tcfg["seed"])
    samples, held_out = read_samples(tcfg["samples"], config["dataset"]["val_fraction"])
    world = dist.get_world_size()
    source, collator, model = build_model(config, device, use_cache, world)
    per_epoch = steps_per_epoch(len(samples), tcfg, world)
    total = max_steps or tcfg["max_steps"] or per_epoch * tcfg["epochs"]
    engine = build_engine(model, tcfg, world, device, total)
    root = config["dataset"]["root"]
    dataset = TrainSamples(samples, collator, source, root)
    val = TrainSamples(held_out, collator, source, root) if len(held_out) else None
    return TrainRun(config, run_dir, device, dist.get_rank(), world, dist, engine, collator, source, dataset, val, total, per_epoch)


# ---- distributed ----------------------------------------------------------------------------------


def _single_process_env() -> None:
    """DeepSpeed needs the torchrun variables; without them it looks for MPI and fails."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def init_distributed(config: dict, run_dir: Path, use_cache: bool):
    """(device, torch.distributed) after joining the job; with several ranks, before step 1 the
    nodes agree on the job's shape and see the same feature cache."""
    _single_process_env()
    device = _device()
    import deepspeed
    import torch.distributed as dist

    tcfg = config["train"]
    backend = (os.environ.get("VLNFLOW_DIST_BACKEND") or "nccl") if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s (%s, backend %s)", dist_check.describe_rank(dist_check.rank_facts()), device, backend)
    if dist.get_world_size() > 1:
        dist_check.verify_world(dist)
        if use_cache and tcfg["cache"] is not None:
            dist_check.verify_manifest(tcfg["cache"], dist)
    return device, dist


# ---- data and model -------------------------------------------------------------------------------


def read_samples(path: str, val_fraction: float = 0.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training samples, held-out samples): whole episodes held out per dataset.val_fraction."""
    from vlnflow.data.split import split_by_episode

    samples = pd.read_parquet(path)
    if samples.empty:
        raise UserError(f"train.samples {path} holds no samples")
    train, val = split_by_episode(samples, val_fraction)
    if val_fraction > 0:
        if val.empty or train.empty:
            raise UserError(
                f"dataset.val_fraction {val_fraction} holds out {val.episode_id.nunique()} of "
                f"{samples.episode_id.nunique()} episodes in {path}: choose a fraction that leaves both sides non-empty"
            )
        log.info("validation: %d samples of %d episode(s) held out (dataset.val_fraction %g), %d samples train",
                 len(val), val.episode_id.nunique(), val_fraction, len(train))
    return train, val


def steps_per_epoch(n_samples: int, tcfg: dict, world: int) -> int:
    """Optimizer steps per epoch (the tail that does not fill a step is dropped); at least one."""
    per_epoch = n_samples // (tcfg["per_device_batch"] * world) // tcfg["grad_accum"]
    if per_epoch == 0:
        raise UserError(
            f"{n_samples} samples do not fill one optimizer step of {tcfg['per_device_batch']} x {world} ranks x "
            f"{tcfg['grad_accum']} accumulation steps"
        )
    return per_epoch


def build_model(config: dict, device: torch.device, use_cache: bool, world: int = 1):
    """(spatial feature source, collator, JanusModel in train mode) for this run's settings; the decoder
    layers recomputed in backward follow train.memory_budget_gib for `world` ranks (vlnflow.train.memory_plan)."""
    from vlnflow.model.batching import Collator
    from vlnflow.model.loading import build_model as build_janus, check_init_preprocess, frame_geometry, load_processors
    from vlnflow.model.loading import resolve_model_config
    from vlnflow.spatial.fingerprint import encoder_fingerprint, spatial_output

    tcfg = config["train"]
    manifest = tcfg["cache"] if use_cache else None
    fingerprint = encoder_fingerprint(config["spatial"])
    source = SpatialSource(config, manifest, expected_fingerprint=fingerprint, allow_mismatch=tcfg["allow_fingerprint_mismatch"])
    grid, channels = spatial_output(config["spatial"])
    model_cfg = resolve_model_config(config)
    geometry = frame_geometry(config)
    check_init_preprocess(model_cfg, geometry)
    log.info("frames: %s", geometry.describe())
    tokenizer, image_processor = load_processors(model_cfg, geometry)
    if tcfg["deepspeed"] == "zero3" and model_cfg.get("compile_vision", "auto") == "auto":
        model_cfg["compile_vision"] = False  # ZeRO-3 gathers partitioned weights in module hooks: keep the tower eager
    model = build_janus(model_cfg, channels, grid, device=device)
    plan = plan_for_run(config, model, world)  # None when train.gradient_checkpointing is false; logs the plan
    if plan is not None:
        model.checkpoint_layers(plan.checkpointed)
    model.train()
    collator = Collator(tokenizer, image_processor, geometry, dataset_root=config["dataset"]["root"])
    return source, collator, model


# ---- optimizer and engine -------------------------------------------------------------------------


def param_groups(model, lrs: dict, weight_decay: float) -> list[dict]:
    """Trainable parameters in groups with their own learning rate, as JanusVLN's trainer groups them.

    A parameter whose name contains "merger" (the VGGT merger, Qwen's visual.merger) gets lr.merger,
    the rest of the vision tower lr.vision, everything else lr.llm; a rate of 0 freezes the group.
    With weight decay, each group splits in two: biases and nn.LayerNorm parameters get none (HF's
    rule, which JanusVLN uses: RMSNorm weights are decayed), the "<name>_no_decay" group.
    The seed's action head (`action_head.*`) is in the llm group: the seed trains it at --learning_rate.
    """
    if getattr(model, "action_head", None) is not None and lrs["llm"] <= 0:
        raise UserError("model.action_head is enabled but train.lr.llm is 0: the head trains at the LLM's learning "
                        "rate (the seed always trains it); give train.lr.llm a rate or turn the head off")
    no_decay = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    vision = {id(p) for p in model.visual.parameters()}
    groups: dict[str, list] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "merger" if "merger" in pname else "vision" if id(p) in vision else "llm"
        if lrs[kind] <= 0:
            p.requires_grad_(False)
            continue
        exempt = weight_decay > 0 and ("bias" in pname or id(p) in no_decay)
        groups.setdefault((kind, exempt), []).append(p)
    out = []
    for kind in ("llm", "merger", "vision"):
        for exempt in (False, True):
            params = groups.get((kind, exempt))
            if params:
                name = f"{kind}_no_decay" if exempt else kind
                out.append({"params": params, "lr": lrs[kind], "weight_decay": 0.0 if exempt else weight_decay, "name": name})
    return out


def warmup_steps(tcfg: dict, total: int) -> int:
    """train.warmup_steps, else ceil(train.warmup_ratio x total steps), as HF's TrainingArguments."""
    return tcfg["warmup_steps"] or math.ceil(tcfg.get("warmup_ratio", 0.0) * total)


def lr_lambda(warmup: int, total: int):
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(model, tcfg: dict, world: int, device: torch.device, total: int):
    """The DeepSpeed engine: the packaged ZeRO preset, AdamW over the parameter groups, warmup + cosine."""
    import deepspeed

    bf16 = bool(tcfg["bf16"]) and device.type == "cuda"
    ds_config = build_ds_config({**tcfg, "bf16": bf16}, world, cpu=device.type == "cpu")
    groups = param_groups(model, tcfg["lr"], tcfg["weight_decay"])
    adam = {"betas": (0.9, 0.999), "eps": 1e-8}
    if "offload_optimizer" in ds_config["zero_optimization"]:
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": tcfg["lr"]["llm"], "weight_decay": tcfg["weight_decay"], **adam}}
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(groups, lr=tcfg["lr"]["llm"], fused=device.type == "cuda", **adam)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps(tcfg, total), total)),
    )
    return engine
