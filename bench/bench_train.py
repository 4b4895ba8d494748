"""Training step benchmark at the seed's real shapes: Qwen2.5-VL-7B (random init) + real-size spatial path.

Two modes, each one run on one machine so every ratio compares like with like.

--mode fwdbwd (default; one GPU, ~5 min on an H200): forward + backward seconds per sample of the
training model WITHOUT the optimizer (the 7B does not fit ZeRO-2 with Adam on one card), bf16 weights
and gradients, on the trainer's own packed batches (9 frames of 640x480 -> 644x644, ~5.3k tokens per
sample, per_device_batch 4), cases `old` (current kernels, full checkpointing, packing in the training
process), `new` (flash-attn-4, selective checkpointing planned for 80 GB cards under ZeRO-2 x 8,
packing in DataLoader workers + prefetched copies), `new_torch` (the same on the current kernels, where
flash-attn-4 runs), `new_card` (the plan for this card, no optimizer)
`stock_hf` (transformers' own Qwen2.5-VL forward + loss, sdpa, padded batch, full checkpointing) and
`new_head` (`new` with the seed's action head: its cost, ratio new_head / new),
plus a bf16 matmul ceiling and the ratios (bench/fwdbwd.py has the details):

    PYTHONPATH=src python3 bench/bench_train.py --out $OUT                    # one H200 (gpu extra installed)
    PYTHONPATH=src python3 bench/bench_train.py --tiny --out /tmp/bt          # CPU smoke test

--mode zero2 (several GPUs): short runs of the real trainer under torchrun (cached vs live VGGT, ZeRO-2
offload vs ZeRO-2 vs ZeRO-3, per-device batch 1 and 4, reduce buckets 2e8 vs 5e8 elements), after
building a VGGT-1B feature cache:

    PYTHONPATH=src python3 bench/bench_train.py --mode zero2 --gpus 4 --steps 11 --out $OUT
    PYTHONPATH=src python3 bench/bench_train.py --mode zero2 --tiny --gpus 1 --steps 3 --out /tmp/bt

Both write $OUT/train_bench.json: a `provenance` block (commit, command, card, versions, repetitions),
the matmul ceiling of this run (all its timed calls), and per case a `summary` whose timings are
spreads over the timed repetitions ({n, median, min, max, samples}: micro-batches in fwdbwd, optimizer
steps after the first in zero2), peak GiB, and FLOPs from vlnflow.flops counted on the batches the case
ran (real tokens, label positions, images): `mfu_vs_peak` (the card's datasheet dense bf16 rate) and
`mfu_vs_matmul` (this run's measured matmul rate), both on model FLOPs; the checkpoint recompute is
reported apart (`tflop_recompute_per_step`). `ratios` compare cases of this run only, and only at the
same per-device batch; each carries its range and the repetitions behind it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from vlnflow.flops import BatchWork, mfu, step_counter
from vlnflow.provenance import provenance
from vlnflow.timing import matmul_tflops, ratio, spread

ROOT = Path(__file__).resolve().parents[1]
CKPT_LINE = re.compile(r"activation checkpointing: (\d+) of (\d+) decoder layers recomputed")

def base_config(work: Path, tiny: bool) -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["dataset"]["root"] = str(work / "data" / "episodes")
    cfg["history"] = {"max_frames": 8, "pad": "repeat_first"}
    # the seed pipeline's samples (issue 25's 7B shape: structured answers, reference frame last, nothing held out),
    # pinned here: config.yaml's demo settings (action answers since issue 24) must not change what is measured
    cfg["dataset"].update({"prompt_style": "descriptions", "val_fraction": 0.0})
    cfg["spatial"]["reference_frame"] = "last"
    cfg["shards"]["count"] = 2
    cfg["cache"]["spot_check"] = 0
    cfg["train"].update(
        {"run": "bench", "samples": str(work / "index" / "samples.parquet"), "cache": str(work / "cache" / "manifest.json"),
         "save_every": 10**6, "save_at_end": False, "resume": False, "phase_timing": True, "eval_every": None, "loader": {"workers": 4 if not tiny else 1, "prefetch_factor": 4}}
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
    # The reference way: frame by frame, batch 1, over one sample's 9 frames (own streaming path).
    from vlnflow.timing import timed_calls

    frames = torch.rand(1, 9, 3, *encoder.geometry.vggt_hw, device=encoder.device)
    ts = timed_calls(lambda enc=encoder: enc.encode_streaming(frames), encoder.device, warmup=1, iters=2 if tiny else 10)
    results["vggt_streaming_batch1_s_per_sample"] = spread(ts)
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
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if r.get("kind") != "val"]
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    plan = CKPT_LINE.search(log)  # the trainer logs its memory plan (vlnflow.train.memory_plan)
    t = case_cfg["train"]
    return {"name": name, "gpus": gpus, "ok": ok and len(rows) == steps, "wall_s": wall, "steps": rows, "log_tail": None if ok else tail,
            "deepspeed": t["deepspeed"], "per_device_batch": t["per_device_batch"], "grad_accum": t["grad_accum"], "live": live,
            "zero_bucket_elements": t.get("zero_bucket_elements"), "memory_budget_gib": t.get("memory_budget_gib"),
            "checkpointed_layers": int(plan.group(1)) if plan else None, "layers": int(plan.group(2)) if plan else None,
            "plan": log[plan.start() : log.find("\n", plan.start())] if plan else None}  # fmt: skip


def summarize(case: dict, count, matmul: float | None, card: str | None) -> dict:
    """A zero2 case: spreads over the optimizer steps after the first (which carries compilation, allocator and
    cpu_adam warm-up); FLOPs per step from the step's own token, label and image counts."""
    rows = case["steps"][1:] or case["steps"]
    if not rows:
        return {"name": case["name"], "ok": False}
    samples = case["per_device_batch"] * case["grad_accum"] * case["gpus"]
    s_it = spread([r["s_per_it"] for r in rows])
    per_gpu = spread([samples / r["s_per_it"] / case["gpus"] for r in rows])
    out = {
        "name": case["name"], "ok": case["ok"], "gpus": case["gpus"], "deepspeed": case["deepspeed"], "live": case["live"],
        "per_device_batch": case["per_device_batch"], "grad_accum": case["grad_accum"], "samples_per_step": samples,
        "s_per_it": s_it, "samples_per_s_per_gpu": per_gpu,
        "data_wait_pct": 100 * sum(r["data_wait_s"] for r in rows) / sum(r["s_per_it"] for r in rows),
        "peak_gib": max((max(r["gpu_mem_gib"]) if r["gpu_mem_gib"] else 0.0) for r in rows),
        "checkpointed_layers": case.get("checkpointed_layers"),
        "loss_last": rows[-1]["loss"],
    }
    out["fits_80gb_card"] = out["peak_gib"] <= 79.6  # GiB an 80 GB H100 / H800 exposes (peak reported by rank 0)
    for phase in ("forward_s", "backward_s", "step_s"):
        if phase in rows[-1]:
            out[phase] = spread([r[phase] for r in rows])
    if all("label_tokens" in r for r in rows):  # metrics written since issue 27 carry the counts FLOPs need
        works = [BatchWork(samples, r["tokens"], r["seq_tokens_sq"], r["label_tokens"], (count.image_grid,) * r["images"]) for r in rows]
        flop = [count(w, recomputed_layers=case.get("checkpointed_layers") or 0) for w in works]
        out["tokens_per_sample"] = sum(w.tokens for w in works) / (samples * len(works))
        out["label_tokens_per_sample"] = sum(w.labels for w in works) / (samples * len(works))
        out["tflop_model_per_step"] = statistics.median(f["model"] for f in flop) / 1e12
        out["tflop_recompute_per_step"] = statistics.median(f["recompute"] for f in flop) / 1e12
        rates = [mfu(f["model"], r["s_per_it"], gpus=case["gpus"], matmul_tflops=matmul, device_name=card) for f, r in zip(flop, rows)]
        for key in ("tflops_per_s_per_gpu", "mfu_vs_peak", "mfu_vs_matmul"):
            if rates[0][key] is not None:
                out[key] = spread([x[key] for x in rates])
    # The seed's step: 64 samples on 8 GPUs, at this case's per-GPU rate (a projection, not a measurement).
    out["projected_s_per_64_sample_step_8gpu"] = 64 / (per_gpu["median"] * 8)
    return out


