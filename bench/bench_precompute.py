"""A precompute job end to end through Snakemake vs the encoder alone, same run, same GPU, same batches.

Builds a demo data set (real 640x480 frames), a workflow copy whose config has real-size settings
(VGGT-1B shape with random weights, 644 px, 9 frames, spatial.batch_size 16), runs
`snakemake precompute_all -j 1` as a user would (a subprocess, not a function call), then in this
process times `encode_indexed` alone on exactly the job's batches (frames already on the GPU, warm-up
pass first, synchronised per batch). Prints job samples/s (whole job, and its batch loop without model
set-up) against the encoder alone, the ratio (issue 11's goal: loop >= 90 % of the encoder), the
job's time split, the GPU its log names, and whether the job's HDF5 rows are bit-identical to the
encoder's output for the same batches (a stream or copy bug would show here); writes all to --out as JSON
with a provenance block (vlnflow.provenance). The encoder-alone batches are timed one by one (spread kept)
and counted with vlnflow.flops as encode_indexed executes them (DINOv2 once per unique frame): TFLOP/s,
mfu_vs_peak (datasheet dense bf16) and mfu_vs_matmul (the bf16 matmul measured in this run).

GPU (one H200; snakemake and its deps importable, e.g. from carried wheels on PYTHONPATH):
    PYTHONPATH=src:$PYTHONPATH python3 bench/bench_precompute.py --out $OUT/bench_precompute.json
CPU smoke test (seconds of compute, a minute of Snakemake start-up):
    PYTHONPATH=src .venv/bin/python bench/bench_precompute.py --tiny --device cpu --out /tmp/bench_precompute.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "config.yaml", "rules", "workflow_scripts", "envs")
TINY = {"preset": "tiny", "image_size": 56, "episodes": 3, "size": "96x72", "batch_size": 4, "loader_workers": 1}
GPU_LINE = re.compile(r"(GPU slot \d+ of \d+ claimed: CUDA_VISIBLE_DEVICES=\S+|GPU pinned by the scheduler: \S+|CPU job: no GPU slot claimed|no GPU visible[^\n]*)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON report (default: $OUT/bench_precompute.json, else ./bench_precompute.json)")
    ap.add_argument("--work", default=None, help="folder for the demo data and workflow copy (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards (a temp folder is removed otherwise)")
    ap.add_argument("--episodes", type=int, default=24, help="demo episodes (3..40 steps each; 24 -> about 520 samples)")
    ap.add_argument("--size", default="640x480", help="frame size WxH of the demo data")
    ap.add_argument("--shards", type=int, default=2,
                    help="shards = precompute jobs, one at a time (-j 1); the first fills torch.compile's on-disk cache, "
                         "as the first of a real run's 256 jobs does, so the last job is the steady-state figure")
    ap.add_argument("--preset", default="vggt-1b", choices=["tiny", "vggt-1b"])
    ap.add_argument("--image-size", type=int, default=644)
    ap.add_argument("--history", type=int, default=8, help="history.max_frames: samples have up to H+1 frames")
    ap.add_argument("--batch-size", type=int, default=16, help="spatial.batch_size")
    ap.add_argument("--loader-workers", type=int, default=8, help="cache.loader_workers of the job")
    ap.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="spatial.dtype")
    ap.add_argument("--warmup-passes", type=int, default=1,
                    help="untimed encoder-alone passes over all batches first (compiles every batch shape)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    args = ap.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.episodes < 2 or args.shards < 1 or args.batch_size < 1 or args.loader_workers < 0:
        ap.error("--episodes >= 2, --shards >= 1, --batch-size >= 1, --loader-workers >= 0")
    if args.image_size % 14:
        ap.error("--image-size must be a multiple of 14")
    try:
        args.size = tuple(int(v) for v in str(args.size).lower().split("x"))
        assert len(args.size) == 2
    except (ValueError, AssertionError):
        ap.error(f"--size must be WxH, got {args.size!r}")
    if args.out is None:
        args.out = str(Path(os.environ.get("OUT", ".")) / "bench_precompute.json")
    return args


def overrides(args, root: str) -> dict:
    """The workflow copy's config: the demo data, real-size encoder settings, one spot check per shard."""
    return {
        "dataset": {"root": root},
        "history": {"max_frames": args.history},
        "shards": {"count": args.shards},
        "spatial": {"preset": args.preset, "weights": None, "image_size": args.image_size, "batch_size": args.batch_size,
                    "device": args.device, "dtype": args.dtype},  # fmt: skip
        "cache": {"loader_workers": args.loader_workers, "spot_check": 1},
    }


