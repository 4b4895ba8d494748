"""Precompute at real scale (issue 21): a real-length shard through `snakemake precompute_all` against the encoder alone,
crop and pad, cold and warm compile cache, and the validation's GPU time, in one run on one card.

For each case (a `spatial.preprocess`, crop first):
1. a workflow copy whose config has the real settings (VGGT-1B shape with random weights read from a
   safetensors file as a real checkpoint would be, 644 px, 640x480 frames, up to 9 frames, spatial.batch_size
   16, the default compile cache under the copy's results/), over episodes with R2R-CE's lengths (10..120
   steps) rendered as textured 640x480 PNGs (~500 KB, decoding like real frames). shards.count is 2 and the
   episode ids are chosen so that shard_00000 holds one short episode and shard_00001 the real-length shard;
2. `snakemake results/shards/shards.json -j 1` (index, shards), then `snakemake results/cache/shard_00000.h5 -j 1`:
   the COLD job, first on this host, compiling into the empty cache; then `snakemake precompute_all -j 1`: the
   WARM real-length job (shard_00001), the CPU checks per shard and the one live spot-check job;
3. in this process, `encode_indexed` alone on the real-length job's own batches (every `--encoder-every`-th
   batch, frames already on the GPU, each new shape class run once untimed first, synchronised per batch),
   with the job's HDF5 rows compared bit for bit.
The summary per case holds the issue's fields: loop_vs_encoder (steady-state batch loop / encoder alone),
job_vs_encoder (whole warm job incl. set-up / encoder alone), recompiles_after_warmup, setup_warm_s,
setup_cold_s, validate_gpu_share (the one spot-check job's GPU time projected to R2R-CE's 256 shards, over
the projected precompute GPU time) and r2r_gpu_hours (612,492 samples at the measured whole-job rate).

The run is sized to finish in `--budget-s` (default 480 s, one H100/H200, 16 cores, data generation
included): the first case gets `--samples`; a later case gets as many samples as the time left allows (at
the first case's measured cost per sample, scaled by token count), never fewer than `--min-samples`. The
results JSON is rewritten after every case, so a run cut short keeps the finished cases.

GPU (one command; snakemake + deps importable, e.g. carried wheels on PYTHONPATH):
    PYTHONPATH=src:$SITE python3 bench/bench_precompute.py --out $OUT/precompute_<card>.json
CPU smoke test (tiny model, small shards, compile off; what tests/test_bench_precompute.py runs):
    PYTHONPATH=src .venv/bin/python bench/bench_precompute.py --quick --out /tmp/precompute_quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "rules", "workflow_scripts", "envs")
GPU_LINE = re.compile(r"(GPU slot \d+ of \d+ claimed: CUDA_VISIBLE_DEVICES=\S+|GPU pinned by the scheduler: \S+|CPU job: no GPU slot claimed|no GPU visible[^\n]*)")
R2R_SAMPLES, R2R_SHARDS, TODAY_GPU_HOURS = 612_492, 256, 26.6  # docs/benchmarks.md "Feature cache"
COLD_SHARD, REAL_SHARD = "shard_00000", "shard_00001"
GOALS = {"loop_vs_encoder": 0.90, "job_vs_encoder": 0.85, "recompiles_after_warmup": 0, "setup_warm_s": 15.0, "validate_gpu_share": 0.05}
QUICK = {"preset": "tiny", "image_size": 56, "size": "96x72", "samples": 40, "min_samples": 20, "batch_size": 4,
         "compile": "off", "device": "cpu", "spot_check": 2, "texture": 2.0, "encoder_every": 2, "budget_s": 900}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results JSON (default: $OUT/precompute_<card>.json, else ./)")
    ap.add_argument("--work", default=None, help="folder for data, weights and workflow copies (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards (a temp folder is removed otherwise)")
    ap.add_argument("--cases", default="crop,pad", help="spatial.preprocess cases, in order (the first gets --samples)")
    ap.add_argument("--samples", type=int, default=2000, help="samples of the real-length shard (R2R-CE: ~2,392 per shard)")
    ap.add_argument("--min-samples", type=int, default=200, help="fewest samples a later case is cut to by the budget")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole run should take (sizes later cases)")
    ap.add_argument("--size", default="640x480", help="frame size WxH")
    ap.add_argument("--texture", type=float, default=4.0, help="frame noise (grey levels): 4 ~ a real frame's PNG size")
    ap.add_argument("--preset", default="vggt-1b", choices=["tiny", "vggt-1b"])
    ap.add_argument("--image-size", type=int, default=644)
    ap.add_argument("--batch-size", type=int, default=16, help="spatial.batch_size")
    ap.add_argument("--shapes", default="dynamic", choices=["dynamic", "bucketed"], help="spatial.compile_shapes")
    ap.add_argument("--frame-bucket", type=int, default=8, help="spatial.frame_bucket (bucketed)")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="spatial.compile")
    ap.add_argument("--loader-workers", default="auto", help="cache.loader_workers of the jobs")
    ap.add_argument("--spot-check", type=int, default=16, help="cache.spot_check here (more samples: a steadier per-sample time)")
    ap.add_argument("--r2r-config", default=str(REPO / "configs" / "janusvln_r2r_h800.yaml"),
                    help="config whose cache.spot_check the R2R-CE validation projection uses")
    ap.add_argument("--encoder-every", type=int, default=5, help="time encode_indexed alone on every N-th batch of the job")
    ap.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="processes rendering the frames")
    ap.add_argument("--quick", action="store_true", help="CPU smoke mode: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(**QUICK)  # quick's values are defaults: options given explicitly still win
    args = ap.parse_args(argv)
    args.cases = [c for c in str(args.cases).split(",") if c]
    if not args.cases or any(c not in ("crop", "pad") for c in args.cases):
        ap.error(f"--cases must list crop and/or pad, got {args.cases}")
    if args.samples < 10 or args.min_samples < 10 or args.batch_size < 1 or args.encoder_every < 1 or args.spot_check < 0:
        ap.error("--samples and --min-samples >= 10, --batch-size and --encoder-every >= 1, --spot-check >= 0")
    if args.image_size % 14:
        ap.error("--image-size must be a multiple of 14")
    try:
        args.size = tuple(int(v) for v in str(args.size).lower().split("x"))
        assert len(args.size) == 2
    except (ValueError, AssertionError):
        ap.error(f"--size must be WxH, got {args.size!r}")
    if args.loader_workers != "auto":
        args.loader_workers = int(args.loader_workers)
    return args


# ----------------------------------------------------------------------------------------------- data
def episode_plan(samples: int, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(cold episodes, real-length episodes) as (id, length): one 10-step episode in shard_00000 (frame counts 1..9),
    R2R-like episodes summing to >= `samples` in shard_00001 (ids picked by their stable shard of 2)."""
    import numpy as np

    from vlnflow.data.demo import episode_lengths
    from vlnflow.data.shards import shard_index

    lengths = episode_lengths(max(4, samples // 20), np.random.default_rng(seed), "r2r")
    real: list[tuple[str, int]] = []
    cold: list[tuple[str, int]] = []
    number = 0
    while sum(n for _, n in real) < samples or not cold:
        episode_id = f"r2r{number:05d}"
        number += 1
        if shard_index(episode_id, 2) == 0:
            if not cold:
                cold.append((episode_id, 10))
            continue
        if sum(n for _, n in real) < samples:
            real.append((episode_id, lengths[len(real) % len(lengths)]))
    return cold, real


def make_data(args, work: Path, cold, real) -> dict:
    """Render every episode once (textured 640x480 PNGs) into work/data/episodes."""
    from vlnflow.data.demo import make_demo

    episodes = cold + real
    t0 = time.perf_counter()
    summary = make_demo(str(work / "data"), size=args.size, seed=0, lengths=[n for _, n in episodes],
                        episode_ids=[e for e, _ in episodes], texture=args.texture, workers=args.workers)  # fmt: skip
    summary["seconds"] = time.perf_counter() - t0
    print(f"data: {len(episodes)} episodes, {summary['samples']} samples, {summary['bytes'] / 1e9:.2f} GB of "
          f"{args.size[0]}x{args.size[1]} PNG in {summary['seconds']:.0f} s", flush=True)  # fmt: skip
    return summary


def case_root(work: Path, case: str, cold, real, samples: int) -> tuple[Path, int]:
    """A data root for one case: links to the cold episode and to the first real-length episodes holding >= `samples`."""
    root = work / f"data_{case}"
    root.mkdir()
    chosen, total = [], 0
    for episode_id, n in real:
        if total >= samples:
            break
        chosen.append(episode_id)
        total += n
    for episode_id in [cold[0][0], *chosen]:
        (root / episode_id).symlink_to(work / "data" / "episodes" / episode_id, target_is_directory=True)
    return root, total


def card_slug(card: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', 'cpu' -> 'cpu': for result file names."""
    for word in card.lower().replace("-", " ").split():
        if word[:1] in "habl" and word[1:2].isdigit():
            return word
    return "cpu" if card == "cpu" else "".join(c for c in card.lower() if c.isalnum())[:16]


def write_weights(args, work: Path) -> tuple[Path, float]:
    """Random aggregator weights (float32, as VGGT-1B's checkpoint) saved as safetensors; digest remembered."""
    from safetensors.torch import save_file

    from vlnflow.spatial.aggregator import PRESETS
    from vlnflow.spatial.fingerprint import weights_digest
    from vlnflow.spatial.init import build_aggregator, init_random_

    t0 = time.perf_counter()
    path = work / "weights" / "model.safetensors"
    path.parent.mkdir(parents=True)
    model = init_random_(build_aggregator(PRESETS[args.preset]), seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    del model
    weights_digest(path)  # the parse-time fingerprint and the jobs then find it in the digest cache
    return path, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- workflow
def overrides(args, root: Path, weights: Path, case: str) -> dict:
    """The workflow copy's config for one case."""
    return {
        "dataset": {"root": str(root)},
        "history": {"max_frames": 8},
        "shards": {"count": 2},
        "spatial": {"preset": args.preset, "weights": str(weights), "image_size": args.image_size, "preprocess": case,
                    "frame_size": list(args.size), "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
                    "compile": args.compile, "compile_shapes": args.shapes, "frame_bucket": args.frame_bucket},
        "cache": {"loader_workers": args.loader_workers, "spot_check": args.spot_check, "compile_cache": "results/compile_cache"},
    }  # fmt: skip


def make_workflow(work: Path, case: str, config_overrides: dict) -> tuple[Path, dict]:
    import yaml

    from vlnflow.config import deep_merge, load_config

    wf = work / f"workflow_{case}"
    wf.mkdir()
    for name in WORKFLOW_FILES:
        src = REPO / name
        (shutil.copytree(src, wf / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy2(src, wf / name))
    config = deep_merge(yaml.safe_load((wf / "config.yaml").read_text()), config_overrides)
    (wf / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return wf, load_config(wf / "config.yaml")


def snakemake(wf: Path, target: str) -> dict:
    """`snakemake TARGET -j 1` in the copy (a subprocess, as a user runs it), this repository's src importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "snakemake", target, "-j", "1"]
    print(f"running: snakemake {target} -j 1 (in {wf.name})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=wf, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise RuntimeError(f"snakemake {target} failed ({proc.returncode}); logs under {wf}/results/logs")
    return {"command": f"snakemake {target} -j 1", "wall_s": wall}


def job_stats(wf: Path, shard: str) -> dict:
    stats = json.loads((wf / "results" / "benchmark" / "precompute" / f"{shard}.stats.json").read_text())
    m = GPU_LINE.search((wf / "results" / "logs" / "precompute" / f"{shard}.log").read_text())
    stats["log_gpu_line"] = m.group(1) if m else None
    return stats


# --------------------------------------------------------------------------------------- encoder alone
def encoder_alone(wf: Path, config: dict, every: int) -> dict:
    """encode_indexed on every `every`-th batch of the real-length job (make_batches over its shard, padded by the
    encoder's shape policy like the job's), frames pre-loaded on the device, each new shape class run once untimed,
    synchronised per batch; the job's stored rows must equal these features bit for bit."""
    import h5py
    import numpy as np
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader, Subset

    from vlnflow.cache import format as fmt
    from vlnflow.cache.loader_workers import loader_workers
    from vlnflow.cache.precompute import ShardFrames, make_batches
    from vlnflow.flops import vggt_indexed
    from vlnflow.spatial import SpatialEncoder, compile_cache
    from vlnflow.timing import spread

    compile_cache.activate(wf / config["cache"]["compile_cache"])  # the host's cache the jobs filled: warm
    t0 = time.perf_counter()
    encoder = SpatialEncoder.from_config(config["spatial"])
    weights_s = time.perf_counter() - t0
    dev = encoder.device
    if dev.type == "cpu":
        torch.set_num_threads(1)  # as the job: Snakemake runs a one-thread job (OMP_NUM_THREADS=1) beside its loader workers
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    table = pd.read_parquet(wf / "results" / "shards" / f"{REAL_SHARD}.parquet")
    frames = [list(f) for f in table.frames]
    batches = make_batches(list(range(len(frames))), [len(f) for f in frames], config["spatial"]["batch_size"])
    policy = encoder.shapes if encoder.shapes.pads(encoder.compile_blocks) else None  # as the job pads
    data = ShardFrames(Path(config["dataset"]["root"]), table.sample_id.tolist(), frames, batches, encoder.geometry, policy)
    picked = list(range(0, len(batches), every))
    workers = loader_workers(config["cache"]["loader_workers"])
    loader = DataLoader(Subset(data, picked), batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    seen, seconds, samples, mismatched, max_diff, warmup_s, flop = set(), [], 0, 0, 0.0, 0.0, 0.0
    arch, patch = encoder.model.config, encoder.model.config.patch_size
    h5 = h5py.File(wf / "results" / "cache" / f"{REAL_SHARD}.h5", "r")
    with torch.inference_mode():
        for batch in loader:
            images, index, n = batch.images.to(dev), batch.frame_index.to(dev), len(batch.rows)
            sync()
            if batch.key not in seen:  # warm-up: compile (from the warm cache) outside the timing
                seen.add(batch.key)
                t = time.perf_counter()
                encoder.encode_indexed(images, index)
                sync()
                warmup_s += time.perf_counter() - t
            t = time.perf_counter()
            feats = encoder.encode_indexed(images, index)[:n]
            sync()
            seconds.append(time.perf_counter() - t)
            samples += n
            grid = (images.shape[-2] // patch, images.shape[-1] // patch)  # as executed: padded rows and images count
            flop += vggt_indexed(arch, grid, index.shape[1], encoder.layer, samples=index.shape[0], unique_images=images.shape[0])
            ours = fmt.to_storage(feats.cpu(), config["cache"]["dtype"])  # untimed: the job wrote exactly these rows?
            stored = np.stack([h5[fmt.FEATURES][r] for r in batch.rows])
            if not np.array_equal(ours, stored):
                mismatched += 1
                diff = fmt.from_storage(ours, config["cache"]["dtype"]).float() - fmt.from_storage(stored, config["cache"]["dtype"]).float()
                max_diff = max(max_diff, float(diff.abs().max()))
    h5.close()
    total = sum(seconds)
    result = {"batches_timed": len(picked), "batches_in_shard": len(batches), "every": every, "samples": samples,
              "seconds": total, "batch_s": spread(seconds) if seconds else None, "tflop_executed": flop / 1e12,
              "samples_per_s": samples / total if total else 0.0,
              "ms_per_sample": 1000 * total / samples if samples else 0.0, "weights_s": weights_s, "warmup_s": warmup_s,
              "shape_classes": len(seen), "identical_to_job": mismatched == 0, "mismatched_batches": mismatched,
              "max_abs_diff": max_diff, "device": str(dev),
              "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}  # fmt: skip
    del encoder
    torch._dynamo.reset()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------------------------- summary
def r2r_spot_check(path: str) -> int:
    import yaml

    try:
        return int(yaml.safe_load(Path(path).read_text())["cache"]["spot_check"])
    except (OSError, KeyError, TypeError, ValueError):
        return 2  # the schema default


def summarise(case: str, cold: dict, warm: dict, spot: dict, alone: dict, k_r2r: int) -> dict:
    """The issue's summary fields for one case, plus what they were computed from."""
    ref = alone["samples_per_s"]
    loop = warm["steady_samples_per_s"]
    job = warm["computed"] / warm["job_wall_s"] if warm["job_wall_s"] else 0.0
    precompute_gpu_s = R2R_SAMPLES / job if job else math.inf
    timing = spot["timing"]
    per_sample = timing["steady_s_per_sample"] if timing["steady_s_per_sample"] is not None else timing["compute_s"] / max(1, spot["samples_checked"])
    validate_gpu_s = timing["setup_s"] + R2R_SHARDS * k_r2r * per_sample
    shard_samples = R2R_SAMPLES / R2R_SHARDS
    return {
        "card": warm.get("gpu_name") or warm.get("device"),
        "preprocess": case,
        "samples": warm["computed"],
        "loop_vs_encoder": loop / ref if ref else None,
        "job_vs_encoder": job / ref if ref else None,
        "recompiles_after_warmup": cold["recompiles_after_warmup"] + warm["recompiles_after_warmup"],
        "setup_warm_s": warm["setup_s"],
        "setup_cold_s": cold["setup_s"],
        "validate_gpu_share": validate_gpu_s / precompute_gpu_s,
        "r2r_gpu_hours": precompute_gpu_s / 3600,
        # what the fields come from
        "encoder_samples_per_s": ref,
        "loop_samples_per_s": loop,
        "job_samples_per_s": job,
        "cache_warm": {"cold_job": cold["compile"]["cache_warm"], "warm_job": warm["compile"]["cache_warm"]},
        "r2r_gpu_hours_today": TODAY_GPU_HOURS,
        "r2r_gpu_hours_shard_model": R2R_SHARDS * (warm["setup_s"] + shard_samples / loop) / 3600 if loop else None,
        "validate_projection": {"shards": R2R_SHARDS, "spot_check": k_r2r, "setup_s": timing["setup_s"], "s_per_sample": per_sample,
                                "gpu_s": validate_gpu_s, "old_design_gpu_s": R2R_SHARDS * (timing["setup_s"] + k_r2r * per_sample)},
        "identical_to_encoder": alone["identical_to_job"],
    }  # fmt: skip


def goals(summary: dict) -> dict:
    s = summary
    return {
        "loop_vs_encoder >= 0.90": (s["loop_vs_encoder"] or 0) >= GOALS["loop_vs_encoder"],
        "job_vs_encoder >= 0.85": (s["job_vs_encoder"] or 0) >= GOALS["job_vs_encoder"],
        "recompiles_after_warmup == 0": s["recompiles_after_warmup"] == 0,
        "setup_warm_s <= 15": s["setup_warm_s"] <= GOALS["setup_warm_s"],
        "validate_gpu_share <= 0.05": s["validate_gpu_share"] <= GOALS["validate_gpu_share"],
    }


def tokens(preset: str, image_size: int, size, case: str) -> int:
    from vlnflow.spatial.geometry import FrameGeometry

    h, w = FrameGeometry(case, image_size, tuple(size)).vggt_hw
    return (h // 14) * (w // 14)


def next_samples(args, done: list[dict], case: str, left_s: float) -> int:
    """Samples for the next case that fit in the time left: the last case's fixed cost plus its per-sample cost
    (job loop + encoder-alone share) scaled by (tokens ratio)^1.2."""
    if not done:
        return args.samples
    last = done[-1]
    per_sample = last["cost"]["per_sample_s"] * (tokens(args.preset, args.image_size, args.size, case) / last["cost"]["tokens"]) ** 1.2
    fit = int((left_s - last["cost"]["fixed_s"]) / per_sample) if per_sample > 0 else args.samples
    return max(args.min_samples, min(args.samples, fit))


def rates(alone: dict, matmul: dict | None, card: str) -> dict:
    """Executed TFLOP/s of the encoder alone over its timed batches, against the datasheet peak and this run's matmul."""
    from vlnflow.flops import mfu

    if not alone["seconds"]:
        return {}
    return mfu(alone["tflop_executed"] * 1e12, alone["seconds"], matmul_tflops=(matmul or {}).get("median"), device_name=card)


def run_case(args, work: Path, case: str, cold_eps, real_eps, weights: Path, samples: int, k_r2r: int,
             matmul: dict | None = None, card: str = "cpu") -> dict:
    t_case = time.perf_counter()
    root, planned = case_root(work, case, cold_eps, real_eps, samples)
    wf, config = make_workflow(work, case, overrides(args, root, weights, case))
    runs = [snakemake(wf, "results/shards/shards.json"), snakemake(wf, f"results/cache/{COLD_SHARD}.h5"), snakemake(wf, "precompute_all")]
    cold, warm = job_stats(wf, COLD_SHARD), job_stats(wf, REAL_SHARD)
    spot = json.loads((wf / "results" / "cache" / "validation" / "spot_check.json").read_text())
    validation = json.loads((wf / "results" / "cache" / "validation.json").read_text())
    t_alone = time.perf_counter()
    alone = encoder_alone(wf, config, args.encoder_every)
    alone_s = time.perf_counter() - t_alone
    alone.update(rates(alone, matmul, card))
    summary = summarise(case, cold, warm, spot, alone, k_r2r)
    total = time.perf_counter() - t_case
    per_sample = (warm["loop_s"] + alone_s) / max(1, warm["computed"])  # the parts that grow with the shard
    result = {
        "summary": summary, "goals": goals(summary), "planned_samples": planned,
        "snakemake": runs, "cold_job": cold, "warm_job": warm, "spot_check": spot, "validation_ok": validation["ok"],
        "encoder_alone": alone, "config": overrides(args, root, weights, case), "seconds": total,
        "cost": {"fixed_s": total - warm["loop_s"] - alone_s, "per_sample_s": per_sample,
                 "tokens": tokens(args.preset, args.image_size, args.size, case)},
    }  # fmt: skip
    print_case(result)
    return result


def print_case(result: dict) -> None:
    s, g = result["summary"], result["goals"]
    w, a = result["warm_job"], result["encoder_alone"]
    print(f"\n== {s['preprocess']} on {s['card']}: {s['samples']} samples in the real-length job")
    print(f"encoder alone: {a['samples_per_s']:.3f} samples/s ({a['ms_per_sample']:.1f} ms/sample, {a['batches_timed']} of "
          f"{a['batches_in_shard']} batches); job rows {'bit-identical' if a['identical_to_job'] else 'DIFFERENT'}")
    print(f"warm job: steady loop {s['loop_samples_per_s']:.3f} samples/s = {s['loop_vs_encoder']:.2f} x encoder; whole job "
          f"{s['job_samples_per_s']:.3f} = {s['job_vs_encoder']:.2f} x; set-up {s['setup_warm_s']:.1f} s {w['setup_split_s']} weights {w.get('weights_split_s')}")
    print(f"cold job: set-up {s['setup_cold_s']:.1f} s {result['cold_job']['setup_split_s']}; cache warm: {s['cache_warm']}")
    print(f"recompiles after warm-up: {s['recompiles_after_warmup']}; validate GPU share (R2R-CE projection): "
          f"{100 * s['validate_gpu_share']:.2f} %; R2R-CE precompute: {s['r2r_gpu_hours']:.1f} GPU-hours (today {TODAY_GPU_HOURS})")
    print("goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in g.items()), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from vlnflow.provenance import provenance
    from vlnflow.timing import matmul_tflops

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    if args.work and work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLNFLOW_CACHE_DIR", str(work / "vlnflow_cache"))  # weights digests: jobs find the bench's
    report = {"bench": "precompute", "provenance": None,
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in ("out", "work")},
              "cases": {}, "phases_s": {}, "budget_s": args.budget_s}  # fmt: skip
    try:
        cold_eps, real_eps = episode_plan(args.samples)
        report["data"] = make_data(args, work, cold_eps, real_eps)  # forks renderers: before this process touches CUDA
        device = "cuda" if args.device != "cpu" else "cpu"
        report["provenance"] = provenance({"encoder_alone": f"every {args.encoder_every}th batch of each real-length shard, one pass"},
                                          argv=sys.argv if argv is None else ["bench/bench_precompute.py", *argv], device=device)  # fmt: skip
        card = report["provenance"]["card"]
        report["matmul_tflops"] = matmul = matmul_tflops(device)
        out = Path(args.out or Path(os.environ.get("OUT", ".")) / f"precompute_{card_slug(card)}.json")
        report["phases_s"]["data"] = report["data"]["seconds"]
        weights, report["phases_s"]["weights_file"] = write_weights(args, work)
        k_r2r = r2r_spot_check(args.r2r_config)
        done: list[dict] = []
        for case in args.cases:
            left = args.budget_s - (time.perf_counter() - started)
            samples = next_samples(args, done, case, left)
            print(f"\n== case {case}: {samples} samples (budget left {left:.0f} s)", flush=True)
            try:
                result = run_case(args, work, case, cold_eps, real_eps, weights, samples, k_r2r, matmul, card)
            except Exception as exc:  # a failed case must not lose the others
                report["cases"][case] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"case {case} failed: {exc}", file=sys.stderr, flush=True)
            else:
                done.append(result)
                report["cases"][case] = result
            report["phases_s"][case] = time.perf_counter() - started - sum(report["phases_s"].values())
            report["summary"] = [c["summary"] for c in report["cases"].values() if "summary" in c]
            report["total_s"] = time.perf_counter() - started
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\ntotal {report['total_s']:.0f} s (budget {args.budget_s:.0f} s); wrote {out}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if report["cases"] and all("summary" in c for c in report["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