def add_ratios(results: dict, pairs, key: str, what: str) -> None:
    """results["ratios"]: key(a) / key(b) for case pairs of this run, refused where the per-device batch differs."""
    by = {c["name"]: c["summary"] for c in results.get("cases", []) if c.get("summary", {}).get("ok")}
    for a, b in pairs:
        if a not in by or b not in by:
            continue
        try:
            r = ratio(by[a][key], by[b][key], what=f"{a} / {b}: {what}",
                      batch=(by[a]["per_device_batch"], by[b]["per_device_batch"]))  # fmt: skip
        except ValueError as exc:
            r = {"what": f"{a} / {b}: {what}", "skipped": str(exc)}
        results.setdefault("ratios", []).append(r)


def _fmt(s: dict | float | None, f: str = ".3f") -> str:
    """A spread as 'median (min-max)', a number as itself, None as '-'."""
    if s is None:
        return "-"
    if isinstance(s, dict):
        return f"{s['median']:{f}} ({s['min']:{f}}-{s['max']:{f}})"
    return format(s, f)


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
    repetitions: dict = {}
    results: dict = {"provenance": provenance(repetitions, device=device), "mode": "fwdbwd"}
    card = results["provenance"]["card"]
    results["matmul_tflops"] = matmul_tflops(device)
    idx = work / "index"
    if not (args.reuse and (idx / "samples.parquet").exists()):
        size = ["--size", "112x84"] if args.tiny else []
        subprocess.run([sys.executable, "-m", "vlnflow.cli", "demo-data", str(work / "data"), "--episodes", "8", "--force", *size], check=True)
        idx.mkdir(parents=True, exist_ok=True)
        build_index(IndexSettings.from_config(cfg), str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))
    samples = pd.read_parquet(idx / "samples.parquet")
    log = lambda msg: print(f"[bench_train {time.perf_counter() - started:5.0f}s] {msg}", flush=True)  # noqa: E731
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    modes = [m for m in args.preprocess.split(",") if m]
    other = None if args.cases_other == "all" else set(args.cases_other.split(","))
    rows, checks = [], []
    for i, mode in enumerate(modes):  # the first frame preparation runs every case, the others `--cases-other`
        cfg["spatial"]["preprocess"] = mode
        got = run_cases(cfg, samples, device, per_device=args.per_device_batch, warmup=args.warmup, steps=args.steps,
                        workers=1 if args.tiny else args.workers, wanted=wanted if i == 0 else other, log=log,
                        deadline=started + args.budget_s)
        for row in got:
            if i:
                row["name"] = f"{row['name']}@{mode}"
            (checks if row["name"].startswith("check") else rows).append(row)
    matmul = (results["matmul_tflops"] or {}).get("median")
    for row in rows:
        row["summary"] = summarize_fwdbwd(row, matmul, card)
        if row.get("ok"):
            repetitions[row["name"]] = row["steps"]
        results.setdefault("cases", []).append(row)
    results["checks"] = checks
    by_name = {r["name"]: r["summary"] for r in rows if r["summary"].get("ok")}
    for row in rows:  # each case's vision tower share: the tower-alone row of its frames and compile setting
        suffix = "@" + row["name"].split("@")[1] if "@" in row["name"] else ""
        vision = by_name.get(("vision_compiled" if row.get("compiled_vision") else "vision_eager") + suffix)
        if row["summary"].get("ok") and vision and not row.get("vision_cache"):
            row["summary"]["vision_s_per_sample"] = vision["s_per_sample"]["median"]
    pairs = [("old", "new"), ("prev", "new"), ("old", "new_card"), ("new_torch", "new"), ("stock_hf", "new"), ("stock_hf", "old"),
             ("vision_eager", "vision_compiled"), ("new_head", "new"), ("new", "new_vision_cache")]
    pairs += [(f"{case}@{mode}", case) for mode in modes[1:] for case in ("old", "prev", "new", "vision_eager", "vision_compiled", "llm_only")]
    add_ratios(results, pairs, "s_per_sample", "s/sample, same card and run")
    results["wall_s"] = time.perf_counter() - started
    (out / "train_bench.json").write_text(json.dumps(results, indent=2))
    p = results["provenance"]
    print(f"\n{card}  torch {p['versions']['torch']}  commit {(p['commit'] or 'unknown')[:10]}{' (dirty)' if p['dirty'] else ''}  "
          f"matmul {_fmt(results['matmul_tflops'], '.1f')} TFLOP/s  wall {results['wall_s']:.0f} s")
    print(f"{'case':20} {'kernel':13} {'ckpt':>6} {'s/sample (min-max)':>22} {'fwd s':>7} {'bwd s':>7} {'rest s (min-max)':>21} "
          f"{'vs peak':>7} {'vs mm':>6} {'peakGiB':>8} {'model GiB':>9} {'tok/smp':>8} {'lab/smp':>7}")
    for row in rows:
        s = row["summary"]
        if not row.get("ok"):
            print(f"{row['name']:20} FAILED {row.get('error', '')[:120]}")
            continue
        print(f"{row['name']:20} {row['kernel']:13} {row['checkpointed_layers']:>3}/{row['layers']:<2} {_fmt(s['s_per_sample']):>22} "
              f"{s['forward_s']['median']:7.3f} {s['backward_s']['median']:7.3f} {_fmt(s['rest_s']):>21} "
              f"{_fmt(s.get('mfu_vs_peak')):>7} {_fmt(s.get('mfu_vs_matmul')):>6} {s.get('peak_gib', float('nan')):8.1f} "
              f"{row.get('memory_model_gib', float('nan')):9.1f} {s['tokens_per_sample']:8.0f} {s['label_tokens_per_sample']:7.1f}")
    for row in rows:
        if row.get("plan"):
            print(f"plan {row['name']}: {row['plan']}")
        if row.get("note"):
            print(f"note {row['name']}: {row['note']}")
        if row.get("bytes_per_sample_read"):
            print(f"read {row['name']}: {row['bytes_per_sample_read'] / 1e6:.1f} MB of vision rows per sample")
    for r in results.get("ratios", []):
        print(f"ratio {r['what']}: " + (f"not computed ({r['skipped']})" if "skipped" in r else
                                        f"{r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f}, n={r['n']})"))
    for c in checks:
        print(f"{c['name']}: " + (f"loss {c['loss']}, grad rms rel {c['grad_rms_rel']}" if "loss" in c else "") +
              (f", vs float32 {c['vs_float32']}" if "vs_float32" in c else "") +
              (f"together {c['together']}, alone {c['alone']}, rows identical {c['rows_identical']}" if "together" in c else "") +
              f" {'ok' if c.get('ok') else c.get('error')}")
    return 0 if all(r.get("ok") for r in rows + checks) else 1


