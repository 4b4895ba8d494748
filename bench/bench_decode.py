"""Frame decoding per DataLoader worker: 640x480 PNG and JPEG to VGGT tensors (crop and pad), and what it implies
for `cache.loader_workers` at 8 GPU jobs per node (issue 21 item 4).

Frames are demo renderings with per-pixel noise (`--texture`, grey levels), so a PNG weighs and decodes like a
real rendered frame (~500 KB at 4) rather than a flat drawing (~15 KB at 0). For each format, preprocess
and texture, one process with one thread (as a DataLoader worker runs) loads every frame `--repeats` times
with the precompute job's own `load_frame`: file read, decode, bicubic resize, crop or pad, float tensor.
Then a DataLoader with W workers over the same frames gives the aggregate rate (scaling check).

The need per job: the encoder's samples/s (`--encoder-samples-per-s`, measured on a GPU) times the unique
frames per sample of an R2R-CE-like shard (computed here from R2R-like episode lengths, the history rule and
make_batches at `--batch-size`), divided by one worker's frames/s = workers a job needs to keep its GPU fed.

    PYTHONPATH=src .venv/bin/python bench/bench_decode.py --out docs/results/decode_<machine>.json
    PYTHONPATH=src .venv/bin/python bench/bench_decode.py --quick --out /tmp/decode.json   # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# encoder alone on a precompute job's batches, VGGT-1B bf16 B=16 (docs/benchmarks.md): H200 pad 2026-12-02
DEFAULT_ENCODER_RATES = "11.7"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results JSON (default: $OUT/decode.json, else ./decode.json)")
    ap.add_argument("--frames", type=int, default=24, help="distinct frames per case")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the frames per case (the first is also timed)")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--image-size", type=int, default=644)
    ap.add_argument("--formats", default="png,jpeg")
    ap.add_argument("--preprocess", default="crop,pad")
    ap.add_argument("--textures", default="4,0", help="noise levels (grey levels); 4 ~ a real frame's PNG size")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts for the scaling check ('' to skip)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--encoder-samples-per-s", default=DEFAULT_ENCODER_RATES,
                    help="comma list: the GPU encoder rates (samples/s) a job must be fed at")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.repeats, args.size, args.image_size, args.workers, args.textures = 4, 1, "96x72", 56, "1", "4"
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    args.out = args.out or str(Path(os.environ.get("OUT", ".")) / "decode.json")
    return args


def cpu_info() -> dict:
    """The decoding CPU: model name and the cores this process may use."""
    model = "unknown"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def unique_frames_per_sample(batch_size: int, episodes: int = 60, seed: int = 0) -> float:
    """Unique frames per sample over make_batches' batches of an R2R-CE-like shard (history H=8, no padding)."""
    import numpy as np

    from vlnflow.cache.precompute import make_batches
    from vlnflow.data.demo import episode_lengths
    from vlnflow.data.history import history_indices

    frames = [[(e, i) for i in history_indices(j, 8)] for e, n in enumerate(episode_lengths(episodes, np.random.default_rng(seed), "r2r"))
              for j in range(n)]  # fmt: skip
    batches = make_batches(list(range(len(frames))), [len(f) for f in frames], batch_size)
    return sum(len({x for r in b for x in frames[r]}) for b in batches) / len(frames)


def write_frames(folder: Path, n: int, size, texture: float, jpeg_quality: int) -> dict[str, list[Path]]:
    """n demo frames as PNG (compress level 6, as the demo) and JPEG."""
    from vlnflow.data import demo_scene as scene
    from vlnflow.data.demo import textured

    rng = __import__("numpy").random.default_rng(0)
    target, _, poses = scene.plan_episode(rng, n)
    out: dict[str, list[Path]] = {"png": [], "jpeg": []}
    folder.mkdir(parents=True, exist_ok=True)
    for i, pose in enumerate(poses):
        image = textured(scene.render(pose, [target], scene.WALLS[0], size, f"frame {i}"), texture, i)
        png, jpg = folder / f"f{i:04d}.png", folder / f"f{i:04d}.jpg"
        image.save(png, compress_level=6)
        image.save(jpg, quality=jpeg_quality)
        out["png"].append(png)
        out["jpeg"].append(jpg)
    return out


def per_worker(paths: list[Path], geometry, repeats: int) -> dict:
    """One thread, like one DataLoader worker: ms per frame over `repeats` passes (median pass)."""
    from vlnflow.spatial.preprocess import load_frame

    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            load_frame(p, geometry=geometry)
        passes.append((time.perf_counter() - t0) / len(paths))
    ms = 1000 * statistics.median(passes)
    return {"ms_per_frame": ms, "frames_per_s": 1000 / ms, "kb_per_file": sum(p.stat().st_size for p in paths) / len(paths) / 1000}


class _Frames:
    def __init__(self, paths, geometry):
        self.paths, self.geometry = paths, geometry

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from vlnflow.spatial.preprocess import load_frame

        return load_frame(self.paths[i], geometry=self.geometry)


def loader_rate(paths: list[Path], geometry, workers: int, repeats: int) -> float:
    """Frames/s through a DataLoader with `workers` workers (each with one thread, as torch sets them)."""
    from torch.utils.data import DataLoader

    data = _Frames(paths * repeats, geometry)
    loader = DataLoader(data, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # workers started
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from vlnflow.cache.loader_workers import MAX_AUTO, auto_workers
    from vlnflow.provenance import provenance
    from vlnflow.spatial.geometry import FrameGeometry

    torch.set_num_threads(1)
    per_sample = unique_frames_per_sample(args.batch_size)
    rates = [float(r) for r in args.encoder_samples_per_s.split(",") if r]
    argv_full = sys.argv if argv is None else ["bench/bench_decode.py", *argv]
    report = {"bench": "decode", "provenance": {**provenance(args.repeats, argv=argv_full, device="cpu"), **cpu_info()},
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "unique_frames_per_sample": per_sample, "cases": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        for texture in [float(t) for t in args.textures.split(",") if t]:
            files = write_frames(Path(tmp) / f"t{texture:g}", args.frames, args.size, texture, args.jpeg_quality)
            for fmt in args.formats.split(","):
                for mode in args.preprocess.split(","):
                    geometry = FrameGeometry(mode, args.image_size, args.size)
                    case = {"format": fmt, "preprocess": mode, "texture": texture, **per_worker(files[fmt], geometry, args.repeats)}
                    case["loader_frames_per_s"] = {w: loader_rate(files[fmt], geometry, int(w), args.repeats)
                                                   for w in args.workers.split(",") if w}  # fmt: skip
                    case["workers_needed"] = {f"{r:g} samples/s": math.ceil(r * per_sample / case["frames_per_s"]) for r in rates}
                    report["cases"].append(case)
                    print(f"{fmt:4} {mode:4} texture {texture:g}: {case['kb_per_file']:6.0f} KB, {case['ms_per_frame']:5.1f} ms/frame = "
                          f"{case['frames_per_s']:5.1f} frames/s per worker; DataLoader {case['loader_frames_per_s']}; "
                          f"workers needed {case['workers_needed']}", flush=True)  # fmt: skip
    report["auto_workers"] = {f"{c} cores, {j} jobs": auto_workers(c, j) for c, j in ((16, 8), (16, 1), (112, 8), (8, 1))}
    report["max_auto"] = MAX_AUTO
    print(f"unique frames per sample (R2R-like shard, batch {args.batch_size}): {per_sample:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
