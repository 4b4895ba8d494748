"""One-GPU forward + backward of the training model (no optimizer), old vs new path, for bench_train.py.

The batches are the trainer's own: demo episodes indexed with 9 frames per sample, TrainSamples
(frames, Qwen processor, tokens) in DataLoader workers, packed per_device_batch samples to a
micro-batch. Spatial features have the real shape ([2116, 2048] for VGGT-1B at 644) but random
values (`RandomFeatures` stands in for the cache: their values do not change the work).

Cases (one model, reconfigured between cases, so every case runs the same weights):
  old       current kernels (torch varlen), every decoder layer checkpointed, packing and mRoPE
            positions in the training process (collator.pack, model.position_ids), blocking copy;
  new       flash-attn-4 where it runs, checkpointing per vlnflow.train.memory_plan for an 80 GiB
            card under ZeRO-2 on 8 GPUs, packing in workers (PackInWorker) + DeviceBatches prefetch;
  new_card  the same with the plan for this card without an optimizer (the recompute floor);
  stock_hf  transformers' own Qwen2.5-VL forward + loss (sdpa, stock vision attention; full logits),
            the micro-batch's samples padded to one [B, T] batch, every layer checkpointed;
  new_head  `new` with the seed pipeline's action head (model.action_head) attached: its cost.
The composed model's cases compute the loss terms (per-segment losses) as the trainer does.
Per micro-batch: CUDA events around forward and backward (no sync inside the timed loop), one
synchronise at the end; step_s is 0 (no optimizer), rest_s = wall - forward - backward.
"""

from __future__ import annotations

import statistics
import time
import traceback

import numpy as np
import torch

from vlnflow import fa4
from vlnflow.model.host_prep import to_device
from vlnflow.train.data import TrainSamples, keep_items
from vlnflow.train.memory_plan import GIB, ModelShape, checkpoint_plan, tokens_per_sample
from vlnflow.train.packed_loader import DeviceBatches, PackInWorker


class RandomFeatures:
    """SpatialSource stand-in: a deterministic random [P, C] bf16 map per sample (the cache's shape)."""

    def __init__(self, grid, channels):
        self.shape = (grid[0] * grid[1], channels)

    def lookup(self, sample_id):
        seed = int.from_bytes(str(sample_id).encode()[-6:], "little")
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)

    def encode_live(self, frames):  # never called: every sample is "cached"
        raise AssertionError("RandomFeatures has every sample")


def loader(dataset, batches, collate, workers, device):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
    )


def configure(model, kernel: str, checkpointed) -> None:
    """Switch the one model between cases: attention kernels and which layers recompute."""
    from vlnflow.model.packed_attention import use_packed_attention
    from vlnflow.model.vision_fast import use_varlen_vision_attention

    use_packed_attention(model.qwen, kernel)
    use_varlen_vision_attention(model.visual, kernel)
    layers = model.qwen.model.language_model.layers
    model.checkpoint_layers(tuple(range(len(layers))))  # installs the checkpoint function on every layer
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in set(checkpointed)


