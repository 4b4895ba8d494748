"""Training step benchmark at the seed's real shapes: Qwen2.5-VL-7B (random init) + real-size spatial path.

Two modes, each one run on one machine so every ratio compares like with like.

--mode fwdbwd (default; one GPU, ~5 min on an H200): forward + backward seconds per sample of the
training model WITHOUT the optimizer (the 7B does not fit ZeRO-2 with Adam on one card), bf16 weights
and gradients, on the trainer's own packed batches (9 frames of 640x480 -> 644x644, ~5.3k tokens per
sample, per_device_batch 4), cases `old` (current kernels, full checkpointing, packing in the training
process), `new` (flash-attn-4, selective checkpointing planned for 80 GiB cards under ZeRO-2 x 8,
packing in DataLoader workers + prefetched copies), `new_card` (the plan for this card, no optimizer)
`stock_hf` (transformers' own Qwen2.5-VL forward + loss, sdpa, padded batch, full checkpointing) and
`new_head` (`new` with the seed's action head: its cost, ratio new_head_over_new),
plus a bf16 matmul ceiling and the ratios (bench/fwdbwd.py has the details):

    PYTHONPATH=src python3 bench/bench_train.py --out $OUT                    # one H200 (gpu extra installed)
    PYTHONPATH=src python3 bench/bench_train.py --tiny --out /tmp/bt          # CPU smoke test

--mode zero2 (several GPUs): short runs of the real trainer under torchrun (cached vs live VGGT, ZeRO-2
offload vs ZeRO-2 vs ZeRO-3, per-device batch 1 and 4, reduce buckets 2e8 vs 5e8 elements), after
building a VGGT-1B feature cache:

    PYTHONPATH=src python3 bench/bench_train.py --mode zero2 --gpus 4 --steps 3 --out $OUT
    PYTHONPATH=src python3 bench/bench_train.py --mode zero2 --tiny --gpus 1 --steps 2 --out /tmp/bt

Both write $OUT/train_bench.json with a `summary` per case (samples_per_s_per_gpu, forward_s,
backward_s, step_s, mfu_vs_matmul, per_device_batch, grad_accum, gpus, peak_gib, fits_80gb) and print
a table last. MFU counts model FLOPs without the checkpoint recompute (FLOP formulas from
docs/design.md, "Measured facts"): LLM 6*N*T + causal attention 3*2*L*T^2*d + label head, frozen vision
forward, merger fwd+bwd.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-VL-7B text model (QWEN_GPU_REFERENCE.md)
N_MM = 6.525e9  # matmul weights in the decoder blocks
LAYERS, D_ATTN, VOCAB, HIDDEN = 28, 3584, 152064, 3584
VISION_FWD_PER_IMAGE = 25.46e12 / 9  # 644x644 image, frozen tower, forward only
MERGER_PER_SAMPLE = 0.153e12  # fwd + bwd
LABELS_PER_SAMPLE = 80


def model_flops(tokens: float, images: float, samples: float) -> float:
    """Model FLOPs of one optimizer step (no recompute), given total tokens/images/samples and mean T."""
    t_mean = tokens / samples
    llm = 6 * N_MM * tokens + samples * 3 * 2 * LAYERS * t_mean**2 * D_ATTN + samples * 3 * 2 * HIDDEN * VOCAB * LABELS_PER_SAMPLE
    return llm + images * VISION_FWD_PER_IMAGE + samples * MERGER_PER_SAMPLE


def matmul_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def base_config(work: Path, tiny: bool) -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["dataset"]["root"] = str(work / "data" / "episodes")
    cfg["history"] = {"max_frames": 8, "pad": "repeat_first"}
    cfg["shards"]["count"] = 2
    cfg["cache"]["spot_check"] = 0
    cfg["train"].update(
        {"run": "bench", "samples": str(work / "index" / "samples.parquet"), "cache": str(work / "cache" / "manifest.json"),
         "save_every": 10**6, "save_at_end": False, "resume": False, "phase_timing": True, "loader": {"workers": 4 if not tiny else 1, "prefetch_factor": 4}}
    )
    if not tiny:
        cfg["spatial"].update({"preset": "vggt-1b", "image_size": 644, "device": "cuda", "batch_size": 16})
        cfg["model"].update({"preset": "qwen2.5-vl-7b", "merger_hidden": 4096})
        cfg["train"].update({"per_device_batch": 1, "grad_accum": 8, "bf16": True})
        cfg["cluster"]["backend"] = "nccl"
    return cfg


def prepare(work: Path, cfg: dict, tiny: bool, results: dict) -> None:
    """Demo data, index, shards and the feature cache (timed)."""
    import torch

    from vlnflow.cache.manifest import merge_manifest
    from vlnflow.cache.precompute import precompute_shard
    from vlnflow.data.index import IndexSettings, build_index
    from vlnflow.data.shards import read_shard_list, stored_fingerprint, write_shards
    from vlnflow.spatial import SpatialEncoder

    size = ["--size", "112x84"] if tiny else []
    subprocess.run([sys.executable, "-m", "vlnflow.cli", "demo-data", str(work / "data"), "--force", *size], check=True)
    idx = work / "index"
    idx.mkdir(parents=True, exist_ok=True)
    build_index(IndexSettings.from_config(cfg), str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))
    write_shards(str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(work / "shards"), str(work / "shards" / "shards.json"), 2)
    encoder = SpatialEncoder.from_config(cfg["spatial"])
    files, t0, n = [], time.perf_counter(), 0
    for entry in read_shard_list(str(work / "shards" / "shards.json")):
        shard = work / "shards" / f"{entry['name']}.parquet"
        out = work / "cache" / f"{entry['name']}.h5"
        stats = precompute_shard(shard, stored_fingerprint(str(shard)), out, work / "cache" / ".partial" / out.name, cfg, encoder=encoder, progress=False)
        files.append(out)
        n += stats["computed"]
        results.setdefault("precompute", []).append(stats)
    merge_manifest(files, work / "cache" / "manifest.json", work / "cache" / "manifest.parquet")
    results["precompute_total"] = {"samples": n, "wall_s": time.perf_counter() - t0}
    # The reference way: frame by frame, batch 1, over a few samples' 9 frames (own streaming path).
    frames = torch.rand(1, 9, 3, *encoder.geometry.vggt_hw, device=encoder.device)
    ts = []
    for _ in range(3 if not tiny else 1):
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        encoder.encode_streaming(frames)
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - s)
    results["vggt_streaming_batch1_s_per_sample"] = statistics.median(ts[1:] if len(ts) > 1 else ts)
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(work: Path, cfg: dict, name: str, gpus: int, steps: int, overrides: dict, live: bool, timeout: float) -> dict:
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    case_cfg = json.loads(json.dumps(cfg))
    for key, value in overrides.items():
        node = case_cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(case_cfg))
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--master-port=29511", "-m",
            "vlnflow.train.run", "--config", str(cfg_path), "--run-dir", str(run_dir), "--max-steps", str(steps)]
    if live:
        argv.append("--no-cache")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        ok, tail = False, f"timed out after {timeout:.0f} s: " + str(exc.stderr or "")[-2000:]
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if (run_dir / "metrics.jsonl").exists() else []
    return {"name": name, "gpus": gpus, "ok": ok and len(rows) == steps, "wall_s": wall, "steps": rows, "log_tail": None if ok else tail,
            "deepspeed": case_cfg["train"]["deepspeed"], "per_device_batch": case_cfg["train"]["per_device_batch"],
            "grad_accum": case_cfg["train"]["grad_accum"], "live": live}


def summarize(case: dict, peak_tflops: float | None) -> dict:
    rows = case["steps"][1:] or case["steps"]  # the first step carries warm-up (compile, allocator, cpu_adam build)
    if not rows:
        return {"name": case["name"], "ok": False}
    s_it = statistics.median(r["s_per_it"] for r in rows)
    samples = case["per_device_batch"] * case["grad_accum"] * case["gpus"]
    tokens = statistics.median(r["tokens_per_s"] * r["s_per_it"] for r in rows)
    images = samples * 9
    flops = model_flops(tokens, images, samples)
    out = {
        "name": case["name"], "ok": case["ok"], "gpus": case["gpus"], "deepspeed": case["deepspeed"], "live": case["live"],
        "per_device_batch": case["per_device_batch"], "grad_accum": case["grad_accum"],
        "s_per_it": s_it, "samples_per_s_per_gpu": samples / s_it / case["gpus"],
        "data_wait_pct": 100 * sum(r["data_wait_s"] for r in rows) / sum(r["s_per_it"] for r in rows),
        "peak_gib": max((max(r["gpu_mem_gib"]) if r["gpu_mem_gib"] else 0.0) for r in rows),
        "tokens_per_sample": tokens / samples, "model_tflop_per_step": flops / 1e12,
        "loss_last": rows[-1]["loss"],
    }
    out["fits_80gb"] = out["peak_gib"] <= 80.0  # the H800 budget (peak reported by rank 0's metrics)
    for phase in ("forward_s", "backward_s", "step_s"):
        if phase in rows[-1]:
            out[phase] = statistics.median(r[phase] for r in rows)
    if peak_tflops:
        out["mfu_vs_matmul"] = flops / s_it / case["gpus"] / (peak_tflops * 1e12)
        out["mfu_vs_989"] = flops / s_it / case["gpus"] / 989e12
    # The seed's step: 64 samples on 8 GPUs.
    out["projected_s_per_64_sample_step_8gpu"] = 64 / (out["samples_per_s_per_gpu"] * 8)
    return out


def fwdbwd_main(args, out: Path, work: Path) -> int:
    """--mode fwdbwd: the one-GPU forward+backward cases of bench/fwdbwd.py."""
    import pandas as pd
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fwdbwd import run_cases  # noqa: PLC0415 - bench helper next to this file

    from vlnflow.data.index import IndexSettings, build_index

    started = time.perf_counter()
    cfg = base_config(work, args.tiny)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    results: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "mode": "fwdbwd",
                     "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    results["matmul_tflops"] = matmul_tflops()
    idx = work / "index"
    if not (args.reuse and (idx / "samples.parquet").exists()):
        size = ["--size", "112x84"] if args.tiny else []
        subprocess.run([sys.executable, "-m", "vlnflow.cli", "demo-data", str(work / "data"), "--episodes", "4", "--force", *size], check=True)
        idx.mkdir(parents=True, exist_ok=True)
        build_index(IndexSettings.from_config(cfg), str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))
    samples = pd.read_parquet(idx / "samples.parquet")
    log = lambda msg: print(f"[bench_train {time.perf_counter() - started:5.0f}s] {msg}", flush=True)  # noqa: E731
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    rows = run_cases(cfg, samples, device, per_device=args.per_device_batch, warmup=args.warmup, steps=args.steps,
                     workers=1 if args.tiny else args.workers, wanted=wanted, log=log,
                     deadline=started + args.budget_s)
    for row in rows:
        row["summary"] = summarize_fwdbwd(row, results["matmul_tflops"])
        results.setdefault("cases", []).append(row)
    by = {r["name"]: r["summary"] for r in rows if r.get("ok")}
    ratios = {}
    for a, b in (("old", "new"), ("stock_hf", "new"), ("old", "new_card"), ("stock_hf", "old"), ("new_head", "new")):
        if a in by and b in by:
            ratios[f"{a}_over_{b}"] = by[a]["s_per_sample"] / by[b]["s_per_sample"]
    results["ratios_s_per_sample"] = ratios
    results["wall_s"] = time.perf_counter() - started
    (out / "train_bench.json").write_text(json.dumps(results, indent=2))
    print(f"\ndevice {results['device']}  torch {results['torch']}  matmul {results['matmul_tflops']} TFLOP/s  wall {results['wall_s']:.0f} s")
    print(f"{'case':10} {'kernel':13} {'ckpt':>6} {'s/sample':>9} {'smp/s':>7} {'fwd s':>7} {'bwd s':>7} {'rest s':>7} "
          f"{'MFU':>6} {'peakGiB':>8} {'tok/smp':>8}")
    for row in rows:
        s = row["summary"]
        if not row.get("ok"):
            print(f"{row['name']:10} FAILED {row.get('error', '')[:120]}")
            continue
        print(f"{row['name']:10} {row['kernel']:13} {row['checkpointed_layers']:>3}/{row['layers']:<2} {s['s_per_sample']:9.3f} "
              f"{s['samples_per_s_per_gpu']:7.3f} {s.get('forward_s', float('nan')):7.3f} {s.get('backward_s', float('nan')):7.3f} "
              f"{s.get('rest_s', float('nan')):7.3f} {s.get('mfu_vs_matmul', float('nan')):6.3f} {s.get('peak_gib', float('nan')):8.1f} "
              f"{s['tokens_per_sample']:8.0f}")
    for row in rows:
        if row.get("plan"):
            print(f"plan {row['name']}: {row['plan']}")
        if row.get("note"):
            print(f"note {row['name']}: {row['note']}")
    print("ratios (s/sample): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return 0 if all(r.get("ok") for r in rows) else 1


def summarize_fwdbwd(row: dict, peak_tflops: float | None) -> dict:
    if not row.get("ok"):
        return {"name": row["name"], "ok": False}
    samples, wall = row["samples"], row["wall_s"]
    out = {
        "name": row["name"], "ok": True, "gpus": 1, "per_device_batch": row["per_device_batch"], "grad_accum": 1,
        "samples_per_s_per_gpu": samples / wall, "s_per_sample": wall / samples, "micro_s": row["micro_s"],
        "step_s": 0.0,  # no optimizer in this mode
        "tokens_per_sample": row["tokens"] / samples, "loss_last": row["loss_last"],
    }
    for key in ("forward_s", "backward_s", "peak_gib"):
        if key in row:
            out[key] = row[key]
    if "forward_s" in out:
        out["rest_s"] = row["micro_s"] - out["forward_s"] - out["backward_s"]
        out["fits_80gb"] = out["peak_gib"] <= 80.0
    if peak_tflops:
        flops = model_flops(row["tokens"], 9 * samples, samples)
        out["mfu_vs_matmul"] = flops / wall / (peak_tflops * 1e12)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fwdbwd", "zero2"], default="fwdbwd")
    parser.add_argument("--per-device-batch", type=int, default=4, help="fwdbwd: samples packed per micro-batch")
    parser.add_argument("--warmup", type=int, default=2, help="fwdbwd: untimed micro-batches per case (kernel JIT, allocator)")
    parser.add_argument("--workers", type=int, default=6, help="fwdbwd: DataLoader workers")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="zero2: optimizer steps per case (the first is warm-up); fwdbwd: timed micro-batches")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test of this script)")
    parser.add_argument("--cases", default="all", help="comma list of case names, or 'all'")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting cases after this many seconds (default: 330 for fwdbwd, 540 for zero2)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_train"))
    parser.add_argument("--work", default="/tmp/vlnflow_bench_train")
    parser.add_argument("--reuse", action="store_true", help="keep the data and cache already in --work")
    args = parser.parse_args()
    started = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.budget_s is None:
        args.budget_s = 330.0 if args.mode == "fwdbwd" else 540.0
    if args.mode == "fwdbwd":
        return fwdbwd_main(args, out, work)
    cfg = base_config(work, args.tiny)
    if args.tiny:
        cfg["cluster"]["backend"] = "gloo"
    results: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "cases": []}
    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        results["torch"] = torch.__version__
    except Exception:  # pragma: no cover
        pass
    results["matmul_tflops"] = matmul_tflops()
    if args.reuse and (work / "cache" / "manifest.json").exists():
        results["reused_cache"] = str(work / "cache")  # data, index and cache of an earlier run on this machine
    else:
        prepare(work, cfg, args.tiny, results)
    g = args.gpus
    cases = [
        (f"cached_zero2_g{g}", g, {"train.deepspeed": "zero2"}, False),
        (f"live_zero2_g{g}", g, {"train.deepspeed": "zero2"}, True),
        (f"cached_zero3_g{g}", g, {"train.deepspeed": "zero3"}, False),
        (f"cached_zero2_offload_g{g}", g, {"train.deepspeed": "zero2_offload"}, False),
        (f"cached_zero2_b4_g{g}", g, {"train.deepspeed": "zero2", "train.per_device_batch": 4, "train.grad_accum": 2}, False),
        # gradient reduce-scatter buckets (overlap_comm): the preset's 2e8 elements vs 5e8
        (f"cached_zero2_b4_bucket5e8_g{g}", g, {"train.deepspeed": "zero2", "train.per_device_batch": 4, "train.grad_accum": 2,
                                                "train.zero_bucket_elements": 500_000_000}, False),
        ("cached_zero2_offload_g1", 1, {"train.deepspeed": "zero2_offload"}, False),
    ]
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    for name, gpus, overrides, live in cases:
        if wanted and name not in wanted:
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < 60:
            results["cases"].append({"name": name, "ok": False, "skipped": f"time budget: {left:.0f} s left"})
            continue
        case = run_case(work, cfg, name, gpus, args.steps, overrides, live, timeout=left)
        case["summary"] = summarize(case, results["matmul_tflops"]) if case["steps"] else {"name": name, "ok": False}
        results["cases"].append(case)
        (out / "train_bench.json").write_text(json.dumps(results, indent=2))
        print(f"[bench_train] {name}: ok={case['ok']} wall {case['wall_s']:.0f}s", flush=True)
        if not case["ok"]:
            print(case["log_tail"], flush=True)
    (out / "train_bench.json").write_text(json.dumps(results, indent=2))
    print(f"\ndevice {results.get('device')}  matmul {results['matmul_tflops']} TFLOP/s  "
          f"precompute {results.get('precompute_total')}  VGGT streaming b1 {results.get('vggt_streaming_batch1_s_per_sample')} s/sample")
    print(f"{'case':32} {'s/it':>7} {'smp/s/GPU':>9} {'wait%':>6} {'peakGiB':>8} {'MFU':>6} {'64/8GPU':>8} {'fwd':>6} {'bwd':>6} {'opt':>6}")
    for case in results["cases"]:
        s = case.get("summary") or {}
        if not s.get("s_per_it"):
            print(f"{case['name']:32} not run / failed {case.get('skipped', '')}")
            continue
        print(f"{s['name']:32} {s['s_per_it']:7.2f} {s['samples_per_s_per_gpu']:9.3f} {s['data_wait_pct']:6.1f} "
              f"{s['peak_gib']:8.1f} {s.get('mfu_vs_matmul', float('nan')):6.3f} {s['projected_s_per_64_sample_step_8gpu']:8.2f} "
              f"{s.get('forward_s', float('nan')):6.2f} {s.get('backward_s', float('nan')):6.2f} {s.get('step_s', float('nan')):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
