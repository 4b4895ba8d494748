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
    samples = read_samples(tcfg["samples"])
    source, collator, model = build_model(config, device, use_cache)
    world = dist.get_world_size()
    per_epoch = steps_per_epoch(len(samples), tcfg, world)
    total = max_steps or tcfg["max_steps"] or per_epoch * tcfg["epochs"]
    engine = build_engine(model, tcfg, world, device, total)
    dataset = TrainSamples(samples, collator, source, config["dataset"]["root"], config["spatial"]["image_size"])
    return TrainRun(config, run_dir, device, dist.get_rank(), world, dist, engine, collator, source, dataset, total, per_epoch)


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


def read_samples(path: str) -> pd.DataFrame:
    samples = pd.read_parquet(path)
    if samples.empty:
        raise UserError(f"train.samples {path} holds no samples")
    return samples


def steps_per_epoch(n_samples: int, tcfg: dict, world: int) -> int:
    """Optimizer steps per epoch (the tail that does not fill a step is dropped); at least one."""
    per_epoch = n_samples // (tcfg["per_device_batch"] * world) // tcfg["grad_accum"]
    if per_epoch == 0:
        raise UserError(
            f"{n_samples} samples do not fill one optimizer step of {tcfg['per_device_batch']} x {world} ranks x "
            f"{tcfg['grad_accum']} accumulation steps"
        )
    return per_epoch


def build_model(config: dict, device: torch.device, use_cache: bool):
    """(spatial feature source, collator, JanusModel in train mode) for this run's settings."""
    from vlnflow.model.batching import Collator
    from vlnflow.model.loading import build_model as build_janus, load_processors, resolve_model_config
    from vlnflow.spatial.fingerprint import encoder_fingerprint, spatial_output

    tcfg = config["train"]
    manifest = tcfg["cache"] if use_cache else None
    fingerprint = encoder_fingerprint(config["spatial"])
    source = SpatialSource(config, manifest, expected_fingerprint=fingerprint, allow_mismatch=tcfg["allow_fingerprint_mismatch"])
    grid, channels = spatial_output(config["spatial"])
    model_cfg = resolve_model_config(config)
    tokenizer, image_processor = load_processors(model_cfg)
    model = build_janus(model_cfg, channels, grid, device=device)
    if tcfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    collator = Collator(tokenizer, image_processor, model_cfg, dataset_root=config["dataset"]["root"])
    return source, collator, model


# ---- optimizer and engine -------------------------------------------------------------------------


def param_groups(model, lrs: dict, weight_decay: float) -> list[dict]:
    """LLM, merger and (if trainable) vision-tower parameters with their own learning rates."""
    merger = {id(p) for p in model.merger.parameters()}
    vision = {id(p) for p in model.visual.parameters()}
    groups = {"llm": [], "merger": [], "vision": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        name = "merger" if id(p) in merger else "vision" if id(p) in vision else "llm"
        groups[name].append(p)
    out = []
    for name, params in groups.items():
        if params and lrs[name] > 0:
            out.append({"params": params, "lr": lrs[name], "weight_decay": weight_decay, "name": name})
        elif params:
            for p in params:
                p.requires_grad_(False)
    return out


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
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg["warmup_steps"], total)),
    )
    return engine