def summarize_fwdbwd(row: dict, matmul: float | None, card: str | None) -> dict:
    """Spreads over the timed micro-batches: s/sample (the step's time over its samples), forward, backward and
    rest (each step's own step - forward - backward); MFU on the model FLOPs of the batches that ran."""
    if not row.get("ok"):
        return {"name": row["name"], "ok": False}
    per_sample = [t / n for t, n in zip(row["step_s"], row["step_samples"])]
    n_samples = row["samples"]
    out = {
        "name": row["name"], "ok": True, "gpus": 1, "per_device_batch": row["per_device_batch"], "grad_accum": 1,
        "s_per_sample": spread(per_sample), "samples_per_s_per_gpu": spread([1 / t for t in per_sample]),
        "step_s": spread(row["step_s"]), "forward_s": spread(row["forward_s"]), "backward_s": spread(row["backward_s"]),
        "rest_s": spread(row["rest_s"]), "optimizer_s": 0.0,  # no optimizer in this mode
        "preprocess": row.get("preprocess"), "tokens_per_frame": row.get("tokens_per_frame"),
        "recomputed_layers": row["checkpointed_layers"], "memory_budget_gib": 79.6 if row["name"].split("@")[0] in
        ("prev", "new", "new_torch", "llm_only", "new_vision_cache") else None, "compiled_vision": row.get("compiled_vision"),
        "fused_kernels": row.get("fused_kernels"),
        "tokens_per_sample": row["tokens"] / n_samples, "label_tokens_per_sample": row["labels"] / n_samples,
        "tflop_model_per_sample": row["flop"]["model"] / n_samples / 1e12,
        "tflop_recompute_per_sample": row["flop"]["recompute"] / n_samples / 1e12, "loss_last": row["loss_last"],
    }
    if row.get("vision_cache"):  # the per-frame vision cache: the tower's blocks do not run, the rows are read
        out["vision_s_per_sample"] = 0.0
        out["bytes_per_sample_read"] = row["bytes_per_sample_read"]
    if "peak_gib" in row:
        out["peak_gib"] = row["peak_gib"]
        out["fits_80gb_card"] = row["peak_gib"] <= 79.6
    rates = [mfu(f, t, matmul_tflops=matmul, device_name=card) for f, t in zip(row["flop_per_step"], row["step_s"])]
    for key in ("tflops_per_s_per_gpu", "mfu_vs_peak", "mfu_vs_matmul"):
        if rates and rates[0][key] is not None:
            out[key] = spread([r[key] for r in rates])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fwdbwd", "zero2"], default="fwdbwd")
    parser.add_argument("--per-device-batch", type=int, default=4, help="fwdbwd: samples packed per micro-batch")
    parser.add_argument("--warmup", type=int, default=2, help="fwdbwd: untimed micro-batches per case (kernel JIT, allocator)")
    parser.add_argument("--workers", type=int, default=6, help="fwdbwd: DataLoader workers")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None,
                        help="fwdbwd: timed micro-batches per case (default 10); zero2: optimizer steps per case, the first "
                             "untimed (default 6: 5 timed, published with their range)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test of this script)")
    parser.add_argument("--cases", default="all", help="comma list of case names, or 'all'")
    parser.add_argument("--preprocess", default="crop,pad", help="fwdbwd: frame preparations (spatial.preprocess); the "
                        "first runs --cases, the others --cases-other, in this run (rows named case@mode)")
    parser.add_argument("--cases-other", default="old,new,vision_compiled,llm_only", help="fwdbwd: cases for the other preprocess modes")
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
    if args.steps is None:
        args.steps = 10 if args.mode == "fwdbwd" else 6
    if args.mode == "fwdbwd":
        return fwdbwd_main(args, out, work)
    cfg = base_config(work, args.tiny)
    if args.tiny:
        cfg["cluster"]["backend"] = "gloo"
    import torch

    repetitions: dict = {}
    results: dict = {"provenance": provenance(repetitions), "mode": "zero2", "cases": []}
    card = results["provenance"]["card"]
    results["matmul_tflops"] = matmul_tflops("cuda" if torch.cuda.is_available() else None)
    matmul = (results["matmul_tflops"] or {}).get("median")
    count = step_counter(cfg)
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
        case["summary"] = summarize(case, count, matmul, card) if case["steps"] else {"name": name, "ok": False}
        repetitions[name] = max(len(case["steps"]) - 1, 0)
        results["cases"].append(case)
        (out / "train_bench.json").write_text(json.dumps(results, indent=2))
        print(f"[bench_train] {name}: ok={case['ok']} wall {case['wall_s']:.0f}s", flush=True)
        if not case["ok"]:
            print(case["log_tail"], flush=True)
    (out / "train_bench.json").write_text(json.dumps(results, indent=2))
    g = args.gpus
    add_ratios(results, ((f"live_zero2_g{g}", f"cached_zero2_g{g}"), (f"cached_zero3_g{g}", f"cached_zero2_g{g}"),
                         (f"cached_zero2_offload_g{g}", f"cached_zero2_g{g}"),
                         (f"cached_zero2_b4_bucket5e8_g{g}", f"cached_zero2_b4_g{g}")), "s_per_it", "s/it, same run")  # fmt: skip
    results["cache_break_even"] = break_even_of_run(results, g)
    (out / "train_bench.json").write_text(json.dumps(results, indent=2))
    p = results["provenance"]
    print(f"\n{card}  commit {(p['commit'] or 'unknown')[:10]}{' (dirty)' if p['dirty'] else ''}  matmul "
          f"{_fmt(results['matmul_tflops'], '.1f')} TFLOP/s  precompute {results.get('precompute_total')}  "
          f"VGGT streaming b1 {_fmt(results.get('vggt_streaming_batch1_s_per_sample'))} s/sample")
    print(f"{'case':30} {'s/it (min-max)':>20} {'smp/s/GPU':>9} {'wait%':>6} {'peakGiB':>8} {'ckpt':>5} {'vs peak':>7} {'vs mm':>6} "
          f"{'64/8GPU':>8} {'fwd':>6} {'bwd':>6} {'opt':>6}")
    med = lambda s, k: s[k]["median"] if isinstance(s.get(k), dict) else float("nan")  # noqa: E731
    for case in results["cases"]:
        s = case.get("summary") or {}
        if not s.get("s_per_it"):
            print(f"{case['name']:30} not run / failed {case.get('skipped', '')}")
            continue
        print(f"{s['name']:30} {_fmt(s['s_per_it'], '.2f'):>20} {s['samples_per_s_per_gpu']['median']:9.3f} {s['data_wait_pct']:6.1f} "
              f"{s['peak_gib']:8.1f} {str(s.get('checkpointed_layers')):>5} {med(s, 'mfu_vs_peak'):7.3f} {med(s, 'mfu_vs_matmul'):6.3f} "
              f"{s['projected_s_per_64_sample_step_8gpu']:8.2f} {med(s, 'forward_s'):6.2f} {med(s, 'backward_s'):6.2f} {med(s, 'step_s'):6.2f}")
    for r in results.get("ratios", []):
        print(f"ratio {r['what']}: " + (f"not computed ({r['skipped']})" if "skipped" in r else
                                        f"{r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f}, n={r['n']})"))
    if results["cache_break_even"]:
        be = results["cache_break_even"]
        print(f"cache break-even (this run): {be['epochs']:.2f} epochs, range {be['range'][0]:.2f}-{be['range'][1]:.2f}")
    return 0


