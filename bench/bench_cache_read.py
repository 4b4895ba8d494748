"""Random-access read speed of the feature cache through FeatureStore, as training ranks read it.

Writes shard files of real-size features (46x46 grid x 2048 channels: bf16 = 8.67 MB, float8_e4m3 =
4.34 MB per sample) with the real ShardWriter and merges a manifest per storage dtype. Then R reader
processes (the ranks of a node) each run a DataLoader with W workers over a disjoint random 1/R of the
samples (as DistributedSampler splits an epoch), all started together; aggregate samples/s and MB/s =
all samples read / (last rank done - first rank started). "cold": the files' pages are evicted first
(posix_fadvise DONTNEED, or drop_caches as root), so every read hits the disk; "warm": page cache kept.
Reads include what FeatureStore does per sample (HDF5 chunk, fletcher32, fp8 dequantisation to bf16).
Last, what a node must deliver: GPUs per node x samples/s per GPU x bytes per sample.

Lead's run on the GPU machine's local disk (8 ranks x 4 workers, both dtypes; ~10 GB written there):
    PYTHONPATH=src python3 bench/bench_cache_read.py --dir /tmp/cache_read --samples 1024 --shards 8 \
        --readers 1,8 --workers 4 --dtypes bfloat16,float8_e4m3 --gpus-per-node 8 --samples-per-s-per-gpu 1.5 --out $OUT
Small version (the 2-core VM):
    python bench/bench_cache_read.py --samples 128 --shards 4 --readers 1,2 --workers 0,2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vlnflow.cache import format as fmt
from vlnflow.cache.manifest import merge_manifest
from vlnflow.cache.store import FeatureStore
from vlnflow.cache.writer import ShardWriter


class Reads(Dataset):
    def __init__(self, store: FeatureStore, ids: list[str]):
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        return self.store.get(self.ids[i]).numel()


def evict(files: list[Path]) -> str:
    """Drop the files' pages from the page cache: drop_caches as root, else posix_fadvise per file."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    if not hasattr(os, "posix_fadvise"):
        return ""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def build(root: Path, samples: int, shards: int, grid: int, channels: int, dtype: str, compression: str | None) -> Path:
    files = []
    gen = torch.Generator().manual_seed(0)
    per = samples // shards
    for s in range(shards):
        ids = [f"ep{s:03d}/{i:05d}" for i in range(per)]
        w = ShardWriter(root / f"shard_{s:05d}.h5", root / ".partial" / f"shard_{s:05d}.h5", ids, grid=(grid, grid),
                        channels=channels, dtype=dtype, compression=compression, encoder_fingerprint="bench",
                        shard_fingerprint=f"s{s}", layer=-2)  # fmt: skip
        for start in range(0, per, 8):
            rows = list(range(start, min(per, start + 8)))
            feats = torch.randn(len(rows), grid * grid, channels, generator=gen) * torch.rand(len(rows), grid * grid, 1, generator=gen)
            w.write(rows, feats.to(torch.bfloat16))
        files.append(w.finalize())
    merge_manifest(files, root / "manifest.json", root / "manifest.parquet")
    return root / "manifest.json"


def _rank(manifest: str, ids: list[str], workers: int, barrier, results) -> None:
    torch.set_num_threads(1)
    # fork workers, as the trainer's DataLoader gets on Linux: a spawned rank would otherwise spawn its
    # workers too (the child inherits the start method), each re-importing torch inside the timed pass
    loader = DataLoader(Reads(FeatureStore(manifest), ids), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, multiprocessing_context="fork" if workers else None)  # fmt: skip
    barrier.wait()
    start = time.time()
    n = sum(1 for _ in loader)
    results.put((start, time.time(), n))


