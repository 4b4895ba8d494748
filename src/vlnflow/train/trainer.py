"""The DeepSpeed training loop: packed batches, cached (or live) spatial features, metrics, checkpoints.

Run under torchrun (one process per GPU; `vlnflow launch` builds the command), or as a
single process: the missing torch.distributed variables are then filled in for one rank.

`train` reads as its steps: build the run (vlnflow.train.setup), restore the newest
checkpoint, then per micro-step `next_micro_batch` + `micro_step`, and at each
accumulation boundary `finish_step` (reduce, metrics, log lines), the held-out evaluation
when due (vlnflow.train.evaluate), `save_if_due` and the stop check (vlnflow.train.stop:
a warned or time-budgeted run saves where the ranks agree and returns `stopped`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlnflow.train import checkpoints
from vlnflow.train.attempts import AttemptLog
from vlnflow.train.data import micro_batches
from vlnflow.train.evaluate import evaluate
from vlnflow.train.loss_terms import step_terms
from vlnflow.train.metrics import MetricsLog, PhaseTimer, gpu_memory_gib, restore_history
from vlnflow.train.packed_loader import DeviceBatches, PackInWorker
from vlnflow.train.setup import TrainRun, build_run
from vlnflow.train.stop import StopControl, launched_at

log = logging.getLogger("vlnflow.train")

TEST_KILL_ENV = "VLNFLOW_TEST_KILL_RANK_AT_STEP"  # TEST-ONLY fault injection, see _test_kill


@dataclass
class Progress:
    """Where the run stands; `step`, `micro`, `cached`, `live` go into every checkpoint."""

    step: int = 0
    micro: int = 0
    cached: int = 0  # samples read from the cache (global after a reduce; rank 0 carries restored totals)
    live: int = 0  # samples encoded live
    live_logged: int = 0  # the global live count at the last [ACCELERATION] line

    def client_state(self, cached: int, live: int) -> dict:
        return {"step": self.step, "micro": self.micro, "cached": cached, "live": live}


@dataclass
class StepWindow:
    """What one optimizer step's micro-steps add up: their losses (and loss terms), DataLoader wait, tokens, and
    the host-side counts a FLOP count needs (label positions, sum of squared sample lengths, images; vlnflow.flops)."""

    losses: list = field(default_factory=list)
    terms: list = field(default_factory=list)  # vlnflow.model.objective.TERMS per micro-step
    wait: float = 0.0
    tokens: int = 0
    labels: int = 0
    tokens_sq: int = 0
    images: int = 0
    vision_cached: int = 0  # frames whose Qwen vision rows came from the per-frame vision cache
    started: float = field(default_factory=time.perf_counter)


def train(config: dict, run_dir: str | Path, *, use_cache: bool = True, max_steps: int | None = None) -> dict:
    """Train per config['train']; returns a summary. Every rank calls this."""
    run = build_run(config, run_dir, use_cache=use_cache, max_steps=max_steps)
    stop = StopControl.for_run(run.tcfg, run.dist, run.device, run.total)
    progress, resumed = restore(run)
    attempt = AttemptLog.begin(run.run_dir, enabled=run.is_rank0, resumed_step=progress.step, fresh=not resumed,
                               launched=launched_at())
    tb = run.run_dir / "tb" if run.tcfg["tensorboard"] else None
    metrics = MetricsLog(run.run_dir / "metrics.jsonl", enabled=run.is_rank0, append=bool(resumed), tensorboard_dir=tb,
                         resumed_step=progress.step)
    phases = PhaseTimer(enabled=run.tcfg["phase_timing"], device=run.device)
    window, summary = StepWindow(), {}
    while progress.step < run.total and not stop.reason:
        batches = epoch_batches(run, progress.micro)
        while progress.step < run.total:
            batch = next_micro_batch(run, batches, progress, window)
            if batch is None:  # epoch done: the outer loop starts the next one
                break
            micro_step(run, batch, phases, window)
            progress.micro += 1
            if progress.micro % run.accum:
                continue
            progress.step += 1
            summary, cached, live = finish_step(run, progress, window, phases, metrics)
            attempt.step_done(run.world)
            if eval_due(run, progress.step):
                metrics.write(**evaluate(run, run.val, progress.step))
            saved = save_if_due(run, progress, cached, live, attempt)
            _test_kill(run.rank, progress.step, resumed)
            window = StepWindow()
            if stop.check(progress.step, saved):  # every rank, every step: one all-reduce
                if not saved:
                    save(run, progress, cached, live, attempt)
                break
    metrics.close()
    run.dist.barrier()
    stop.finish(progress.step, run.is_rank0)
    attempt.end(progress.step, stop.reason or "done", stop.why)
    return {**summary, "stopped": stop.reason} if stop.reason else summary


# ---- checkpoint / resume ----------------------------------------------------------------------------


def restore(run: TrainRun) -> tuple[Progress, dict | None]:
    """Progress from the newest complete checkpoint (train.resume), or a fresh start."""
    progress = Progress()
    resumed = checkpoints.load_latest(run.engine, run.ckpt_dir) if run.tcfg["resume"] else None
    if resumed:
        for key in ("step", "micro", "cached", "live"):
            if key in resumed:
                setattr(progress, key, resumed[key])
        if run.rank != 0:  # checkpoints hold global sample counts; rank 0 carries them on
            progress.cached = progress.live = 0
        if run.is_rank0:  # metrics.jsonl as it stood at the checkpoint: no step twice, none missing
            source = restore_history(run.run_dir / "metrics.jsonl", run.ckpt_dir / checkpoints.tag_for(progress.step), progress.step)
            if source is not None:
                log.info("metrics.jsonl put back to step %d (from %s)", progress.step, source)
        log.info("resuming at optimizer step %d", progress.step)
    progress.live_logged = progress.live  # the per-step live count in the log starts from the restored total
    run.source.cached, run.source.live = progress.cached, progress.live
    return progress, resumed


def eval_due(run: TrainRun, step: int) -> bool:
    """Held-out evaluation every train.eval_every steps and at the last one, when samples are held out."""
    every = run.tcfg["eval_every"]
    return run.val is not None and (step == run.total or (every is not None and step % every == 0))


def save_if_due(run: TrainRun, progress: Progress, cached: int, live: int, attempt: AttemptLog) -> bool:
    """Checkpoint every train.save_every steps and (train.save_at_end) at the last one; all ranks call it.
    Returns whether it saved."""
    tcfg = run.tcfg
    if progress.step % tcfg["save_every"] == 0 or (progress.step == run.total and tcfg["save_at_end"]):
        save(run, progress, cached, live, attempt)
        return True
    return False


def save(run: TrainRun, progress: Progress, cached: int, live: int, attempt: AttemptLog) -> None:
    """A complete checkpoint of this step, holding metrics.jsonl as it stands (all ranks call it)."""
    checkpoints.save(run.engine, run.ckpt_dir, progress.step, progress.client_state(cached, live), run.tcfg["keep_last"],
                     run.is_rank0, keep_files=(run.run_dir / "metrics.jsonl",))
    attempt.checkpoint(progress.step)


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


# ---- one micro-step ---------------------------------------------------------------------------------


def epoch_batches(run: TrainRun, micro: int) -> Iterator:
    """This rank's micro-batches over the rest of the epoch that micro-step `micro` falls in (resume skips
    exactly): packed (positions, labels, vision metadata) in the DataLoader workers, copied to the device
    one ahead of the step that uses them, live features filled in (vlnflow.train.packed_loader)."""
    tcfg, loader_cfg = run.tcfg, run.tcfg["loader"]
    epoch, offset = divmod(micro, run.micro_per_epoch)
    batches = micro_batches(len(run.dataset), tcfg["per_device_batch"], run.world, run.rank, tcfg["seed"], epoch)
    batches = batches[: run.micro_per_epoch]
    workers = loader_cfg["workers"]
    loader = torch.utils.data.DataLoader(
        run.dataset,
        batch_sampler=batches[offset:],
        collate_fn=PackInWorker(run.collator, run.engine.module.qwen.config),
        num_workers=workers,
        pin_memory=loader_cfg["pin_memory"] and run.device.type == "cuda",
        prefetch_factor=loader_cfg["prefetch_factor"] if workers else None,
        persistent_workers=loader_cfg["persistent_workers"] and workers > 0,
    )
    return iter(DeviceBatches(loader, run.source, run.device))


def next_micro_batch(run: TrainRun, batches: Iterator, progress: Progress, window: StepWindow) -> dict | None:
    """The next packed micro-batch on the device (samples the cache lacks encoded live, counted), or
    None at the end of the epoch. The wait (DataLoader, live VGGT, issuing the copy) goes into window.wait."""
    t0 = time.perf_counter()
    try:
        batch, n_live = next(batches)
    except StopIteration:
        return None
    window.wait += time.perf_counter() - t0
    progress.cached += len(batch["sample_ids"]) - n_live
    progress.live += n_live
    window.tokens += batch["input_ids"].numel()
    window.labels += batch["label_positions"].numel()  # shapes and host lists only: no device read
    window.tokens_sq += sum(n * n for n in batch.get("seq_lens") or ())
    window.images += len(batch["image_grid_thw"])
    if batch.get("vision_cached") is not None:  # a host tensor (HOST_KEYS): no device read
        window.vision_cached += int(batch["vision_cached"].sum())
    batch["optimizer_step"] = progress.step  # finished steps, the seed's global_step: the action head's weight ramp
    return batch


def micro_step(run: TrainRun, batch: dict, phases: PhaseTimer, window: StepWindow) -> None:
    """Forward, backward and DeepSpeed's step (which only updates at the accumulation boundary)."""
    engine = run.engine
    with phases.measure("forward"):
        loss, terms = engine(batch, terms=True)
    with phases.measure("backward"):  # includes ZeRO's gradient reduction hooks
        engine.backward(loss)
    with phases.measure("step"):  # optimizer step at the accumulation boundary, else bookkeeping
        engine.step()
    window.losses.append(loss.detach().float())
    window.terms.append(terms)


