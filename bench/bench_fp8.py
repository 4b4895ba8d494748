"""What storing the VGGT cache as float8_e4m3 (one float32 scale per token row) costs in accuracy.

One run, one process: demo-style 640x480 episodes -> 9-frame samples (history.pad repeat_first) -> the
spatial encoder at real size (VGGT-1B shape, seeded random weights with LayerScale gammas drawn from
[0.2, 0.8] so every block moves the residual stream) -> features as the bf16 cache stores them, and through
the fp8 codec of vlnflow.cache.format (exactly what FeatureStore returns). Reported, fp8 against the bf16
cache (and against the encoder's own output):
  features   relative error: Frobenius per sample, per token row (mean / p99 / max), max abs;
  merger     the 7B-shape spatial merger (2048 -> 4x2048 -> 4096 -> 3584, seeded random init) on both:
             relative error of its output, in float32 (the fp8 effect alone) and in bf16 (as trained);
  loss       (--loss-steps N > 0) N AdamW steps of the composed Qwen2.5-VL-7B-shape model (random init, bf16,
             merger trainable, LLM and vision frozen: fits one GPU without DeepSpeed) on the same samples with
             bf16-cache vs fp8-cache features, and zero features as the control;
  codec      time to quantise a batch of 16 samples (on the encoder's device) and to dequantise one sample
             on the CPU (what a DataLoader worker does per read).

GPU (one H200, ~3-5 min):
    PYTHONPATH=src python3 bench/bench_fp8.py --samples 8 --loss-steps 10 --out $OUT
CPU, the demo config's tiny models (what docs/benchmarks.md reports for the demo):
    PYTHONPATH=src python3 bench/bench_fp8.py --preset tiny --out /tmp/bench_fp8
Prints a table last; writes fp8_bench.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlnflow.cache import format as fmt

REPEATS = 10  # timed codec calls (median, min, max kept)
PRESETS = {  # spatial preset, image size, frame size on disk, model preset, merger hidden
    "real": {"spatial": "vggt-1b", "image_size": 644, "frame": (640, 480), "model": "qwen2.5-vl-7b", "merger_hidden": 4096},
    "tiny": {"spatial": "tiny", "image_size": 56, "frame": (96, 72), "model": "tiny", "merger_hidden": 128},
}
FP8 = "float8_e4m3"


def stats_of(values: torch.Tensor) -> dict:
    v = values.flatten().float()
    return {"mean": v.mean().item(), "p99": torch.quantile(v[: 2**24], 0.99).item(), "max": v.max().item()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_samples(work: Path, preset: dict, samples: int):
    """Demo episodes on disk, indexed with 9 frames per sample; returns (rows, dataset root)."""
    import pandas as pd

    from vlnflow.data.demo import write_episode
    from vlnflow.data.index import IndexSettings, build_index

    root = work / "episodes"
    for e in range(max(1, -(-samples // 12))):
        write_episode(str(root / f"ep{e:04d}"), f"ep{e:04d}", 12, seed=e, size=preset["frame"])
    idx = work / "index"
    build_index(IndexSettings(root=str(root), max_frames=8, pad="repeat_first", shard_count=1),
                str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))  # fmt: skip
    table = pd.read_parquet(idx / "samples.parquet")
    rows = table[table.frames.map(len) == 9].to_dict("records")
    step = max(1, len(rows) // samples)
    return rows[::step][:samples], root


def build_encoder(preset: dict, device: str, seed: int):
    from vlnflow.spatial import SpatialEncoder

    enc = SpatialEncoder.from_config(
        {"preset": preset["spatial"], "weights": None, "seed": seed, "image_size": preset["image_size"], "layer": -2,
         "reference_frame": "last", "dtype": "bfloat16", "device": device, "batch_size": 4},
        compile_blocks=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in sorted(enc.model.named_parameters()):
            if name.endswith("gamma"):  # LayerScale: non-trivial, so deep layers matter
                p.copy_(torch.empty(p.shape).uniform_(0.2, 0.8, generator=gen).to(p))
    return enc


def encode_features(enc, rows, root: Path, size: int) -> torch.Tensor:
    from vlnflow.spatial.preprocess import load_frame

    out = []
    for row in rows:
        frames = torch.stack([load_frame(root / rel_, geometry=enc.geometry) for rel_ in row["frames"]])
        with torch.inference_mode():
            out.append(enc.encode(frames[None].to(enc.device))[0].clone())
    return torch.stack(out)  # [N, P, C], bf16 on GPU (float32 on CPU)


def feature_errors(raw: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """bf16 cache and fp8 cache of the encoder output `raw` (on its device), and their errors."""
    bf16 = fmt.from_storage(fmt.to_storage(raw, "bfloat16"), "bfloat16")
    values, scale = fmt.encode(raw, FP8)
    fp8 = fmt.decode(values, FP8, scale)
    raw_cpu = raw.float().cpu()
    rows_vs_bf16 = fmt.row_rel_error(fp8, bf16)
    out = {
        "samples": raw.shape[0], "shape": list(raw.shape[1:]), "encoder_output_dtype": str(raw.dtype),
        "fp8_vs_bf16_cache": {
            "rel_frobenius_per_sample": [rel(fp8[i], bf16[i]) for i in range(raw.shape[0])],
            "row_rel": stats_of(rows_vs_bf16),
            "max_abs": (fp8.float() - bf16.float()).abs().max().item(),
            "bf16_absmax": bf16.float().abs().max().item(),
        },
        "fp8_vs_encoder_output": {"row_rel": stats_of(fmt.row_rel_error(fp8, raw_cpu)), "rel_frobenius": rel(fp8, raw_cpu)},
        "bf16_vs_encoder_output": {"row_rel": stats_of(fmt.row_rel_error(bf16, raw_cpu)), "rel_frobenius": rel(bf16, raw_cpu)},
        "row_rel_bound": fmt.ROUND_TRIP_BOUND[FP8],
        "bytes_per_sample": {d: fmt.bytes_per_sample(raw.shape[1], raw.shape[2], d) for d in ("bfloat16", FP8)},
    }
    return out, bf16, fp8


def merger_errors(bf16: torch.Tensor, fp8: torch.Tensor, grid, hidden: int, out_dim: int, device: torch.device) -> dict:
    from vlnflow.model.spatial_merger import SpatialMerger

    torch.manual_seed(1)  # as model.loading builds it: seeded random init
    merger = SpatialMerger(bf16.shape[-1], hidden, out_dim).to(device)
    res = {"hidden": hidden, "out_dim": out_dim}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            m = merger.to(dtype)
            ref = torch.cat([m(bf16[i : i + 1].to(device), grid).float().cpu() for i in range(bf16.shape[0])])
            got = torch.cat([m(fp8[i : i + 1].to(device), grid).float().cpu() for i in range(fp8.shape[0])])
            key = str(dtype).removeprefix("torch.")
            res[key] = {"rel_frobenius": rel(got, ref), "token_rel": stats_of(fmt.row_rel_error(got, ref))}
    return res


def codec_timing(raw: torch.Tensor, device: torch.device) -> dict:
    batch = raw[:1].expand(16, *raw.shape[1:]).contiguous()
    fmt.encode(batch, FP8)
    from vlnflow.timing import spread

    times = []
    for _ in range(REPEATS):
        sync(device)
        t0 = time.perf_counter()
        values, scale = fmt.encode(batch, FP8)
        sync(device)
        times.append(time.perf_counter() - t0)
    dec = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fmt.decode(values[0], FP8, scale[0])
        dec.append(time.perf_counter() - t0)
    return {"encode_16_samples_s": spread(times), "encode_device": str(device),
            "decode_one_sample_cpu_s": spread(dec), "cpu_threads": torch.get_num_threads()}  # fmt: skip


def loss_curves(rows, root: Path, feats: dict[str, torch.Tensor], preset: dict, steps: int, device: torch.device, grid) -> dict:
    from vlnflow.model.batching import Collator
    from vlnflow.model.loading import build_model, load_processors
    from vlnflow.spatial.geometry import FrameGeometry

    model_cfg = {"preset": preset["model"], "qwen_path": None, "seed": 0, "lam": 0.2,
                 "merger_hidden": preset["merger_hidden"], "merger_weights": None, "freeze_vision": True,
                 "vision_fast": True, "llm_attention": "varlen", "dtype": "bfloat16"}  # fmt: skip
    geometry = FrameGeometry("pad", preset["image_size"], preset["frame"])
    tokenizer, processor = load_processors(model_cfg, geometry)
    collator = Collator(tokenizer, processor, geometry, dataset_root=str(root))
    encoded = [collator.encode(r) for r in rows]
    channels = next(iter(feats.values())).shape[-1]
    curves = {}
    for name, f in feats.items():
        torch.manual_seed(0)
        model = build_model(model_cfg, channels, grid, device=device)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.merger.parameters():
            p.requires_grad_(True)
        if device.type == "cuda":
            model.gradient_checkpointing_enable()
        model.train()
        optim = torch.optim.AdamW(list(model.merger.parameters()), lr=1e-4)
        losses = []
        for step in range(steps):
            i = step % len(encoded)
            batch = collator.pack([encoded[i]], [f[i]])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = model(batch)
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        curves[name] = losses
        del model, optim
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = curves["bf16 cache"]
    dev = lambda c: max(abs(a - b) for a, b in zip(c, ref))  # noqa: E731
    return {"steps": steps, "trainable": "merger (LLM + vision frozen)", "curves": curves,
            "max_abs_diff_fp8": dev(curves["fp8 cache"]), "max_abs_diff_zero_features": dev(curves["zero features"])}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["real", "tiny"], default="real")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--loss-steps", type=int, default=0, help="AdamW steps of the composed model per curve (0 = skip)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    t_start = time.perf_counter()
    from vlnflow.provenance import provenance

    report = {"preset": args.preset, **preset}
    with tempfile.TemporaryDirectory() as tmp:
        rows, root = make_samples(Path(tmp), preset, args.samples)
        enc = build_encoder(preset, args.device, args.seed)
        device = enc.device
        report = {"provenance": provenance({"codec encode / decode": REPEATS, "loss steps per curve": args.loss_steps},
                                           argv=sys.argv if argv is None else ["bench/bench_fp8.py", *argv], device=device),
                  **report, "machine": {"cpus": os.cpu_count(), "host": platform.node()}}  # fmt: skip
        raw = encode_features(enc, rows, root, preset["image_size"])
        grid = enc.grid
        del enc
        report["features"], bf16, fp8 = feature_errors(raw)
        report["codec"] = codec_timing(raw, raw.device)
        from vlnflow.model.loading import load_qwen

        out_dim = 3584 if preset["model"] == "qwen2.5-vl-7b" else load_qwen({"preset": "tiny", "seed": 0}).config.text_config.hidden_size
        report["merger"] = merger_errors(bf16, fp8, grid, preset["merger_hidden"], out_dim, device)
        if args.loss_steps:
            feats = {"bf16 cache": bf16, "fp8 cache": fp8, "zero features": torch.zeros_like(bf16)}
            report["loss"] = loss_curves(rows, root, feats, preset, args.loss_steps, device, grid)
    report["wall_s"] = time.perf_counter() - t_start
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_bench.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    return 0


def print_table(r: dict) -> None:
    f, m = r["features"], r["merger"]
    p = r["provenance"]
    print(f"\n# fp8 e4m3 cache vs bf16 cache: {p['card']}, preset {r['preset']}, {f['samples']} samples of "
          f"{f['shape'][0]} x {f['shape'][1]}, encoder output {f['encoder_output_dtype']}, torch {p['versions']['torch']}, "
          f"commit {(p['commit'] or 'unknown')[:10]}{' (dirty)' if p['dirty'] else ''}")  # fmt: skip
    fv = f["fp8_vs_bf16_cache"]
    print(f"{'quantity':<48} {'mean':>9} {'p99':>9} {'max':>9}")
    print(f"{'features: per-row rel err, fp8 vs bf16 cache':<48} {fv['row_rel']['mean']:9.4f} {fv['row_rel']['p99']:9.4f} {fv['row_rel']['max']:9.4f}")
    per = fv["rel_frobenius_per_sample"]
    print(f"{'features: rel Frobenius per sample':<48} {statistics.mean(per):9.4f} {'':>9} {max(per):9.4f}")
    for name, key in (("fp8 vs encoder output", "fp8_vs_encoder_output"), ("bf16 vs encoder output", "bf16_vs_encoder_output")):
        s = f[key]["row_rel"]
        print(f"{'features: per-row rel err, ' + name:<48} {s['mean']:9.4f} {s['p99']:9.4f} {s['max']:9.4f}")
    for dtype in ("float32", "bfloat16"):
        t = m[dtype]["token_rel"]
        print(f"{'merger (' + dtype + '): per-token rel err':<48} {t['mean']:9.4f} {t['p99']:9.4f} {t['max']:9.4f}")
        print(f"{'merger (' + dtype + '): rel Frobenius':<48} {m[dtype]['rel_frobenius']:9.4f}")
    b = f["bytes_per_sample"]
    print(f"bytes per sample: bf16 {b['bfloat16']:,}  fp8 {b[FP8]:,} ({b[FP8] / b['bfloat16']:.3f}x); row bound {f['row_rel_bound']}")
    c = r["codec"]
    e, d = c["encode_16_samples_s"], c["decode_one_sample_cpu_s"]
    print(f"codec: quantise 16 samples {e['median'] * 1e3:.3g} ms (min {e['min'] * 1e3:.3g}, max {e['max'] * 1e3:.3g}, n={e['n']}) on "
          f"{c['encode_device']}; dequantise 1 sample on CPU {d['median'] * 1e3:.3g} ms (min {d['min'] * 1e3:.3g}, max "
          f"{d['max'] * 1e3:.3g}, n={d['n']}; {c['cpu_threads']} threads)")
    if "loss" in r:
        lo = r["loss"]
        print(f"loss over {lo['steps']} steps ({lo['trainable']}): max |fp8 - bf16| {lo['max_abs_diff_fp8']:.3g}, "
              f"max |zero features - bf16| {lo['max_abs_diff_zero_features']:.3g}")
        for name, curve in lo["curves"].items():
            print(f"  {name:<14} " + " ".join(f"{v:.4f}" for v in curve))
    print(f"wall {r['wall_s']:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