def read_pass(manifest: Path, ids: list[str], readers: int, workers: int, seed: int) -> dict:
    """R processes read disjoint random parts of `ids` at once; returns aggregate and per-rank rates."""
    order = ids[:]
    random.Random(seed).shuffle(order)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(readers), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(str(manifest), order[r::readers], workers, barrier, results)) for r in range(readers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"reader exited with {p.exitcode}")
    n = sum(g[2] for g in got)
    assert n == len(ids), (n, len(ids))
    wall = max(g[1] for g in got) - min(g[0] for g in got)
    return {"wall_s": wall, "samples": n, "per_rank_samples_per_s": [g[2] / (g[1] - g[0]) for g in got]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/vlnflow_cache_read")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--grid", type=int, default=46)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--compression", default=None)
    parser.add_argument("--dtypes", default="bfloat16,float8_e4m3")
    parser.add_argument("--readers", default="1,8", help="reader processes at once (ranks of a node)")
    parser.add_argument("--workers", default="4", help="DataLoader workers per reader")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--samples-per-s-per-gpu", type=float, default=1.5, help="what one GPU's training step consumes")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    need_samples = args.gpus_per_node * args.samples_per_s_per_gpu
    from vlnflow.provenance import provenance
    from vlnflow.timing import spread

    results = {"provenance": provenance({"passes per row": args.repeats}), "machine": {"host": platform.node(), "cpus": os.cpu_count()},
               "samples": args.samples, "shards": args.shards,
               "need": {"gpus_per_node": args.gpus_per_node, "samples_per_s_per_gpu": args.samples_per_s_per_gpu,
                        "samples_per_s_per_node": need_samples}, "dtypes": {}, "rows": []}  # fmt: skip
    for dtype in args.dtypes.split(","):
        root = Path(args.dir) / dtype
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        manifest = build(root, args.samples, args.shards, args.grid, args.channels, dtype, args.compression)
        files = sorted(root.glob("*.h5"))
        per = fmt.bytes_per_sample(args.grid * args.grid, args.channels, dtype)
        ids = sorted(FeatureStore(manifest)._index)
        results["dtypes"][dtype] = {"bytes_per_sample": per, "write_s": time.perf_counter() - t0,
                                    "disk_bytes": sum(p.stat().st_size for p in files),
                                    "need_MB_per_s_per_node": need_samples * per / 1e6}  # fmt: skip
        for readers in ints(args.readers):
            for workers in ints(args.workers):
                for mode in ("cold", "warm"):
                    passes, how = [], ""
                    for rep in range(args.repeats):
                        how = evict(files) if mode == "cold" else "kept"
                        if not how:
                            break
                        passes.append(read_pass(manifest, ids, readers, workers, seed=rep))
                    if not passes:
                        results["rows"].append({"dtype": dtype, "readers": readers, "workers": workers, "mode": mode, "note": "cannot evict"})
                        continue
                    best = sorted(passes, key=lambda p: p["wall_s"])[len(passes) // 2]  # the median pass
                    sps = best["samples"] / best["wall_s"]
                    row = {"dtype": dtype, "readers": readers, "workers": workers, "mode": mode, "evicted_by": how,
                           "samples_per_s": sps, "MB_per_s": sps * per / 1e6, "headroom_vs_need": sps / need_samples,
                           "per_rank_samples_per_s_median": statistics.median(best["per_rank_samples_per_s"]),
                           "passes_wall_s": [p["wall_s"] for p in passes],
                           "passes_samples_per_s": spread([p["samples"] / p["wall_s"] for p in passes])}  # fmt: skip
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cache_read.json").write_text(json.dumps(results, indent=2))
    print(f"\n{args.samples} samples in {args.shards} shards per dtype on {platform.node()} ({os.cpu_count()} CPUs); "
          f"need {need_samples:g} samples/s per node ({args.gpus_per_node} GPUs x {args.samples_per_s_per_gpu:g})")  # fmt: skip
    for dtype, d in results["dtypes"].items():
        print(f"  {dtype}: {d['bytes_per_sample']:,} B/sample -> the node must read {d['need_MB_per_s_per_node']:.0f} MB/s")
    print(f"{'dtype':>12} {'readers':>7} {'workers':>7} {'mode':>5} {'samples/s':>10} {'MB/s':>8} {'x need':>7}")
    for r in results["rows"]:
        head = f"{r['dtype']:>12} {r['readers']:>7} {r['workers']:>7} {r['mode']:>5}"
        if "samples_per_s" in r:
            print(f"{head} {r['samples_per_s']:10.1f} {r['MB_per_s']:8.0f} {r['headroom_vs_need']:7.1f}")
        else:
            print(f"{head} {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
