"""The DeepSpeed training loop: packed batches, cached (or live) spatial features, metrics, checkpoints.

Run under torchrun (one process per GPU; `vlnflow launch` builds the command), or as a
single process: the missing torch.distributed variables are then filled in for one rank.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from pathlib import Path

import pandas as pd
import torch

from vlnflow.errors import UserError
from vlnflow.train import checkpoints, dist_check
from vlnflow.train.data import TrainSamples, keep_items, micro_batches
from vlnflow.train.deepspeed_config import build_ds_config
from vlnflow.train.metrics import MetricsLog, PhaseTimer, gpu_memory_gib
from vlnflow.train.spatial_source import SpatialSource

log = logging.getLogger("vlnflow.train")

TEST_KILL_ENV = "VLNFLOW_TEST_KILL_RANK_AT_STEP"  # TEST-ONLY fault injection, see _test_kill


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


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _test_kill(rank: int, step: int, resumed: dict | None) -> None:
    """TEST-ONLY fault injection for tests/slurm/test_slurm_train.py; never set it in a real run.

    With VLNFLOW_TEST_KILL_RANK_AT_STEP=R:K, rank R SIGKILLs itself right after optimizer step K
    (after that step's checkpoint, if one is due), as a node failure would. Only a run that started
    fresh is killed, so the resubmitted job, which resumes from a checkpoint, runs through.
    """
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec or resumed:
        return
    kill_rank, kill_step = (int(v) for v in spec.split(":"))
    if (rank, step) == (kill_rank, kill_step):
        log.error("%s=%s (test-only): killing rank %d, pid %d, after step %d", TEST_KILL_ENV, spec, rank, os.getpid(), step)
        os.kill(os.getpid(), signal.SIGKILL)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(config: dict, run_dir: str | Path, *, use_cache: bool = True, max_steps: int | None = None) -> dict:
    """Train per config['train']; returns a summary. Every rank calls this."""
    _single_process_env()
    device = _device()
    import deepspeed
    import torch.distributed as dist

    from vlnflow.model.loading import build_model, load_processors, resolve_model_config
    from vlnflow.model.batching import Collator
    from vlnflow.spatial.fingerprint import encoder_fingerprint, spatial_output

    tcfg = config["train"]
    backend = (os.environ.get("VLNFLOW_DIST_BACKEND") or "nccl") if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(run_dir)
    is_rank0 = rank == 0
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s (%s, backend %s)", dist_check.describe_rank(dist_check.rank_facts()), device, backend)
    if world > 1:  # before step 1: the nodes agree on the job's shape and see the same feature cache
        dist_check.verify_world(dist)
        if use_cache and tcfg["cache"] is not None:
            dist_check.verify_manifest(tcfg["cache"], dist)
    torch.manual_seed(tcfg["seed"])

    samples = pd.read_parquet(tcfg["samples"])
    if samples.empty:
        raise UserError(f"train.samples {tcfg['samples']} holds no samples")
    manifest = tcfg["cache"] if use_cache else None
    fingerprint = encoder_fingerprint(config["spatial"])
    source = SpatialSource(config, manifest, expected_fingerprint=fingerprint, allow_mismatch=tcfg["allow_fingerprint_mismatch"])
    grid, channels = spatial_output(config["spatial"])

    model_cfg = resolve_model_config(config)
    tokenizer, image_processor = load_processors(model_cfg)
    model = build_model(model_cfg, channels, grid, device=device)
    if tcfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    collator = Collator(tokenizer, image_processor, model_cfg, dataset_root=config["dataset"]["root"])

    bf16 = bool(tcfg["bf16"]) and device.type == "cuda"
    ds_config = build_ds_config({**tcfg, "bf16": bf16}, world, cpu=device.type == "cpu")
    per_epoch = len(samples) // (tcfg["per_device_batch"] * world) // tcfg["grad_accum"]
    if per_epoch == 0:
        raise UserError(
            f"{len(samples)} samples do not fill one optimizer step of {tcfg['per_device_batch']} x {world} ranks x "
            f"{tcfg['grad_accum']} accumulation steps"
        )
    total = max_steps or tcfg["max_steps"] or per_epoch * tcfg["epochs"]
    groups = param_groups(model, tcfg["lr"], tcfg["weight_decay"])
    adam = {"betas": (0.9, 0.999), "eps": 1e-8}
    if "offload_optimizer" in ds_config["zero_optimization"]:
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": tcfg["lr"]["llm"], "weight_decay": tcfg["weight_decay"], **adam}}
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(groups, lr=tcfg["lr"]["llm"], fused=device.type == "cuda", **adam)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tcfg["warmup_steps"], total)),
    )

    ckpt_dir = run_dir / "checkpoints"
    state = {"step": 0, "micro": 0, "cached": 0, "live": 0}
    resumed = checkpoints.load_latest(engine, ckpt_dir) if tcfg["resume"] else None
    if resumed:
        state.update({k: resumed[k] for k in state if k in resumed})
        if rank != 0:  # checkpoints hold global sample counts; rank 0 carries them on
            state["cached"] = state["live"] = 0
        log.info("resuming at optimizer step %d", state["step"])
    state["_live_logged"] = state["live"]  # the per-step live count in the log starts from the restored total
    source.cached, source.live = state["cached"], state["live"]

    dataset = TrainSamples(samples, collator, source, config["dataset"]["root"], config["spatial"]["image_size"])
    loader_cfg = tcfg["loader"]
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=is_rank0, append=bool(resumed))
    accum = tcfg["grad_accum"]
    micro_per_epoch = per_epoch * accum
    phases = PhaseTimer(enabled=tcfg["phase_timing"], device=device)
    losses, wait, step_started = [], 0.0, time.perf_counter()
    tokens = 0
    summary = {}
    while state["step"] < total:
        epoch, offset = divmod(state["micro"], micro_per_epoch)
        batches = micro_batches(len(samples), tcfg["per_device_batch"], world, rank, tcfg["seed"], epoch)[:micro_per_epoch]
        workers = loader_cfg["workers"]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches[offset:],
            collate_fn=keep_items,
            num_workers=workers,
            pin_memory=loader_cfg["pin_memory"] and device.type == "cuda",
            prefetch_factor=loader_cfg["prefetch_factor"] if workers else None,
            persistent_workers=loader_cfg["persistent_workers"] and workers > 0,
        )
        it = iter(loader)
        while state["step"] < total:
            t0 = time.perf_counter()
            try:
                items = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            feats = []
            n_live = 0
            for item in items:
                if item.features is None:
                    feats.append(source.encode_live(item.vggt_frames).cpu())
                    n_live += 1
                else:
                    feats.append(item.features)
            state["cached"] += len(items) - n_live
            state["live"] += n_live
            batch = collator.pack([i.encoded for i in items], feats)
            tokens += batch["input_ids"].numel()
            batch = _to_device(batch, device)
            with phases.measure("forward"):
                loss = engine(batch)
            with phases.measure("backward"):  # includes ZeRO's gradient reduction hooks
                engine.backward(loss)
            with phases.measure("step"):  # optimizer step at the accumulation boundary, else bookkeeping
                engine.step()
            losses.append(loss.detach().float())
            state["micro"] += 1
            if state["micro"] % accum:
                continue
            state["step"] += 1
            elapsed = time.perf_counter() - step_started
            stats = torch.tensor([torch.stack(losses).mean().item(), wait, tokens, state["cached"], state["live"]], dtype=torch.float64)
            if device.type == "cuda":
                stats = stats.to(device)
            dist.all_reduce(stats)
            mean_loss, wait_sum, tok_sum, cached, live = stats.tolist()
            n_samples = tcfg["per_device_batch"] * accum * world
            summary = {
                "step": state["step"],
                "max_steps": total,
                "epoch": state["micro"] / micro_per_epoch,
                "loss": mean_loss / world,
                "lr": engine.get_lr()[0],
                "s_per_it": elapsed,
                "data_wait_s": wait_sum / world,
                "samples_per_s": n_samples / elapsed,
                "tokens_per_s": tok_sum / elapsed,
                "cached_samples": int(cached),
                "live_samples": int(live),
                "gpu_mem_gib": gpu_memory_gib(),
                "world_size": world,
                "rank": rank,
                **phases.take(),
            }
            metrics.write(**summary)
            if state["step"] % tcfg["log_every"] == 0 and is_rank0:
                batch_live = int(live) - state.get("_live_logged", 0)
                if batch_live:
                    log.info("[ACCELERATION] step %d: %d samples computed live (VGGT), the rest from the cache", state["step"], batch_live)
                else:
                    log.info("[ACCELERATION] Using cached features for batch %d", state["step"])
                state["_live_logged"] = int(live)
                log.info("step %d/%d loss %.4f %.2f s/it %.2f samples/s", state["step"], total, summary["loss"], elapsed, summary["samples_per_s"])
            if state["step"] % tcfg["save_every"] == 0 or (state["step"] == total and tcfg["save_at_end"]):
                client = {"step": state["step"], "micro": state["micro"], "cached": int(cached), "live": int(live)}
                checkpoints.save(engine, ckpt_dir, state["step"], client, tcfg["keep_last"], is_rank0)
            _test_kill(rank, state["step"], resumed)
            losses, wait, tokens, step_started = [], 0.0, 0, time.perf_counter()
    metrics.close()
    dist.barrier()
    return summary