def stock_configure(model) -> None:
    """transformers' own attention everywhere (the vision MLP stays zero-padded: same function)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from vlnflow.model.vision_fast import VarlenVisionAttention

    model.checkpoint_layers(tuple(range(len(model.qwen.model.language_model.layers))))
    for m in model.visual.modules():
        if isinstance(m, VarlenVisionAttention):
            m.__class__ = Qwen2_5_VLVisionAttention
    model.qwen.config.text_config._attn_implementation = "sdpa"
    model.qwen.config._attn_implementation = "sdpa"
    for layer in model.qwen.model.language_model.layers:
        layer.gradient_checkpointing = True


def padded(batch: dict, pad_id: int) -> dict:
    """A packed batch as the [B, T] padded inputs a transformers user passes (labels -100 on padding)."""
    cu = batch["cu_seqlens"].tolist()
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))

    def rows(x, fill):
        out = torch.full((len(cu) - 1, longest), fill, dtype=x.dtype)
        for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            out[i, : b - a] = x[0, a:b]
        return out

    mask = rows(torch.ones_like(batch["input_ids"]), 0)
    return {"input_ids": rows(batch["input_ids"], pad_id), "attention_mask": mask, "labels": rows(batch["labels"], -100),
            "mm_token_type_ids": rows(batch["mm_token_type_ids"], 0), "pixel_values": batch["pixel_values"],
            "image_grid_thw": batch["image_grid_thw"]}


def timed_loop(step, batches, warmup: int, steps: int, device) -> dict:
    """Run `step(batch)` (forward + backward, returns (loss, mark_forward_end)); per-step events, one sync."""
    cuda = device.type == "cuda"
    it = iter(batches)
    for _ in range(warmup):
        step(next(it), [None] * 3)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    marks, losses, samples, tokens = [], [], 0, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else [None] * 3
        loss, n, t = step(batch, ev)
        marks.append(ev)
        losses.append(loss)
        samples += n
        tokens += t
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "micro_s": wall / steps, "samples": samples, "tokens": tokens, "steps": steps,
           "loss_last": float(losses[-1])}
    if cuda:
        out["forward_s"] = statistics.median(a.elapsed_time(b) for a, b, _ in marks) / 1e3
        out["backward_s"] = statistics.median(b.elapsed_time(c) for _, b, c in marks) / 1e3
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def janus_step(model, device, host_side: bool):
    """step(batch, events) for the composed model; host_side: the old path's pack + copy in the loop."""

    def step(item, ev):
        if host_side:
            items = item
            batch = model._bench_collator.pack([i.encoded for i in items], [i.features for i in items])
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        else:
            batch, _ = item
        model.zero_grad(set_to_none=True)
        if ev[0] is not None:
            ev[0].record()
        loss, _ = model(batch, terms=True)  # as the trainer calls it
        if ev[1] is not None:
            ev[1].record()
        loss.backward()
        if ev[2] is not None:
            ev[2].record()
        return loss.detach(), len(batch["sample_ids"]), batch["input_ids"].numel()

    return step


def stock_step(model, device, pad_id):
    def step(items, ev):
        packed = model._bench_collator.pack_tokens([i.encoded for i in items])
        inputs = {k: v.to(device, non_blocking=True) for k, v in padded(packed, pad_id).items()}
        model.zero_grad(set_to_none=True)
        if ev[0] is not None:
            ev[0].record()
        loss = model.qwen(**inputs, use_cache=False).loss
        if ev[1] is not None:
            ev[1].record()
        loss.backward()
        if ev[2] is not None:
            ev[2].record()
        return loss.detach(), len(items), int(packed["input_ids"].numel())

    return step


