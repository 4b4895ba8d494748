"""Throughput of the spatial encoder: streaming (as training runs VGGT today) vs batched block-causal.

One run measures, on the same card and process:
  matmul      a large bf16 matmul (the ceiling);
  check       batched vs streaming vs a float32 copy of the model (relative errors);
  stream_all  own streaming path, frame by frame, batch 1, all layers (= JanusVLN training);
  stream_kept the same, stopping each frame at the kept layer;
  batched     encode(): one block-causal pass over B samples (several B, variants);
  indexed     encode_indexed(): B samples of one episode sharing B unique frames (DINOv2 once per image);
  profile     torch.profiler summary of one batched call (--profile).
Times: CUDA events (or synchronised wall clock on CPU), warm-up first, medians.
TFLOP/s use the 59.5 TFLOP minimum per 9-frame 644x644 sample (VGGT_FACTS.md section 5),
computed for the actual sizes by `minimum_flops`.

GPU:  PYTHONPATH=src python3 bench/bench_spatial.py --out-json $OUT/spatial_bench.json
CPU smoke test:  PYTHONPATH=src python3 bench/bench_spatial.py --tiny
With flash-attn-4 installed (the gpu extra) and a CUDA sm90+ card, the `indexed` rows are repeated with
spatial.attention flash_attn_4 (same model, same batches; `check_fa4` = its error against SDPA); the
other rows use SDPA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

from vlnflow import fa4
from vlnflow.spatial import PRESETS, SpatialEncoder


# ---- FLOP counts (2 per multiply-add; matmuls and attention only) --------------------------


def _linear(tokens: int, d: int, hidden: int) -> float:
    return 2.0 * tokens * d * (3 * d + d + 2 * hidden)


def _attn(q: int, kv: int, d: int) -> float:
    return 4.0 * q * kv * d


def dino_flops(cfg, grid: tuple[int, int]) -> float:
    """One image through the patch embedding."""
    p = grid[0] * grid[1]
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    conv = 2.0 * p * d * 3 * cfg.patch_size**2
    if cfg.patch_embed != "dinov2":
        return conv
    t = 1 + cfg.dino_register_tokens + p
    return conv + cfg.dino_depth * (_linear(t, d, hidden) + _attn(t, t, d))


def trunk_flops(cfg, grid, frames: int, keep: int) -> float:
    """The minimum aggregator work for the last frame's layer-`keep` output (block-causal)."""
    t = grid[0] * grid[1] + 1 + cfg.num_register_tokens
    d, hidden, s = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), frames
    frame_blocks = s * (keep + 1) * (_linear(t, d, hidden) + _attn(t, t, d))
    global_blocks = keep * (s * _linear(t, d, hidden) + sum(_attn(t, (f + 1) * t, d) for f in range(s)))
    kept_global = (s - 1) * 2.0 * t * d * 2 * d + _linear(t, d, hidden) + _attn(t, s * t, d)
    return frame_blocks + global_blocks + kept_global


def minimum_flops(cfg, grid, frames: int, keep: int) -> float:
    return frames * dino_flops(cfg, grid) + trunk_flops(cfg, grid, frames, keep)


def streaming_flops(cfg, grid, frames: int, layers: int | None = None) -> float:
    """What streaming computes per sample: `layers` (default all) layers of every frame."""
    t = grid[0] * grid[1] + 1 + cfg.num_register_tokens
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_layer = frames * (2 * _linear(t, d, hidden) + _attn(t, t, d)) + sum(_attn(t, (f + 1) * t, d) for f in range(frames))
    return frames * dino_flops(cfg, grid) + (layers or cfg.depth) * per_layer


# ---- timing ---------------------------------------------------------------------------------