def break_even_of_run(results: dict, g: int) -> dict | None:
    """The cache's break-even from THIS run: its precompute (last, compiled shard) and its cached / live ZeRO-2 pair,
    with the range the pair's step spreads allow (vlnflow.cache.decision)."""
    from vlnflow.cache.decision import Decision, Rate

    by = {c["name"]: c["summary"] for c in results["cases"] if c.get("summary", {}).get("ok")}
    cached, live = by.get(f"cached_zero2_g{g}"), by.get(f"live_zero2_g{g}")
    shards = results.get("precompute") or []
    if not (cached and live and shards and shards[-1].get("wall_s")):
        return None
    pre = shards[-1]["computed"] / shards[-1]["wall_s"]
    rate = lambda s: Rate(s["samples_per_s_per_gpu"]["median"], "", "run", s["samples_per_s_per_gpu"]["min"], s["samples_per_s_per_gpu"]["max"])  # noqa: E731
    d = Decision(1, 1, 1, 1, {"precompute": Rate(pre, "", "run"), "cached": rate(cached), "live": rate(live)})
    return {"epochs": d.break_even_epochs, "range": list(d.break_even_range), "precompute_samples_per_s": pre,
            "cached": f"cached_zero2_g{g}", "live": f"live_zero2_g{g}"}


if __name__ == "__main__":
    sys.exit(main())