def run_cases(cfg: dict, samples, device, *, per_device: int, warmup: int, steps: int, workers: int, wanted, log,
              deadline: float = float("inf")) -> list[dict]:
    """Build the model and data once, run the cases in order; a failing case is reported, not fatal."""
    from vlnflow.model.batching import Collator
    from vlnflow.model.loading import build_model, frame_geometry, load_processors, resolve_model_config
    from vlnflow.spatial.fingerprint import spatial_output

    grid, channels = spatial_output(cfg["spatial"])
    model_cfg = {**resolve_model_config(cfg), "attention": "torch"}
    geometry = frame_geometry(cfg)
    tokenizer, processor = load_processors(model_cfg, geometry)
    t0 = time.perf_counter()
    model = build_model(model_cfg, channels, grid, device=device).train()
    log(f"model built in {time.perf_counter() - t0:.0f} s")
    collator = Collator(tokenizer, processor, geometry, dataset_root=cfg["dataset"]["root"])
    model._bench_collator = collator
    source = RandomFeatures(grid, channels)
    dataset = TrainSamples(samples, collator, source, cfg["dataset"]["root"])
    n_batches = warmup + steps
    order = np.random.default_rng(0).permutation(len(samples))[: n_batches * per_device].tolist()
    if len(order) < n_batches * per_device:
        raise RuntimeError(f"{len(samples)} samples do not fill {n_batches} micro-batches of {per_device}")
    batches = [order[i * per_device : (i + 1) * per_device] for i in range(n_batches)]
    shape = ModelShape.of(model)
    tokens_guess = per_device * tokens_per_sample(geometry.tokens_per_frame, int(cfg["history"]["max_frames"]) + 1)
    card_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 141.0
    fast = fa4.FA4 if not fa4.unavailable_reason(device) else "torch"
    plans = {
        "new": checkpoint_plan(shape, tokens=tokens_guess, gpus=8, budget_gib=80),
        # 90 % of this card: the plan's estimate is not exact, and an OOM would lose the case
        "new_card": checkpoint_plan(shape, tokens=tokens_guess, gpus=1, budget_gib=0.9 * card_gib, optimizer=False),
    }
    cases = [
        ("old", "torch", tuple(range(shape.layers)), "main"),
        ("new", fast, plans["new"].checkpointed, "workers"),
        ("new_card", fast, plans["new_card"].checkpointed, "workers"),
        ("stock_hf", "sdpa", tuple(range(shape.layers)), "stock"),
        ("new_head", fast, plans["new"].checkpointed, "workers"),
    ]
    from vlnflow.model.objective import ActionHead

    head = ActionHead(model.qwen.config.text_config.hidden_size).to(device, next(model.qwen.parameters()).dtype)
    out = []
    for name, kernel, ckpt, packing in cases:
        if wanted and name not in wanted:
            continue
        if deadline - time.perf_counter() < 45:
            out.append({"name": name, "ok": False, "error": "skipped: bench_train --budget-s reached"})
            log(f"{name}: skipped (time budget)")
            continue
        row = {"name": name, "kernel": kernel, "checkpointed_layers": len(ckpt), "layers": shape.layers, "packing": packing,
               "per_device_batch": per_device, "grad_accum": 1, "gpus": 1}
        if kernel == "torch" and name.startswith("new"):
            row["note"] = f"flash-attn-4 unavailable: {fa4.unavailable_reason(device)}"
        if name in plans:
            row["plan"] = plans[name].describe()
            row["plan_estimate_gib"] = plans[name].estimate_gib.get("total")  # compare with the measured peak_gib
        model.action_head = head if name == "new_head" else None
        try:
            if packing == "stock":
                stock_configure(model)
                step = stock_step(model, device, tokenizer.pad_token_id or 0)
                data = loader(dataset, batches, keep_items, workers, device)
            else:
                configure(model, kernel, ckpt)
                if packing == "main":
                    step = janus_step(model, device, host_side=True)
                    data = loader(dataset, batches, keep_items, workers, device)
                else:
                    step = janus_step(model, device, host_side=False)
                    data = DeviceBatches(loader(dataset, batches, PackInWorker(collator, model.qwen.config), workers, device), source, device)
            row.update(timed_loop(step, data, warmup, steps, device))
            row["ok"] = True
        except Exception as exc:  # e.g. out of memory: report it and go on
            row.update({"ok": False, "error": repr(exc)[:500], "trace": traceback.format_exc(limit=5)})
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"{name}: {'ok' if row['ok'] else row['error'][:200]}")
        out.append(row)
    return out


def tiny_janus_batch(device):
    """(model config, packed batch on `device`) of the tiny preset: 3 samples with synthetic frames (check_kernels)."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from vlnflow.model.batching import Collator
    from vlnflow.model.loading import load_processors
    from vlnflow.spatial.geometry import FrameGeometry

    cfg = {"preset": "tiny", "merger_hidden": 24, "lam": 0.2}
    geometry = FrameGeometry("pad", 56, (64, 48))
    root = Path(tempfile.mkdtemp(prefix="vlnflow_tiny_"))
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"f{i}.png")
    row = dict(episode_id="e", instruction="walk to the table", action="MOVE_FORWARD", prompt=None, answer=None,
               sub_instruction="walk forward", description_2d="a table", description_3d="ahead", source_format="episodes")
    rows = [{**row, "sample_id": f"s{i}", "frames": [f"f{j}.png" for j in range(i, i + 2 + i % 2)]} for i in range(3)]
    tokenizer, processor = load_processors(cfg, geometry)
    collator = Collator(tokenizer, processor, geometry, dataset_root=root)
    torch.manual_seed(0)
    batch = collator(rows, [torch.randn(16, 12).to(torch.bfloat16) for _ in rows])
    return cfg, to_device(batch, device)
