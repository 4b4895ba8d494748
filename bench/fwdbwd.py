"""One-GPU forward + backward of the training model (no optimizer), old vs new path, for bench_train.py.

The batches are the trainer's own: demo episodes indexed with 9 frames per sample, TrainSamples
(frames, Qwen processor, tokens) in DataLoader workers, packed per_device_batch samples to a
micro-batch. Spatial features have the real shape ([2116, 2048] for VGGT-1B at 644) but random
values (`RandomFeatures` stands in for the cache: their values do not change the work).

Cases (one model, reconfigured between cases, so every case runs the same weights):
  old       current kernels (torch varlen), every decoder layer checkpointed, packing and mRoPE
            positions in the training process (collator.pack, model.position_ids), blocking copy;
  new       flash-attn-4 where it runs, checkpointing per vlnflow.train.memory_plan for an 80 GB
            (79.6 GiB) card under ZeRO-2 on 8 GPUs, packing in workers (PackInWorker) + DeviceBatches prefetch;
  new_torch the same with the current kernels (only where flash-attn-4 runs): its share, in one run;
  new_card  the same with the plan for this card without an optimizer (the recompute floor);
  stock_hf  transformers' own Qwen2.5-VL forward + loss (sdpa, stock vision attention; full logits),
            the micro-batch's samples padded to one [B, T] batch, every layer checkpointed;
  new_head  `new` with the seed pipeline's action head (model.action_head) attached: its cost;
  new_vision_cache  `new` with the per-frame vision cache (cache.vision): every sample's frames carry cached
            tower rows (`RandomVisionRows`: random values of the real shape, as RandomFeatures), so the tower's
            blocks do not run, only visual.merger; `bytes_per_sample_read` = the rows a sample reads.
check_vision_cache: on one real batch, loss and gradients with the tower's own rows (computed in the same call
shape: bit for bit expected) and with rows computed frame by frame (as the precompute job's batches) vs live.
The composed model's cases compute the loss terms (per-segment losses) as the trainer does.
Per micro-batch: CUDA events at the step's start (before its batch is fetched), around forward and
backward (no sync inside the timed loop), one synchronise at the end; on CPU the same marks by
perf_counter. Every step keeps its own numbers: step_s (start to the next step's start), forward_s,
backward_s and rest_s = step_s - forward_s - backward_s OF THAT STEP (host work the GPU waited for:
fetching, packing, copies), then median / min / max over the steps (vlnflow.timing). FLOPs per step
from the batch itself (vlnflow.flops: real token counts, sum of squared lengths, label positions,
image grids); recompute of the checkpointed layers is counted apart from the model FLOPs.
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import numpy as np
import torch

from vlnflow import fa4
from vlnflow.model import fused_kernels
from vlnflow.flops import BatchWork, step_counter, vision_forward
from vlnflow.model.host_prep import to_device
from vlnflow.train.data import TrainSamples, keep_items
from vlnflow.train.memory_plan import CARD_GIB, GIB, ModelShape, calibration_for, checkpoint_plan, model_gib, tokens_per_sample
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


class RandomVisionRows:
    """VisionSource stand-in: [P, C] bf16 rows per frame (the vision cache's shape), from a small pool of random maps
    (their values do not change the work; a pool keeps the workers from spending the step drawing numbers)."""

    def __init__(self, tokens: int, channels: int, pool: int = 8):
        gen = torch.Generator().manual_seed(0)
        self.pool = [torch.randn(tokens, channels, generator=gen).to(torch.bfloat16) for _ in range(pool)]

    def rows(self, frames):
        return [self.pool[int.from_bytes(str(f).encode()[-4:], "little") % len(self.pool)].clone() for f in frames]


def loader(dataset, batches, collate, workers, device):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
    )


def configure(model, kernel: str, checkpointed, *, compiled: bool = False, fused: bool = False) -> None:
    """Switch the one model between cases: attention kernels, compiled vision blocks, Liger's fused LLM kernels
    and which layers recompute."""
    from vlnflow.model import fused_kernels
    from vlnflow.model.packed_attention import use_packed_attention
    from vlnflow.model.vision_fast import compile_vision_blocks, use_varlen_vision_attention

    use_packed_attention(model.qwen, kernel)
    use_varlen_vision_attention(model.visual, kernel)
    compile_vision_blocks(model.visual, compile=compiled)
    fused_kernels.remove_fused_kernels(model.qwen)
    if fused:
        fused_kernels.apply_fused_kernels(model.qwen)
    layers = model.qwen.model.language_model.layers
    model.checkpoint_layers(tuple(range(len(layers))))  # installs the checkpoint function on every layer
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in set(checkpointed)


def stock_configure(model) -> None:
    """transformers' own attention everywhere (the vision MLP stays zero-padded: same function)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

    from vlnflow.model import fused_kernels
    from vlnflow.model.vision_fast import SplitVisionBlock, VarlenVisionAttention

    fused_kernels.remove_fused_kernels(model.qwen)
    for block in model.visual.blocks:
        if type(block) is SplitVisionBlock:
            block.__class__ = Qwen2_5_VLVisionBlock
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
    """Run `step(batch, marks)` (forward + backward; returns (loss, BatchWork)) `steps` times after `warmup`.

    Per step: marks at its start, forward start, forward end, backward end (CUDA events recorded in stream
    order, or perf_counter on CPU); one synchronise at the end. Returns per-step lists.
    """
    cuda = device.type == "cuda"
    it = iter(batches)
    for _ in range(warmup):
        step(next(it), [None] * 3)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def mark():
        if not cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    starts, inner, losses, works = [], [], [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        starts.append(mark())
        batch = next(it)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else [None] * 3
        loss, work = step(batch, marks)
        inner.append(marks)
        losses.append(loss)
        works.append(work)
    starts.append(mark())
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    span = (lambda a, b: a.elapsed_time(b) / 1e3) if cuda else (lambda a, b: b - a)  # noqa: E731
    step_s = [span(a, b) for a, b in zip(starts[:-1], starts[1:])]
    forward_s = [span(m[0], m[1]) for m in inner]
    backward_s = [span(m[1], m[2]) for m in inner]
    out = {"wall_s": wall, "steps": steps, "step_s": step_s, "forward_s": forward_s, "backward_s": backward_s,
           "rest_s": [t - f - b for t, f, b in zip(step_s, forward_s, backward_s)],
           "step_samples": [w.samples for w in works], "samples": sum(w.samples for w in works), "works": works,
           "loss_last": float(losses[-1])}  # fmt: skip
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def _mark(marks: list, i: int) -> None:
    """Record mark i: a CUDA event where the step was given events, else the perf_counter time."""
    if marks[i] is None or isinstance(marks[i], float):
        marks[i] = time.perf_counter()
    else:
        marks[i].record()


def janus_step(model, device, host_side: bool):
    """step(batch, marks) for the composed model; host_side: the old path's pack + copy in the loop."""

    def step(item, marks):
        if host_side:
            items = item
            batch = model._bench_collator.pack([i.encoded for i in items], [i.features for i in items])
            work = BatchWork.of(batch)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        else:
            batch, _ = item
            work = BatchWork.of(batch)  # host lists and shapes only: no device read
        model.zero_grad(set_to_none=True)
        _mark(marks, 0)
        loss, _ = model(batch, terms=True)  # as the trainer calls it
        _mark(marks, 1)
        loss.backward()
        _mark(marks, 2)
        return loss.detach(), work

    return step


def vision_step(model, device, host_side: bool = False):
    """step(batch, marks): the frozen vision tower's forward alone (no grad), as the training step runs it."""

    def step(item, marks):
        batch, _ = item
        work = BatchWork.of(batch)
        _mark(marks, 0)
        with torch.no_grad():
            out = model.image_embeddings(batch["pixel_values"], batch["image_grid_thw"], batch.get("vision"))
        _mark(marks, 1)
        _mark(marks, 2)
        return out.float().norm().detach(), work

    return step


def llm_only_step(model, device, host_side: bool = False):
    """janus_step with the vision tower's output replaced by zeros of its shape: the rest of the step alone."""
    hidden = model.qwen.config.text_config.hidden_size
    dtype = next(model.merger.parameters()).dtype
    merge = model.visual.spatial_merge_size ** 2

    def no_tower(pixel_values, image_grid_thw, vision=None):
        tokens = int((image_grid_thw.prod(-1) // merge).sum())  # host tensor (HOST_KEYS): no device read
        return torch.zeros(tokens, hidden, device=device, dtype=dtype)

    inner = janus_step(model, device, host_side=False)

    def step(item, marks):
        model.image_embeddings = no_tower
        try:
            return inner(item, marks)
        finally:
            del model.image_embeddings

    return step


FLOP_OF = {  # which part of vlnflow.flops.training_step a case's packing times
    "main": lambda f: f["model"], "workers": lambda f: f["model"], "stock": lambda f: f["model"],
    "vision": lambda f: f["vision"], "llm": lambda f: f["model"] - f["vision"],
    "vision_cache": lambda f: f["model"] - f["vision"] + f["vision_merger"],  # the tower's blocks skipped, its merger runs
}


def check_vision_cache(model, dataset, indices, collator, device, log) -> dict:
    """Loss and gradients with cached vision rows against the live tower on one real batch (the `new` path's
    settings, as configured last): rows from the tower in the batch's own call shape (the same kernels: bit for
    bit expected) and rows computed one frame per call (as a precompute batch differs: kernels may differ)."""
    from vlnflow.model.host_prep import add_host_metadata
    from vlnflow.model.vision_rows import tower_rows

    row = {"name": "check_vision_cache"}
    try:
        items = [dataset[i] for i in indices]
        live = add_host_metadata(collator.pack([i.encoded for i in items], [i.features for i in items]), model.qwen.config)
        live = to_device(live, device)
        pv, grid = live["pixel_values"], live["image_grid_thw"]
        with torch.no_grad():
            together = torch.cat(tower_rows(model.visual, pv, grid, live.get("vision")))
            offsets = [0, *torch.cumsum(grid.prod(-1), 0).tolist()]
            alone = torch.cat([tower_rows(model.visual, pv[a:b], grid[k : k + 1])[0] for k, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))])
        names = ("merger.mlp.0.weight", "qwen.model.language_model.layers.0.mlp.up_proj.weight", "qwen.model.language_model.norm.weight")
        params = dict(model.named_parameters())
        got = {}
        for case, rows in (("live", None), ("together", together), ("alone", alone)):
            batch = dict(live)
            if rows is not None:
                batch.update(vision_cached=torch.ones(len(grid), dtype=torch.bool), vision_rows=rows,  # as a cache in the tower dtype stores them
                             pixel_values=pv[:0], vision=None)
            model.zero_grad(set_to_none=True)
            loss = model(batch)
            loss.backward()
            got[case] = (loss.detach().float(), {n: params[n].grad.detach().float().clone() for n in names if n in params})
        ref_loss, ref = got["live"]
        row["rows_identical"] = bool(torch.equal(together, alone))
        row["rows_rel_err"] = float((alone.float() - together.float()).norm() / together.float().norm())
        for case in ("together", "alone"):
            loss, grads = got[case]
            row[case] = {"loss_abs_diff": float((loss - ref_loss).abs()), "loss_identical": bool(torch.equal(loss, ref_loss)),
                         "grad_rms_rel": {n: float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref}}
        row["loss_live"] = float(ref_loss)
        row["ok"] = row["together"]["loss_abs_diff"] <= 5e-2 * abs(float(ref_loss)) and all(
            v <= 5e-2 for c in ("together", "alone") for v in row[c]["grad_rms_rel"].values())
        if not row["ok"]:
            row["error"] = "cached vision rows differ from the live tower beyond bf16 rounding"
    except Exception as exc:
        row.update({"ok": False, "error": repr(exc)[:500], "trace": traceback.format_exc(limit=5)})
    model.zero_grad(set_to_none=True)
    log(f"check_vision_cache: {row.get('together')} {row.get('alone')} {'ok' if row.get('ok') else row.get('error')}")
    return row


GRAD_NAMES = ("merger.mlp.0.weight", "qwen.model.language_model.layers.0.mlp.up_proj.weight",
              "qwen.model.language_model.layers.27.self_attn.q_proj.weight", "qwen.model.language_model.norm.weight")
# as bench/check_default_kernels.py: <= max(1.5 x bf16's error, floor). The loss floor is bf16's machine epsilon
# (2^-8): the loss of one batch of ~18 label tokens moves by that much with rounding alone (at 261cc8f prev's loss
# was 9.6e-4 from float32, new's 1.6e-3, failing the 1e-3 floor the bench then had while every gradient of new
# was closer to float32 than prev's; docs/benchmarks.md)
CHECK_FACTOR, CHECK_FLOOR, LOSS_FLOOR = 1.5, 1e-2, 2.0**-8


def _loss_and_grads(model, batch, names) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    params = dict(model.named_parameters())
    return float(loss.detach().float()), {n: params[n].grad.detach().float().clone() for n in names}


def float32_reference(model, batch, names, device) -> tuple[float, dict]:
    """Loss and the `names` gradients of `batch` with every weight in float32 (an exact up-cast of the bf16
    weights, put back bit for bit afterwards), the torch kernels, no TF32, nothing compiled or fused, every
    layer recomputed, and gradients for `names` only (so the float32 7B and its activations fit an 80 GB card)."""
    params = dict(model.named_parameters())
    dtypes = {n: p.dtype for n, p in params.items()}
    trained = {n: p.requires_grad for n, p in params.items()}
    buffers = [(m, k, b.dtype) for m in model.modules() for k, b in m._buffers.items()
               if b is not None and b.is_floating_point() and b.dtype != torch.float32]
    precision = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        for n, p in params.items():
            p.requires_grad_(n in names)
            p.data = p.data.float()
        for module, key, _ in buffers:
            module._buffers[key] = module._buffers[key].float()
        configure(model, "torch", tuple(range(len(model.qwen.model.language_model.layers))))
        batch32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
        return _loss_and_grads(model, batch32, names)
    finally:
        model.zero_grad(set_to_none=True)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = precision
        for n, p in params.items():
            p.data = p.data.to(dtypes[n])
            p.requires_grad_(trained[n])
        for module, key, dtype in buffers:
            module._buffers[key] = module._buffers[key].to(dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def rms_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def check_new_vs_prev(model, dataset, indices, collator, device, fast, plans, compiled, fused, log) -> dict:
    """Loss and gradients of the new path (compiled vision blocks, Liger) against the previous one on one
    real-size batch, both measured against a float32 reference of the same batch and weights: the new path
    passes where its error is at most max(1.5 x prev's error, 1e-2) (gradients, rms relative) and
    max(1.5 x prev's, 1e-3 relative) (loss): as close to exact as the previous path, i.e. bf16 rounding.
    The direct new-vs-prev difference is reported too (bf16 rounding of two paths compounded over 28 layers)."""
    from vlnflow.model.host_prep import add_host_metadata

    row = {"name": "check_new_vs_prev", "compiled_vision": compiled, "fused_kernels": fused,
           "rule": f"error vs float32 <= max({CHECK_FACTOR} x prev's, {CHECK_FLOOR}) per gradient, "
                   f"max({CHECK_FACTOR} x prev's, {LOSS_FLOOR} relative) for the loss"}
    try:
        items = [dataset[i] for i in indices]
        batch = add_host_metadata(collator.pack([i.encoded for i in items], [i.features for i in items]), model.qwen.config)
        batch = to_device(batch, device)
        names = [n for n in GRAD_NAMES if n in dict(model.named_parameters())]
        got = {}
        for case, ckpt_plan, comp, fuse in (("prev", plans["prev"], False, False), ("new", plans["new"], compiled, fused)):
            configure(model, fast, ckpt_plan.checkpointed, compiled=comp, fused=fuse)
            got[case] = _loss_and_grads(model, batch, names)
        (lp, gp), (ln, gn) = got["prev"], got["new"]
        row["loss"] = {"prev": lp, "new": ln, "abs_diff": abs(ln - lp)}
        row["grad_rms_rel"] = {n: rms_rel(gn[n], gp[n]) for n in names}
        t0 = time.perf_counter()
        lr, gr = float32_reference(model, batch, names, device)
        row["reference_s"] = time.perf_counter() - t0
        row["loss"]["float32"] = lr
        row["vs_float32"] = {case: {"loss_rel": abs(loss - lr) / abs(lr), "grad_rms_rel": {n: rms_rel(g[n], gr[n]) for n in names}}
                             for case, (loss, g) in got.items()}
        prev, new = row["vs_float32"]["prev"], row["vs_float32"]["new"]
        bad = [n for n in names if new["grad_rms_rel"][n] > max(CHECK_FACTOR * prev["grad_rms_rel"][n], CHECK_FLOOR)]
        if new["loss_rel"] > max(CHECK_FACTOR * prev["loss_rel"], LOSS_FLOOR):
            bad.append("loss")
        row["ok"] = not bad
        if bad:
            row["error"] = f"new path further from float32 than bf16 rounding (prev's error) allows: {', '.join(bad)}"
    except Exception as exc:
        row.update({"ok": False, "error": repr(exc)[:500], "trace": traceback.format_exc(limit=5)})
    model.zero_grad(set_to_none=True)
    log(f"check_new_vs_prev: {row.get('loss')} vs_float32={row.get('vs_float32')} {'ok' if row.get('ok') else row.get('error')}")
    return row


def stock_step(model, device, pad_id):
    def step(items, marks):
        packed = model._bench_collator.pack_tokens([i.encoded for i in items])
        work = BatchWork.of(packed)  # the useful work (same samples as the packed cases), not the padding
        inputs = {k: v.to(device, non_blocking=True) for k, v in padded(packed, pad_id).items()}
        model.zero_grad(set_to_none=True)
        _mark(marks, 0)
        loss = model.qwen(**inputs, use_cache=False).loss
        _mark(marks, 1)
        loss.backward()
        _mark(marks, 2)
        return loss.detach(), work

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
    # the shape as the cases switch it: unfused by default (build_model applied Liger where it runs; each case sets it)
    shape = dataclasses.replace(ModelShape.of(model), fused=False)
    count = step_counter({**cfg, "model": model_cfg})
    tokens_guess = per_device * tokens_per_sample(geometry.tokens_per_frame, int(cfg["history"]["max_frames"]) + 1)
    card_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else CARD_GIB["H200"]
    fast = fa4.FA4 if not fa4.unavailable_reason(device) else "torch"
    fused = fused_kernels.unavailable_reason(device) is None  # Liger (the gpu extra) on CUDA
    compiled = device.type == "cuda"  # torch.compile of the frozen vision blocks (model.compile_vision auto)
    fused_shape = dataclasses.replace(shape, fused=fused)
    plans = {  # new_torch and llm_only share new's plan
        "prev": checkpoint_plan(shape, tokens=tokens_guess, gpus=8, budget_gib=CARD_GIB["H100 / H800 80GB"]),
        "new": checkpoint_plan(fused_shape, tokens=tokens_guess, gpus=8, budget_gib=CARD_GIB["H100 / H800 80GB"]),
        # 90 % of this card: an OOM would lose the case
        "new_card": checkpoint_plan(fused_shape, tokens=tokens_guess, gpus=1, budget_gib=0.9 * card_gib, optimizer=False),
    }
    no_opt = calibration_for(shape, None)
    every = tuple(range(shape.layers))
    # (name, attention kernel, checkpointed layers, packing, compiled vision blocks, Liger fused LLM kernels)
    cases = [
        ("old", "torch", every, "main", False, False),
        ("prev", fast, plans["prev"].checkpointed, "workers", False, False),  # the previous version's new path
        ("new", fast, plans["new"].checkpointed, "workers", compiled, fused),
        # the same with the current attention kernels: flash-attn-4's share in this run (where flash-attn-4 runs)
        *([("new_torch", "torch", plans["new"].checkpointed, "workers", compiled, fused)] if fast == fa4.FA4 else []),
        ("new_card", fast, plans["new_card"].checkpointed, "workers", compiled, fused),
        ("vision_eager", fast, (), "vision", False, False),  # the frozen tower's forward alone (V1 + V2)
        *([("vision_compiled", fast, (), "vision", True, False)] if compiled else []),  # + V3
        ("llm_only", fast, plans["new"].checkpointed, "llm", compiled, fused),  # new without the tower's work
        ("stock_hf", "sdpa", every, "stock", False, False),
        ("new_head", fast, plans["new"].checkpointed, "workers", compiled, fused),  # + the seed's action head
        ("new_vision_cache", fast, plans["new"].checkpointed, "vision_cache", compiled, fused),  # cache.vision: no tower blocks
    ]
    rows_per_frame = (geometry.feature_tokens, model.visual.config.hidden_size)
    vision_dataset = TrainSamples(samples, collator, source, cfg["dataset"]["root"], vision=RandomVisionRows(*rows_per_frame))
    from vlnflow.model.objective import ActionHead

    head = ActionHead(model.qwen.config.text_config.hidden_size).to(device, next(model.qwen.parameters()).dtype)
    out = []
    if wanted is None or "check_new_vs_prev" in wanted:
        out.append(check_new_vs_prev(model, dataset, batches[0], collator, device, fast, plans, compiled, fused, log))
    if wanted is None or "check_vision_cache" in wanted:
        out.append(check_vision_cache(model, dataset, batches[0], collator, device, log))
    for name, kernel, ckpt, packing, compile_blocks, fuse in cases:
        if wanted and name not in wanted:
            continue
        if deadline - time.perf_counter() < 45:
            out.append({"name": name, "ok": False, "error": "skipped: bench_train --budget-s reached"})
            log(f"{name}: skipped (time budget)")
            continue
        row = {"name": name, "kernel": kernel, "checkpointed_layers": len(ckpt), "layers": shape.layers, "packing": packing,
               "per_device_batch": per_device, "grad_accum": 1, "gpus": 1, "compiled_vision": compile_blocks,
               "fused_kernels": fuse, "preprocess": geometry.mode, "tokens_per_frame": geometry.tokens_per_frame}
        if kernel == "torch" and name.startswith("new"):
            row["note"] = f"flash-attn-4 unavailable: {fa4.unavailable_reason(device)}"
        plan = plans.get("new" if name in ("new_torch", "llm_only", "new_head", "new_vision_cache") else name)
        if plan is not None:
            row["plan"] = plan.describe()
            row["plan_estimate_gib"] = plan.estimate_gib.get("total")
        model.action_head = head if name == "new_head" else None
        try:
            if packing == "stock":
                stock_configure(model)
                step = stock_step(model, device, tokenizer.pad_token_id or 0)
                data = loader(dataset, batches, keep_items, workers, device)
            else:
                configure(model, kernel, ckpt, compiled=compile_blocks, fused=fuse)
                if packing == "main":
                    step = janus_step(model, device, host_side=True)
                    data = loader(dataset, batches, keep_items, workers, device)
                else:
                    step = {"vision": vision_step, "llm": llm_only_step}.get(packing, janus_step)(model, device, host_side=False)
                    data_set = vision_dataset if packing == "vision_cache" else dataset
                    data = DeviceBatches(loader(data_set, batches, PackInWorker(collator, model.qwen.config), workers, device), source, device)
            timed = timed_loop(step, data, warmup, steps, device)
            works = timed.pop("works")
            row.update(timed)
            total = sum(works[1:], works[0])
            row.update({"tokens": total.tokens, "labels": total.labels, "tokens_sq": total.tokens_sq, "images": len(total.image_grids)})
            counted = lambda w: {**count(w, recomputed_layers=len(ckpt)),  # noqa: E731
                                 "vision_merger": sum(vision_forward(count.vision, g)["merger"] for g in w.image_grids)}
            row["flop"] = {k: v for k, v in counted(total).items() if k != "llm_forward"}
            row["flop_per_step"] = [FLOP_OF[packing](counted(w)) for w in works]
            row["flop_counted"] = {"vision": "vision tower forward", "llm": "model minus the vision tower",
                                   "vision_cache": "model minus the vision tower's blocks (its merger runs)"}.get(packing, "model")
            if packing == "vision_cache":  # every frame's rows read instead of its pixels: bf16 [P, C] per frame
                row["vision_cache"] = True
                row["bytes_per_sample_read"] = len(total.image_grids) / total.samples * rows_per_frame[0] * rows_per_frame[1] * 2
            # the memory model (no optimizer, as this benchmark runs) for this case, next to the measured peak
            if packing in ("main", "workers", "llm", "vision_cache") and "peak_gib" in row:
                est = model_gib(dataclasses.replace(shape, fused=fuse), tokens=round(total.tokens / len(works)), gpus=1,
                                checkpointed=len(ckpt), optimizer=False)
                shift = no_opt.correction_gib if no_opt else 0.0
                row["memory_model_gib"] = est["states"] + est["activations"] + shift
                row["memory_model_calibration_gib"] = shift
                row["memory_model_error_gib"] = row["memory_model_gib"] - row["peak_gib"]
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
