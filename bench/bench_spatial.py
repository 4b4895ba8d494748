"""Throughput of the spatial encoder: streaming (as training runs VGGT today) vs batched block-causal.

One run measures, on the same card and process:
  matmul      a large bf16 matmul (the ceiling);
  check       batched vs streaming vs a float32 copy of the model (relative errors);
  stream_all  own streaming path, frame by frame, batch 1, all layers (= JanusVLN training), over
              samples of the same episode batch the indexed rows encode (one timed repetition each);
  stream_kept the same, stopping each frame at the kept layer;
  batched     encode(): one block-causal pass over B samples (several B, variants);
  batched_same_samples  encode() on exactly the indexed rows' samples (same B, frames repeated);
  indexed     encode_indexed(): B samples of one episode sharing U unique frames (DINOv2 once per image);
  profile     torch.profiler summary of one batched call (--profile).
Times: CUDA events (or wall clock on CPU) per call, warm-up first; every row keeps all its timed
repetitions (vlnflow.timing: median, min, max). TFLOP/s and MFU count what each row EXECUTES
(vlnflow.flops: streaming, the minimum for encode, DINOv2 once per unique frame for encode_indexed);
`min_equivalent_tflops_per_s` is the 59.5 TFLOP minimum per sample over the time, a throughput in
units of the least work, not an executed rate. `mfu_vs_peak` divides by the card's datasheet dense
bf16 rate, `mfu_vs_matmul` by the bf16 matmul measured in this run. Ratios (`ratios`) are computed
only between rows of this run, with their min-max range.

GPU:  PYTHONPATH=src python3 bench/bench_spatial.py --out-json $OUT/spatial_bench.json
CPU smoke test:  PYTHONPATH=src python3 bench/bench_spatial.py --tiny
With flash-attn-4 installed (the gpu extra) and a CUDA sm90+ card, the `indexed` rows are repeated with
spatial.attention flash_attn_4 (same model, same batches; `check_fa4` = its error against SDPA); the
other rows use SDPA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from vlnflow import fa4
from vlnflow import flops as F
from vlnflow.provenance import provenance
from vlnflow.spatial import PRESETS, SpatialEncoder
from vlnflow.spatial.geometry import FrameGeometry
from vlnflow.timing import matmul_tflops, ratio, scaled, spread, timed_calls


# ---- inputs ---------------------------------------------------------------------------------


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
    ap.add_argument("--preprocess", default="crop,pad",
                    help="frame preparations (spatial.preprocess), comma list: the first drives every row, the others "
                         "repeat the check and the indexed rows on their frame shape, in this run (crop vs pad)")
    ap.add_argument("--frame-size", default="640x480", help="source frame WxH (spatial.frame_size): 640x480 = R2R-CE")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument(
        "--combos", default="eager:prefix:default,compiled:prefix:default",
        help="comma list of execution:global-attention:sdpa, each of eager|compiled : prefix|flex : default|flash|cudnn|efficient",
    )
    ap.add_argument("--variant-batch-sizes", default="8", help="batch sizes for every combo after the first")
    ap.add_argument("--indexed-batch-sizes", default="16,32")
    ap.add_argument("--stream-samples", type=int, default=10, help="timed streaming repetitions (one sample each)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10, help="timed calls per batched / indexed row (>= 10 for a published ratio)")
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: --preset tiny --image-size 56 --device cpu, small batches")
    ap.add_argument("--out-json", default=None, help="default: $OUT/spatial_bench.json when OUT is set")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.image_size, args.device = "tiny", 56, "cpu"
        args.batch_sizes, args.variant_batch_sizes, args.indexed_batch_sizes = "1,2", "2", "4"
        args.combos = "eager:prefix:default"  # compiling on CPU takes ~40 s
        args.stream_samples, args.iters = 2, 2

    out_json = args.out_json or (os.path.join(os.environ["OUT"], "spatial_bench.json") if os.environ.get("OUT") else None)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    modes = [m for m in args.preprocess.split(",") if m]
    frame_size = [int(v) for v in args.frame_size.lower().split("x")]
    spatial_cfg = {
        "preset": args.preset, "weights": None, "seed": 0, "image_size": args.image_size, "layer": -2,
        "reference_frame": "last", "dtype": "bfloat16", "device": args.device, "attention": "sdpa",
        "preprocess": modes[0], "frame_size": frame_size,
    }
    t0 = time.perf_counter()
    base = SpatialEncoder.from_config(spatial_cfg, compile_blocks=False)
    dev = base.device
    # FLOPs follow the VGGT input's patch grid (crop 35x46 for 640x480 at 644), not the kept 34x46
    cfg, grid, s = base.model.config, base.geometry.vggt_grid, args.frames
    hw = base.geometry.vggt_hw
    keep = base.layer
    flops_min = F.vggt_minimum(cfg, grid, s, keep)
    flops_stream = F.vggt_streaming(cfg, grid, s)
    repetitions: dict = {}
    report = {
        "provenance": provenance(repetitions, argv=sys.argv if argv is None else ["bench/bench_spatial.py", *argv], device=dev),
        "preset": args.preset, "image_size": args.image_size, "preprocess": modes[0], "frame_size": frame_size,
        "input_hw": list(hw), "frames": s, "grid": grid, "kept_layer": keep,
        "params": sum(p.numel() for p in base.model.parameters()),
        "tflop_min_per_sample": flops_min / 1e12, "tflop_streaming_per_sample": flops_stream / 1e12,
        "build_s": time.perf_counter() - t0, "rows": [], "ratios": [],
    }
    card = report["provenance"]["card"]
    print(f"# {card} torch {torch.__version__}  params {report['params']:,}  "
          f"min {flops_min / 1e12:.2f} TF/sample  streaming {flops_stream / 1e12:.2f} TF/sample", flush=True)

    def save():
        if out_json:
            with open(out_json, "w") as fh:
                json.dump(report, fh, indent=1)

    def add(row):
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("seconds_per_call",)}), flush=True)
        save()

    gen = torch.Generator().manual_seed(0)

    def frames(b):
        return torch.rand(b, s, 3, *hw, generator=gen).to(dev)

    # (c) the matmul ceiling, in this run
    mm = matmul_tflops(dev, args.matmul_size)
    if mm is None:  # CPU: a small float32 matmul, for the smoke test's arithmetic only
        n = 512
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm = {"size": n, **spread([2 * n**3 / t / 1e12 for t in timed_calls(lambda: a @ b, dev, warmup=2, iters=5)])}
    matmul = mm["median"]
    report["matmul_tflops"] = mm
    repetitions["matmul"] = mm["n"]
    add({"case": "matmul", **mm})

    def perf(case, per_call_s, batch, flops_per_sample, **extra):
        """A row: every timed call kept; per-sample time median / min / max; executed TFLOP/s and MFU on the median."""
        calls = spread(per_call_s)
        per_sample = spread([t / batch for t in per_call_s])
        rate = F.mfu(flops_per_sample, per_sample["median"], matmul_tflops=matmul, device_name=card)
        row = {"case": case, "batch": batch, "ms_per_sample": 1000 * per_sample["median"],
               "ms_per_sample_min": 1000 * per_sample["min"], "ms_per_sample_max": 1000 * per_sample["max"],
               "samples_per_s": 1 / per_sample["median"], "tflop_executed_per_sample": flops_per_sample / 1e12,
               "tflops_per_s": rate["tflops_per_s_per_gpu"], "mfu_vs_peak": rate["mfu_vs_peak"], "mfu_vs_matmul": rate["mfu_vs_matmul"],
               "min_equivalent_tflops_per_s": flops_min / per_sample["median"] / 1e12,
               "calls": calls["n"], "seconds_per_call": calls, **extra}  # fmt: skip
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            torch.cuda.reset_peak_memory_stats(dev)
        tag = "/".join(str(extra[k]) for k in ("variant", "global", "sdpa", "attention") if k in extra)
        repetitions[f"{case} {tag} B={batch}".replace("  ", " ")] = calls["n"]
        add(row)
        return row

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

    # (a) streaming, batch 1, frame by frame, over samples of the first indexed batch (the same samples)
    first_b = (ints(args.indexed_batch_sizes) or [args.stream_samples])[0]
    stream_idx = episode_index(max(first_b, 1))
    stream_images = torch.rand(int(stream_idx.max()) + 1, 3, *hw, generator=gen).to(dev)
    stream_rows = {}
    for case, all_layers, flops in (
        ("stream_all", True, flops_stream),
        ("stream_kept", False, F.vggt_streaming(cfg, grid, s, keep + 1)),
    ):
        it = iter(range(10**9))
        sample = lambda: stream_images[stream_idx[next(it) % len(stream_idx)]][None]  # noqa: E731
        times = timed_calls(lambda: base.encode_streaming(sample(), all_layers=all_layers), dev, warmup=1, iters=args.stream_samples)
        stream_rows[case] = perf(case, times, 1, flops, samples_from=f"episode batch B={first_b}")

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
                times = timed_calls(lambda: base.encode(x), dev, warmup=args.warmup, iters=args.iters)
                row = perf("batched", times, bsz, flops_min, first_call_s=first_s, **tag)
                if best is None or row["ms_per_sample"] < best[0]["ms_per_sample"]:
                    best = (row, combo)
                del x
            except Exception as exc:
                add({"case": "batched", "batch": bsz, **tag, "error": repr(exc), "trace": traceback.format_exc(limit=4)})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()

    def time_indexed(bsz: int, tag: dict, same_samples: bool) -> dict:
        """The `indexed` row over an episode's steps 0..bsz-1 (frames shared between steps) and, with
        `same_samples`, `encode` on exactly those samples (the like-for-like pair for a ratio)."""
        idx = episode_index(bsz)
        unique = int(idx.max()) + 1
        images = torch.rand(unique, 3, *hw, generator=gen).to(dev)
        out = {}
        if same_samples:
            x = images[idx]
            times = timed_calls(lambda: base.encode(x), dev, warmup=args.warmup, iters=args.iters)
            out["batched"] = perf("batched_same_samples", times, bsz, flops_min, unique_images=unique, **tag)
            del x
        times = timed_calls(lambda: base.encode_indexed(images, idx), dev, warmup=args.warmup, iters=args.iters)
        flops = F.vggt_indexed(cfg, grid, s, keep, samples=bsz, unique_images=unique) / bsz
        out["indexed"] = perf("indexed", times, bsz, flops, unique_images=unique, **tag)
        return out

    def add_ratio(what, a, b, *, same_batch=True):
        """a / b of per-sample times (how many times faster b is), both rows of this run."""
        sa, sb = (scaled(row["seconds_per_call"], 1 / row["batch"]) for row in (a, b))
        try:
            r = ratio(sa, sb, what=what, batch=(a["batch"], b["batch"]) if same_batch else None)
        except ValueError as exc:
            r = {"what": what, "skipped": str(exc)}
        r.update({"numerator": a["case"], "denominator": b["case"], "batches": [a["batch"], b["batch"]]})
        report["ratios"].append(r)
        save()

    # (b') encode_indexed with an episode's frame sharing, on the best combo, next to encode on the same samples
    indexed_rows = {}
    if best is not None:
        tag = use(best[1])
        for bsz in ints(args.indexed_batch_sizes):
            try:
                pair = time_indexed(bsz, tag, same_samples=True)
                indexed_rows[bsz] = pair["indexed"]
                add_ratio(f"encode / encode_indexed, the same {bsz} samples", pair["batched"], pair["indexed"])
            except Exception as exc:
                add({"case": "indexed", "batch": bsz, "error": repr(exc), "trace": traceback.format_exc(limit=4)})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        for case, row in stream_rows.items():
            if first_b in indexed_rows:
                add_ratio(f"{case} (one sample at a time, batch 1 by construction) / encode_indexed B={first_b}, the same "
                          f"episode's samples", row, indexed_rows[first_b], same_batch=False)  # fmt: skip

    # (b'') the same indexed batches with flash-attn-4 attention (spatial.attention: flash_attn_4), same model
    fa4_reason = fa4.unavailable_reason(dev)
    if best is not None and fa4_reason is None:
        tag = {**use(best[1]), "attention": fa4.FA4}
        try:
            idx = episode_index(2)
            x = torch.rand(int(idx.max()) + 1, 3, *hw, generator=gen).to(dev)
            sdpa_out = base.encode_indexed(x, idx)
            base.model.attention_kernel = base.attention_kernel_for(fa4.FA4)  # keeps the compiled block halves
            add({"case": "check_fa4", "indexed_fa4_vs_sdpa": rel(base.encode_indexed(x, idx), sdpa_out)})
            for bsz in ints(args.indexed_batch_sizes):
                row = time_indexed(bsz, tag, same_samples=False)["indexed"]
                if bsz in indexed_rows:
                    add_ratio(f"encode_indexed SDPA / flash-attn-4, B={bsz}", indexed_rows[bsz], row)
        except Exception as exc:
            add({"case": "indexed", "attention": fa4.FA4, "error": repr(exc), "trace": traceback.format_exc(limit=4)})
        finally:
            base.model.attention_kernel = "sdpa"
    else:
        add({"case": "indexed_fa4", "attention": fa4.FA4, "skipped": fa4_reason or "no batched combo ran"})

    # (b4) the other frame preparations (crop vs pad): the same model and combo, their frame shape and FLOPs
    first_rows = dict(indexed_rows)
    for mode in modes[1:]:
        other = FrameGeometry(mode, args.image_size, tuple(frame_size))
        hw, grid = other.vggt_hw, other.vggt_grid
        try:
            x = frames(2)
            check = {"case": "check", "preprocess": mode, "input_hw": list(hw),
                     "indexed_vs_batched": rel(base.encode_indexed(x.flatten(0, 1), torch.arange(2 * s).view(2, s)), base.encode(x))}
            if dev.type == "cuda":
                ref32 = SpatialEncoder.from_config({**spatial_cfg, "preprocess": mode, "dtype": "float32"})
                check["bf16_vs_fp32"] = rel(base.encode(x), ref32.encode(x))
                del ref32
                torch.cuda.empty_cache()
            add(check)
            if best is not None:
                tag = {**use(best[1]), "preprocess": mode}
                for bsz in ints(args.indexed_batch_sizes):
                    row = time_indexed(bsz, tag, same_samples=False)["indexed"]
                    if bsz in first_rows:
                        add_ratio(f"encode_indexed {modes[0]} / {mode} frames, B={bsz}", first_rows[bsz], row)
        except Exception as exc:
            add({"case": "indexed", "preprocess": mode, "error": repr(exc), "trace": traceback.format_exc(limit=4)})
    hw, grid = base.geometry.vggt_hw, base.geometry.vggt_grid

    if args.profile and best is not None:
        use(best[1])
        x = frames(best[0]["batch"])
        report["profile"] = {"batched": profile_summary(lambda: base.encode(x), dev, best[0]["batch"])}
        del x
        bsz = ints(args.indexed_batch_sizes)[-1] if args.indexed_batch_sizes else 0
        if bsz:
            idx = episode_index(bsz)
            images = torch.rand(int(idx.max()) + 1, 3, *hw, generator=gen).to(dev)
            report["profile"]["indexed"] = profile_summary(lambda: base.encode_indexed(images, idx), dev, bsz)
        save()
        for name, prof in report["profile"].items():
            print(f"# profile {name} B={prof['batch']}: device kernels {prof['total_device_ms']:.1f} ms "
                  f"in a {prof['wall_ms']:.1f} ms call; top kernels:")
            for k in prof["top"][:12]:
                print(f"  {k['ms']:9.1f} ms  {k['share']:5.1%}  {k['calls']:6d}  {k['name'][:100]}")
            print("  by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in prof["by_kind"].items()))

    save()
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
    p = report["provenance"]
    mm = report["matmul_tflops"]
    print(f"\n## {p['card']}  torch {p['versions']['torch']}  {p['date']}  commit {(p['commit'] or 'unknown')[:10]}"
          f"{' (dirty)' if p['dirty'] else ''}")
    print(f"   {report['preset']} {report['image_size']}px x {report['frames']} frames; minimum {report['tflop_min_per_sample']:.2f} "
          f"TF/sample; matmul {mm['median']:.1f} TF/s (min {mm['min']:.1f}, max {mm['max']:.1f}, n={mm['n']})")
    print(f"{'case':20} {'variant':24} {'B':>4} {'ms/sample':>10} {'min-max':>15} {'n':>3} {'TF exec':>8} {'TF/s':>7} "
          f"{'vs peak':>7} {'vs mm':>6} {'peak GiB':>9}")
    fmt = lambda v, f: f"{'-':>{f.split('.')[0]}}" if v is None else format(v, f)  # noqa: E731
    for r in report["rows"]:
        if r["case"] in ("matmul", "check", "check_fa4") or "error" in r:
            if "error" in r:
                print(f"{r['case']:20} ERROR {r.get('variant', '')} B={r.get('batch')}: {r['error'][:100]}")
            continue
        if "skipped" in r:
            print(f"{r['case']:20} {r.get('attention', '')} not run: {r['skipped']}")
            continue
        variant = "/".join(str(r[k]) for k in ("variant", "global", "sdpa", "attention") if k in r) or "-"
        if "unique_images" in r:
            variant += f" U={r['unique_images']}"
        span = f"{r['ms_per_sample_min']:.1f}-{r['ms_per_sample_max']:.1f}"
        print(f"{r['case']:20} {variant:24} {r['batch']:>4} {r['ms_per_sample']:>10.1f} {span:>15} {r['calls']:>3} "
              f"{r['tflop_executed_per_sample']:>8.2f} {r['tflops_per_s']:>7.4g} {fmt(r['mfu_vs_peak'], '7.3f')} "
              f"{fmt(r['mfu_vs_matmul'], '6.3f')} {r.get('peak_gib', float('nan')):>9.1f}")
    for r in report["rows"]:
        if r["case"] in ("check", "check_fa4"):
            print("check: " + json.dumps({k: v for k, v in r.items() if k != "case"}))
    for r in report["ratios"]:
        if "skipped" in r:
            print(f"ratio {r['what']}: not computed ({r['skipped']})")
        else:
            print(f"ratio {r['what']}: {r['median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f}, n={r['n']})")


if __name__ == "__main__":
    sys.exit(main())