# ---- one optimizer step's bookkeeping -----------------------------------------------------------------


def finish_step(run: TrainRun, progress: Progress, window: StepWindow, phases: PhaseTimer, metrics: MetricsLog):
    """Reduce the step's numbers over the ranks, write its metrics line and (every log_every) the log
    lines; returns (metrics summary, global cached count, global live count)."""
    tcfg, world = run.tcfg, run.world
    elapsed = time.perf_counter() - window.started
    stats = torch.tensor([torch.stack(window.losses).mean().item(), window.wait, window.tokens, progress.cached, progress.live,
                          window.labels, window.tokens_sq, window.images, window.vision_cached], dtype=torch.float64)  # fmt: skip
    if run.device.type == "cuda":
        stats = stats.to(run.device)
    run.dist.all_reduce(stats)
    mean_loss, wait_sum, tok_sum, cached, live, labels, tokens_sq, images, vision_cached = stats.tolist()
    n_samples = tcfg["per_device_batch"] * run.accum * world
    summary = {
        "step": progress.step,
        "max_steps": run.total,
        "epoch": progress.micro / run.micro_per_epoch,
        "loss": mean_loss / world,
        "lr": run.engine.get_lr()[0],
        "s_per_it": elapsed,
        "data_wait_s": wait_sum / world,
        "samples_per_s": n_samples / elapsed,
        "tokens_per_s": tok_sum / elapsed,
        "tokens": int(tok_sum),  # this step, all ranks: with the three below, what vlnflow.flops counts
        "label_tokens": int(labels),
        "seq_tokens_sq": int(tokens_sq),
        "images": int(images),
        "cached_samples": int(cached),
        "live_samples": int(live),
        "vision_cached_frames": int(vision_cached),  # this step, all ranks: frames whose tower rows were read
        "vision_live_frames": int(images - vision_cached),  # ... and frames that ran Qwen's vision tower
        **step_terms(window.terms, run.dist, run.device, run.engine.module.action_head is not None),
        "gpu_mem_gib": gpu_memory_gib(),
        "world_size": world,
        "rank": run.rank,
        **phases.take(),
    }
    metrics.write(**summary)
    if progress.step % tcfg["log_every"] == 0 and run.is_rank0:
        _log_step(progress, summary, int(live), elapsed)
    return summary, int(cached), int(live)


def _log_step(progress: Progress, summary: dict, live: int, elapsed: float) -> None:
    """The [ACCELERATION] line (this step's live samples, or all cached) and the step line."""
    batch_live = live - progress.live_logged
    if batch_live:
        log.info("[ACCELERATION] step %d: %d samples computed live (VGGT), the rest from the cache", progress.step, batch_live)
    else:
        log.info("[ACCELERATION] Using cached features for batch %d", progress.step)
    progress.live_logged = live
    log.info("step %d/%d loss %.4f %.2f s/it %.2f samples/s", progress.step, summary["max_steps"], summary["loss"], elapsed, summary["samples_per_s"])
