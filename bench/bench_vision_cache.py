"""The per-frame vision cache's build: one precompute_vision_shard job per shard at the real shape, then its validation.

Builds a demo data set (real 640x480 frames), indexes and shards it, and runs vlnflow.cache.vision_precompute on
each shard with Qwen2.5-VL-7B's vision tower (random weights, `model.preset qwen2.5-vl-7b`, built as training
builds it: compiled blocks on CUDA) for each frame preparation (crop, pad). The first shard of a preparation
fills torch.compile's caches, so its last shard is the steady-state figure. Per job: frames/s (whole job and its
batch loop), the time split, bytes per frame and on disk; per preparation: the jobs after the first (frames / job
wall s, setup included, and / loop s), validate_vision_shard on every shard
(structure + `--spot-check` frames recomputed alone, bit-identical count and worst relative error), and the bytes
a training sample reads (its frames x bytes per frame). Writes JSON with a provenance block.

GPU (one card; jsonschema importable):
    PYTHONPATH=src python3 bench/bench_vision_cache.py --out $OUT/bench_vision_cache.json
CPU smoke test:
    PYTHONPATH=src python3 bench/bench_vision_cache.py --tiny --out /tmp/bench_vision_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON report (default: $OUT/bench_vision_cache.json)")
    ap.add_argument("--episodes", type=int, default=16, help="demo episodes (3..40 steps each)")
    ap.add_argument("--shards", type=int, default=2, help="shards = jobs, one after the other (the first compiles)")
    ap.add_argument("--preprocess", default="crop,pad", help="frame preparations, one set of jobs each")
    ap.add_argument("--batch", type=int, default=16, help="cache.vision_batch: frames per tower call")
    ap.add_argument("--workers", type=int, default=8, help="cache.loader_workers")
    ap.add_argument("--dtype", default="bfloat16", help="cache.vision_dtype")
    ap.add_argument("--spot-check", type=int, default=2, help="frames per shard recomputed alone by validation")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny tower, 56 px, 3 episodes of 96x72 frames")
    args = ap.parse_args(argv)
    args.out = args.out or str(Path(os.environ.get("OUT", ".")) / "bench_vision_cache.json")
    return args


def run(args) -> dict:
    import pandas as pd
    import torch

    from vlnflow.cache.vision_fingerprint import vision_fingerprint
    from vlnflow.cache.vision_precompute import precompute_vision_shard
    from vlnflow.cache.vision_validate import validate_vision_shard
    from vlnflow.config import load_config
    from vlnflow.data.demo import make_demo
    from vlnflow.data.index import IndexSettings, build_index
    from vlnflow.data.shards import read_shard_list, write_shards
    from vlnflow.model.loading import resolve_model_config
    from vlnflow.model.vision_rows import build_tower
    from vlnflow.provenance import provenance

    work = Path(tempfile.mkdtemp(prefix="vlnflow_bench_vision_"))
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    try:
        make_demo(str(work / "data"), n_episodes=3 if args.tiny else args.episodes, size=(96, 72) if args.tiny else (640, 480))
        out = {"provenance": provenance({"jobs_per_preprocess": args.shards}, device=torch.device(device)), "cases": []}
        for mode in [m for m in args.preprocess.split(",") if m]:
            over = {"dataset": {"root": str(work / "data" / "episodes")}, "shards": {"count": args.shards},
                    "spatial": {"preprocess": mode, "image_size": 56 if args.tiny else 644, "device": device},
                    "history": {"max_frames": 8, "pad": "repeat_first"},
                    "cache": {"vision": True, "vision_batch": args.batch, "vision_dtype": args.dtype, "spot_check": args.spot_check,
                              "loader_workers": 1 if args.tiny else args.workers},
                    "model": {"preset": "tiny" if args.tiny else "qwen2.5-vl-7b"}}
            config = load_config(REPO / "config.yaml", over)
            idx, shards = work / mode / "index", work / mode / "shards"
            build_index(IndexSettings.from_config(config), str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))
            write_shards(str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(shards), str(shards / "shards.json"), args.shards)
            case = {"name": f"precompute_vision@{mode}", "preprocess": mode, "jobs": [], "validation": []}
            fingerprint = vision_fingerprint(config)
            tower = None  # validation's tower, built once per preparation (each job builds its own, as a real job)
            for shard in read_shard_list(str(shards / "shards.json")):
                h5 = work / mode / "vision" / f"{shard['name']}.h5"
                t0 = time.perf_counter()
                stats = precompute_vision_shard(shards / f"{shard['name']}.parquet", shard["fingerprint"], h5,
                                                work / mode / "vision" / ".partial" / h5.name, config, progress=False)
                stats["call_s"] = time.perf_counter() - t0
                stats["bytes_on_disk"] = h5.stat().st_size
                case["jobs"].append(stats)
                expected = {"encoder_fingerprint": fingerprint, "shard_fingerprint": shard["fingerprint"], "dtype": args.dtype}
                if tower is None:
                    tower = build_tower(resolve_model_config(config), device)
                case["validation"].append(validate_vision_shard(h5, shards / f"{shard['name']}.parquet", expected, config,
                                                                tower=tower, device=device))
                print(f"{case['name']} {shard['name']}: {stats['frames']} frames, {stats['frames_per_s']:.1f} frames/s "
                      f"(loop {stats['loop_frames_per_s']:.1f}), split {stats['time_split_s']}", flush=True)
            samples = pd.read_parquet(idx / "samples.parquet", columns=["frames"])
            steady = case["jobs"][1:] or case["jobs"]  # after the job that compiled
            last = case["jobs"][-1]
            frames, wall = sum(j["computed"] for j in steady), sum(j["wall_s"] for j in steady)
            loop = sum(j["loop_s"] for j in steady)
            checked = [c for v in case["validation"] for c in v.get("spot_check", {}).get("checked", [])]
            case["summary"] = {
                "preprocess": mode, "steady_jobs": len(steady), "frames_per_s_per_gpu": frames / wall if wall else None,
                "loop_frames_per_s_per_gpu": frames / loop if loop else None,
                "bytes_per_frame": last["bytes_per_frame"], "frames_per_sample": float(samples.frames.map(len).mean()),
                "bytes_per_sample_read": float(samples.frames.map(len).mean()) * last["bytes_per_frame"],
                "validation_ok": all(v["ok"] for v in case["validation"]), "spot_checked": len(checked),
                "spot_identical": sum(c["identical"] for c in checked),
                "worst_spot_rel_err": max((c["rel_err"] for c in checked), default=0.0),
            }
            print(f"{case['name']}: {json.dumps(case['summary'])}", flush=True)
            out["cases"].append(case)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(c["summary"]["validation_ok"] for c in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