def timed(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call, measured `iters` times after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def episode_index(samples: int, history: int = 8) -> torch.Tensor:
    """Frame lists of steps 0..samples-1 of one episode (DESIGN.md sampling, repeat-first padding)."""
    rows = []
    for j in range(samples):
        if j <= history:
            rows.append([0] * (history - j) + list(range(j + 1)))
        else:
            rows.append(torch.linspace(0, j, history + 1).long().tolist())
    return torch.tensor(rows, dtype=torch.long)


def rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {
        "rms_rel": ((a - b).norm() / b.norm()).item(),
        "max_abs_rel": ((a - b).abs().max() / b.abs().max()).item(),
        "finite": bool(torch.isfinite(a).all()),
    }


# ---- main -----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vggt-1b", choices=sorted(PRESETS))
    ap.add_argument("--image-size", type=int, default=644)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument(
        "--combos", default="eager:prefix:default,compiled:prefix:default",
        help="comma list of execution:global-attention:sdpa, each of eager|compiled : prefix|flex : default|flash|cudnn|efficient",
    )
    ap.add_argument("--variant-batch-sizes", default="8", help="batch sizes for every combo after the first")
    ap.add_argument("--indexed-batch-sizes", default="16,32")
    ap.add_argument("--stream-samples", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: --preset tiny --image-size 56 --device cpu, small batches")
    ap.add_argument("--out-json", default=None, help="default: $OUT/spatial_bench.json when OUT is set")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.image_size, args.device = "tiny", 56, "cpu"
        args.batch_sizes, args.variant_batch_sizes, args.indexed_batch_sizes = "1,2", "2", "4"
        args.combos = "eager:prefix:default"  # compiling on CPU takes ~40 s

    out_json = args.out_json or (os.path.join(os.environ["OUT"], "spatial_bench.json") if os.environ.get("OUT") else None)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    spatial_cfg = {
        "preset": args.preset, "weights": None, "seed": 0, "image_size": args.image_size, "layer": -2,
        "reference_frame": "last", "dtype": "bfloat16", "device": args.device, "attention": "sdpa",
    }
    t0 = time.perf_counter()
    base = SpatialEncoder.from_config(spatial_cfg, compile_blocks=False)
    dev = base.device
    cfg, grid, s = base.model.config, base.grid, args.frames
    keep = base.layer
    flops_min = minimum_flops(cfg, grid, s, keep)
    flops_stream = streaming_flops(cfg, grid, s)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset, "image_size": args.image_size, "frames": s, "grid": grid, "kept_layer": keep,
        "params": sum(p.numel() for p in base.model.parameters()),
        "tflop_min_per_sample": flops_min / 1e12, "tflop_streaming_per_sample": flops_stream / 1e12,
        "build_s": time.perf_counter() - t0, "rows": [],
    }
    print(f"# {report['device']} torch {torch.__version__}  params {report['params']:,}  "
          f"min {flops_min / 1e12:.2f} TF/sample  streaming {flops_stream / 1e12:.2f} TF/sample", flush=True)

    def save():
        if out_json:
            with open(out_json, "w") as fh:
                json.dump(report, fh, indent=1)

    def add(row):
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    gen = torch.Generator().manual_seed(0)
    size = args.image_size

    def frames(b):
        return torch.rand(b, s, 3, size, size, generator=gen).to(dev)

    # (c) the matmul ceiling
    if dev.type == "cuda":
        n = args.matmul_size
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        times = timed(lambda: a @ b, dev, 3, 20)
        matmul_tfs = 2 * n**3 / statistics.median(times) / 1e12
        del a, b
    else:
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        matmul_tfs = 2 * n**3 / statistics.median(timed(lambda: a @ b, dev, 2, 5)) / 1e12
    report["matmul_tflops"] = matmul_tfs
    add({"case": "matmul", "size": n, "tflops": matmul_tfs})

    def perf(case, per_call_s, batch, flops_per_sample, **extra):
        med = statistics.median(per_call_s)
        ms = 1000 * med / batch
        tfs = flops_min / (med / batch) / 1e12
        row = {"case": case, "batch": batch, "ms_per_sample": ms, "samples_per_s": batch / med,
               "tflops_on_min": tfs, "of_matmul": tfs / matmul_tfs,
               "tflops_executed": flops_per_sample / (med / batch) / 1e12,
               "median_call_ms": 1000 * med, "calls": len(per_call_s), **extra}
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            torch.cuda.reset_peak_memory_stats(dev)
        add(row)

    # correctness on this device first
    try:
        x = frames(2)
        batched = base.encode(x)
        streamed = base.encode_streaming(x)
        idx = torch.arange(2 * s).view(2, s)
        indexed = base.encode_indexed(x.flatten(0, 1), idx)
        check = {"case": "check", "batched_vs_streaming": rel(batched, streamed), "indexed_vs_batched": rel(indexed, batched)}
        if dev.type == "cuda":
            ref32 = SpatialEncoder.from_config({**spatial_cfg, "dtype": "float32"})
            check["bf16_vs_fp32"] = rel(batched, ref32.encode(x))
            del ref32
            torch.cuda.empty_cache()
        add(check)
    except Exception as exc:  # keep measuring; the error is in the report
        add({"case": "check", "error": repr(exc), "trace": traceback.format_exc(limit=3)})

    # (a) streaming, batch 1, frame by frame
    one = frames(1)
    for case, all_layers, flops in (
        ("stream_all", True, flops_stream),
        ("stream_kept", False, streaming_flops(cfg, grid, s, keep + 1)),
    ):
        times = timed(lambda: base.encode_streaming(one, all_layers=all_layers), dev, 1, args.stream_samples)
        perf(case, times, 1, flops)

    # (b) batched block-causal: execution combos x batch sizes, all on the same model
    def use(combo):
        variant, backend, sdpa = combo
        base.configure(compile_blocks=variant == "compiled", global_backend=backend,
                       sdpa_backend=None if sdpa == "default" else sdpa)
        return {"variant": variant, "global": backend, "sdpa": sdpa, "attention": base.attention_kernel}

    combos = [tuple(c.split(":")) for c in args.combos.split(",") if c]
    best = None
    for n_combo, combo in enumerate(combos):
        for bsz in ints(args.batch_sizes) if n_combo == 0 else ints(args.variant_batch_sizes):
            tag = use(combo)
            try:
                x = frames(bsz)
                t_first = time.perf_counter()
                base.encode(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t_first
                times = timed(lambda: base.encode(x), dev, args.warmup, args.iters)
                perf("batched", times, bsz, flops_min, first_call_s=first_s, **tag)
                row = report["rows"][-1]
                if best is None or row["ms_per_sample"] < best[0]["ms_per_sample"]:
                    best = (row, combo)
                del x
            except Exception as exc:
                add({"case": "batched", "batch": bsz, **tag, "error": repr(exc), "trace": traceback.format_exc(limit=4)})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()

    def time_indexed(bsz: int, tag: dict) -> None:
        """One `indexed` row: encode_indexed over an episode's steps 0..bsz-1 (frames shared between steps)."""
        idx = episode_index(bsz)
        unique = int(idx.max()) + 1
        images = torch.rand(unique, 3, size, size, generator=gen).to(dev)
        flops = trunk_flops(cfg, grid, s, keep) + unique / bsz * dino_flops(cfg, grid)
        times = timed(lambda: base.encode_indexed(images, idx), dev, args.warmup, args.iters)
        perf("indexed", times, bsz, flops, unique_images=unique, **tag)

    # (b') encode_indexed with an episode's frame sharing, on the best combo
    if best is not None:
        tag = use(best[1])
        for bsz in ints(args.indexed_batch_sizes):
            try:
                time_indexed(bsz, tag)
            except Exception as exc:
                add({"case": "indexed", "batch": bsz, "error": repr(exc), "trace": traceback.format_exc(limit=4)})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()

    # (b'') the same indexed batches with flash-attn-4 attention (spatial.attention: flash_attn_4), same model
    fa4_reason = fa4.unavailable_reason(dev)
    if best is not None and fa4_reason is None:
        tag = {**use(best[1]), "attention": fa4.FA4}
        try:
            idx = episode_index(2)
            x = torch.rand(int(idx.max()) + 1, 3, size, size, generator=gen).to(dev)
            sdpa_out = base.encode_indexed(x, idx)
            base.model.attention_kernel = base.attention_kernel_for(fa4.FA4)  # keeps the compiled block halves
            add({"case": "check_fa4", "indexed_fa4_vs_sdpa": rel(base.encode_indexed(x, idx), sdpa_out)})
            for bsz in ints(args.indexed_batch_sizes):
                time_indexed(bsz, tag)
        except Exception as exc:
            add({"case": "indexed", "attention": fa4.FA4, "error": repr(exc), "trace": traceback.format_exc(limit=4)})
        finally:
            base.model.attention_kernel = "sdpa"
    else:
        add({"case": "indexed_fa4", "attention": fa4.FA4, "skipped": fa4_reason or "no batched combo ran"})

    if args.profile and best is not None:
        use(best[1])
        x = frames(best[0]["batch"])
        report["profile"] = {"batched": profile_summary(lambda: base.encode(x), dev, best[0]["batch"])}
        del x
        bsz = ints(args.indexed_batch_sizes)[-1] if args.indexed_batch_sizes else 0
        if bsz:
            idx = episode_index(bsz)
            images = torch.rand(int(idx.max()) + 1, 3, size, size, generator=gen).to(dev)
            report["profile"]["indexed"] = profile_summary(lambda: base.encode_indexed(images, idx), dev, bsz)
        save()
        for name, prof in report["profile"].items():
            print(f"# profile {name} B={prof['batch']}: device kernels {prof['total_device_ms']:.1f} ms "
                  f"in a {prof['wall_ms']:.1f} ms call; top kernels:")
            for k in prof["top"][:12]:
                print(f"  {k['ms']:9.1f} ms  {k['share']:5.1%}  {k['calls']:6d}  {k['name'][:100]}")
            print("  by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in prof["by_kind"].items()))

    print_table(report)
    return 0


KINDS = {
    "attention": ("flash", "fmha", "attention", "sdpa", "flex"),
    "gemm": ("gemm", "xmma", "nvjet", "cutlass", "gemv", "matmul", "addmm"),
    "layernorm": ("layer_norm", "layernorm"),
}


def kernel_kind(name: str) -> str:
    n = name.lower()
    for kind, words in KINDS.items():
        if any(w in n for w in words):
            return kind
    return "elementwise/other"


def profile_summary(call, dev, batch: int) -> dict:
    """Device time per kernel for one call, the split by kind, and the call's wall time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    call()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        call()
        sync()
        wall = time.perf_counter() - t0
    rows = []
    for e in prof.key_averages():
        if dev.type == "cuda":
            if e.device_type.name != "CUDA":
                continue
            t = e.device_time_total
        else:
            t = e.self_cpu_time_total
        if t:
            rows.append({"name": e.key, "ms": t / 1000.0, "calls": e.count})
    total = sum(r["ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["ms"])
    kinds: dict[str, float] = {}
    for r in rows:
        r["share"] = r["ms"] / total
        r["kind"] = kernel_kind(r["name"])
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["share"]
    return {"total_device_ms": total, "wall_ms": 1000 * wall, "batch": batch, "top": rows[:40], "by_kind": kinds}


def print_table(report) -> None:
    print(f"\n## {report['device']}  torch {report['torch']}  {report['date']}")
    print(f"   {report['preset']} {report['image_size']}px x {report['frames']} frames; "
          f"minimum {report['tflop_min_per_sample']:.2f} TF/sample; matmul {report['matmul_tflops']:.1f} TF/s")
    print(f"{'case':12} {'variant':22} {'B':>4} {'ms/sample':>10} {'samples/s':>10} {'TF/s(min)':>10} {'of mm':>6} {'peak GiB':>9}")
    for r in report["rows"]:
        if r["case"] in ("matmul", "check", "check_fa4") or "error" in r:
            if "error" in r:
                print(f"{r['case']:12} ERROR {r.get('variant', '')} B={r.get('batch')}: {r['error'][:100]}")
            continue
        if "skipped" in r:
            print(f"{r['case']:12} {r.get('attention', '')} not run: {r['skipped']}")
            continue
        variant = "/".join(str(r[k]) for k in ("variant", "global", "sdpa", "attention") if k in r) or "-"
        if "unique_images" in r:
            variant += f" U={r['unique_images']}"
        print(f"{r['case']:12} {variant:22} {r['batch']:>4} {r['ms_per_sample']:>10.1f} {r['samples_per_s']:>10.2f} "
              f"{r['tflops_on_min']:>10.4g} {r['of_matmul']:>6.3f} {r.get('peak_gib', float('nan')):>9.1f}")
    for r in report["rows"]:
        if r["case"] in ("check", "check_fa4"):
            print("check: " + json.dumps({k: v for k, v in r.items() if k != "case"}))


if __name__ == "__main__":
    sys.exit(main())