def make_workflow(args, work: Path) -> tuple[Path, dict]:
    """Demo data + workflow copy with the bench config under `work`; returns (workflow dir, config)."""
    import yaml

    from vlnflow.config import deep_merge, load_config
    from vlnflow.data.demo import make_demo

    wf = work / "workflow"
    wf.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, wf / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, wf / name)
    summary = make_demo(str(wf / "data" / "demo"), n_episodes=args.episodes, size=args.size, seed=0)
    print(f"demo data: {summary['episodes']} episodes, {summary['samples']} samples, {args.size[0]}x{args.size[1]} frames", flush=True)
    config = deep_merge(yaml.safe_load((wf / "config.yaml").read_text()), overrides(args, "data/demo/episodes"))
    (wf / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return wf, load_config(wf / "config.yaml")


def run_snakemake(wf: Path) -> dict:
    """`snakemake precompute_all -j 1` in the copy, with this repository's src importable by the jobs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "snakemake", "precompute_all", "-j", "1"]
    print("running:", " ".join(cmd), f"(in {wf})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=wf, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise SystemExit(f"snakemake failed ({proc.returncode}); logs under {wf}/results/logs")
    return {"command": "snakemake precompute_all -j 1", "wall_s": wall}


def job_results(wf: Path) -> list[dict]:
    """Each precompute job's stats JSON plus the GPU line of its log."""
    jobs = []
    for stats_path in sorted((wf / "results" / "benchmark" / "precompute").glob("*.stats.json")):
        stats = json.loads(stats_path.read_text())
        log = (wf / "results" / "logs" / "precompute" / f"{stats['shard']}.log").read_text()
        m = GPU_LINE.search(log)
        stats["log_gpu_line"] = m.group(1) if m else None
        jobs.append(stats)
    return jobs


def encoder_alone(wf: Path, config: dict, warmup_passes: int) -> dict:
    """encode_indexed on the same batches the jobs ran (make_batches over each shard), frames pre-loaded
    on the device; seconds are synchronised per batch, after `warmup_passes` untimed passes."""
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader

    import h5py
    import numpy as np

    from vlnflow.cache import format as fmt
    from vlnflow.cache.precompute import ShardFrames, make_batches
    from vlnflow.spatial import SpatialEncoder

    t0 = time.perf_counter()
    encoder = SpatialEncoder.from_config(config["spatial"])
    if encoder.device.type == "cpu":
        torch.set_num_threads(1)  # as the job: Snakemake runs a one-thread job with OMP_NUM_THREADS=1
    setup_s = time.perf_counter() - t0
    dev = encoder.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = []
    for shard in sorted((wf / "results" / "shards").glob("shard_*.parquet")):
        table = pd.read_parquet(shard)
        frames = [list(f) for f in table.frames]
        groups = make_batches(list(range(len(frames))), [len(f) for f in frames], config["spatial"]["batch_size"])
        data = ShardFrames(wf / config["dataset"]["root"], table.sample_id.tolist(), frames, groups, encoder.geometry)
        workers = config["cache"]["loader_workers"]
        h5 = wf / "results" / "cache" / f"{shard.stem}.h5"
        for b in DataLoader(data, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None):
            batches.append((b.images.to(dev), b.frame_index.to(dev), len(b.rows), h5, b.rows))
    sync()
    with torch.inference_mode():
        for images, index, *_ in batches * warmup_passes:
            encoder.encode_indexed(images, index)
        sync()
        seconds, mismatched, max_diff = [], 0, 0.0
        from vlnflow.flops import vggt_indexed

        cfg_a, patch = encoder.model.config, encoder.model.config.patch_size
        flop = sum(vggt_indexed(cfg_a, (images.shape[-2] // patch, images.shape[-1] // patch), index.shape[1], encoder.layer,
                                samples=index.shape[0], unique_images=images.shape[0]) for images, index, *_ in batches)  # fmt: skip
        for images, index, _, h5, rows in batches:
            t = time.perf_counter()
            feats = encoder.encode_indexed(images, index)
            sync()
            seconds.append(time.perf_counter() - t)
            # untimed: the job's rows must hold exactly these features (the pipeline reorders nothing)
            ours = fmt.to_storage(feats.cpu(), config["cache"]["dtype"])
            with h5py.File(h5) as f:
                stored = np.stack([f[fmt.FEATURES][r] for r in rows])
            if not np.array_equal(ours, stored):
                mismatched += 1
                diff = fmt.from_storage(ours, config["cache"]["dtype"]).float() - fmt.from_storage(stored, config["cache"]["dtype"]).float()
                max_diff = max(max_diff, float(diff.abs().max()))
    from vlnflow.timing import spread

    samples = sum(b[2] for b in batches)
    total = sum(seconds)
    return {"samples": samples, "batches": len(batches), "seconds": total, "setup_s": setup_s, "batch_s": spread(seconds) if seconds else None,
            "tflop_executed": flop / 1e12,
            "identical_to_job": mismatched == 0, "mismatched_batches": mismatched, "max_abs_diff": max_diff,
            "samples_per_s": samples / total if total > 0 else 0.0, "ms_per_sample": 1000 * total / samples if samples else 0.0,
            "device": str(dev), "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}  # fmt: skip


def rates(alone: dict, matmul: dict | None, card: str) -> dict:
    """Executed TFLOP/s of the encoder alone over its batches, against the datasheet peak and this run's matmul."""
    from vlnflow.flops import mfu

    if not alone["seconds"]:
        return {}
    return mfu(alone["tflop_executed"] * 1e12, alone["seconds"], matmul_tflops=(matmul or {}).get("median"), device_name=card)


def summarise(jobs: list[dict], alone: dict) -> dict:
    """Job rates (summed over jobs, and the last job alone) and their ratio to the encoder-alone rate."""
    computed = sum(j["computed"] for j in jobs)
    wall = sum(j["wall_s"] for j in jobs)
    loop = sum(j.get("loop_s", j["wall_s"]) for j in jobs)
    job_rate, loop_rate = computed / wall if wall else 0.0, computed / loop if loop else 0.0
    split = {k: sum((j.get("time_split_s") or {}).get(k, 0.0) for j in jobs) for k in ("data_wait", "compute", "write_wait", "device_busy", "writer_hdf5")}
    ref = alone["samples_per_s"]
    last = jobs[-1]
    last_loop = last["computed"] / last["loop_s"] if last.get("loop_s") else 0.0
    return {"last_job": last["shard"], "last_job_loop_samples_per_s": last_loop,
            "ratio_last_job_loop": last_loop / ref if ref else None,"computed": computed, "job_wall_s": wall, "job_loop_s": loop, "job_setup_s": sum(j.get("setup_s", 0.0) for j in jobs),
            "job_samples_per_s": job_rate, "job_loop_samples_per_s": loop_rate, "encoder_samples_per_s": ref,
            "ratio_job_wall": job_rate / ref if ref else None, "ratio_job_loop": loop_rate / ref if ref else None,
            "time_split_s": split}  # fmt: skip


def print_table(report: dict) -> None:
    s = report["summary"]
    ref = s["encoder_samples_per_s"]
    rows = [("encoder alone (encode_indexed, same batches)", f"{ref:.3f}", "1.00", f"{report['encoder_alone']['ms_per_sample']:.1f} ms/sample")]
    for j in report["jobs"]:
        loop = j["computed"] / j["loop_s"] if j.get("loop_s") else 0.0
        rows.append((f"job {j['shard']}, batch loop", f"{loop:.3f}", f"{loop / ref:.2f}" if ref else "",
                     f"{j['computed']} samples in {j.get('loop_s', 0):.1f} s"))
    rows += [
        ("all jobs, batch loops", f"{s['job_loop_samples_per_s']:.3f}", f"{s['ratio_job_loop']:.2f}", f"{s['job_loop_s']:.1f} s"),
        ("all jobs, whole jobs", f"{s['job_samples_per_s']:.3f}", f"{s['ratio_job_wall']:.2f}", f"{s['job_wall_s']:.1f} s incl. {s['job_setup_s']:.1f} s set-up"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'what':<{width}}  samples/s  vs encoder  notes")
    for name, rate, ratio, note in rows:
        print(f"{name:<{width}}  {rate:>9}  {ratio:>10}  {note}")
    t = s["time_split_s"]
    busy = t["device_busy"] / s["job_loop_s"] if s["job_loop_s"] else 0.0
    print(f"job loop {s['job_loop_s']:.1f} s: device busy {t['device_busy']:.1f} s ({100 * busy:.0f} %); main thread: data wait "
          f"{t['data_wait']:.1f} s, compute/launch {t['compute']:.1f} s, write wait {t['write_wait']:.1f} s; "
          f"writer thread HDF5 {t['writer_hdf5']:.1f} s (overlapped)")
    for j in report["jobs"]:
        print(f"{j['shard']}: {j['computed']} samples, log: {j['log_gpu_line']}; torch device {j.get('device')} = {j.get('gpu_name')}")
    ok = (s["ratio_last_job_loop"] or 0) >= 0.9
    a = report["encoder_alone"]
    print(f"job's cached features vs the encoder alone: {'bit-identical' if a['identical_to_job'] else 'DIFFERENT'} "
          f"({a['mismatched_batches']} of {a['batches']} batches differ, max abs diff {a['max_abs_diff']:.3g})")
    print(f"goal (issue 11): last job's batch loop >= 0.90 x encoder alone: {s['ratio_last_job_loop']:.2f} -> {'met' if ok else 'NOT met'}")
    if a.get("tflops_per_s_per_gpu") is not None:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"encoder alone executes {a['tflop_executed'] / a['samples']:.2f} TFLOP per sample (DINOv2 once per unique frame): "
              f"{a['tflops_per_s_per_gpu']:.1f} TFLOP/s, mfu_vs_peak {fmt(a.get('mfu_vs_peak'))}, mfu_vs_matmul {fmt(a.get('mfu_vs_matmul'))}")
    p = report["provenance"]
    print(f"commit {(p['commit'] or 'unknown')[:10]}{' (dirty)' if p['dirty'] else ''} ({p['commit_source']}), {p['card']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    if args.work and work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty")
    from vlnflow.provenance import provenance
    from vlnflow.timing import matmul_tflops

    try:
        wf, config = make_workflow(args, work)
        snake = run_snakemake(wf)
        jobs = job_results(wf)
        alone = encoder_alone(wf, config, args.warmup_passes)
        device = "cuda" if alone["device"].startswith("cuda") else None
        prov = provenance({"jobs": len(jobs), "encoder_alone_batches": alone["batches"]},
                          argv=sys.argv if argv is None else ["bench/bench_precompute.py", *argv], device=device)  # fmt: skip
        matmul = matmul_tflops(device)
        report = {
            "bench": "precompute", "provenance": prov, "host": platform.node(),
            "config": overrides(args, "data/demo/episodes"), "matmul_tflops": matmul,
            "snakemake": snake, "jobs": jobs, "encoder_alone": {**alone, **rates(alone, matmul, prov["card"])},
            "summary": summarise(jobs, alone),
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print_table(report)
        print(f"wrote {args.out}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
