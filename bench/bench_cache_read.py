"""Random-access read speed of the feature cache through FeatureStore, as training reads it.

Writes shard files of real-size features (46x46 grid x 2048 channels, bf16 = 8.67 MB per sample)
with the real ShardWriter, merges a manifest, then reads samples in a random order from a DataLoader
with 0, 1, 2 and 4 workers. Reports samples/s and MB/s, cold (page cache dropped, when allowed) and
warm, median of --repeats passes.

    python bench/bench_cache_read.py --dir /tmp/cache_read --samples 256 --shards 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

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


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def build(root: Path, samples: int, shards: int, grid: int, channels: int, compression: str | None) -> Path:
    files = []
    gen = torch.Generator().manual_seed(0)
    per = samples // shards
    for s in range(shards):
        ids = [f"ep{s:03d}/{i:05d}" for i in range(per)]
        w = ShardWriter(root / f"shard_{s:05d}.h5", root / ".partial" / f"shard_{s:05d}.h5", ids, grid=(grid, grid),
                        channels=channels, dtype="bfloat16", compression=compression, encoder_fingerprint="bench",
                        shard_fingerprint=f"s{s}", layer=-2)
        for start in range(0, per, 8):
            rows = list(range(start, min(per, start + 8)))
            w.write(rows, torch.randn(len(rows), grid * grid, channels, generator=gen).to(torch.bfloat16))
        files.append(w.finalize())
    merge_manifest(files, root / "manifest.json", root / "manifest.parquet")
    return root / "manifest.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/vlnflow_cache_read")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--grid", type=int, default=46)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--compression", default=None)
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = build(root, args.samples, args.shards, args.grid, args.channels, args.compression)
    write_s = time.perf_counter() - t0
    store = FeatureStore(manifest)
    ids = sorted(store._index)
    bytes_per = args.grid * args.grid * args.channels * 2
    results = {"samples": len(ids), "bytes_per_sample": bytes_per, "write_s": write_s,
               "disk_bytes": sum(p.stat().st_size for p in root.glob("*.h5")), "rows": []}
    for workers in [int(w) for w in args.workers.split(",")]:
        for mode in ("cold", "warm"):
            times = []
            for rep in range(args.repeats):
                order = ids[:]
                random.Random(rep).shuffle(order)
                dropped = drop_page_cache() if mode == "cold" else None
                if mode == "cold" and not dropped:
                    break
                loader = DataLoader(Reads(FeatureStore(manifest), order), batch_size=None, num_workers=workers,
                                    prefetch_factor=4 if workers else None)
                s = time.perf_counter()
                n = sum(1 for _ in loader)
                times.append(time.perf_counter() - s)
                assert n == len(order)
            if not times:
                results["rows"].append({"workers": workers, "mode": mode, "note": "page cache could not be dropped"})
                continue
            t = statistics.median(times)
            results["rows"].append({"workers": workers, "mode": mode, "samples_per_s": len(ids) / t,
                                    "MB_per_s": len(ids) * bytes_per / t / 1e6, "median_s": t})
    print(f"{len(ids)} samples of {bytes_per / 1e6:.2f} MB in {args.shards} shards; written in {write_s:.1f} s")
    print(f"{'workers':>7} {'mode':>5} {'samples/s':>10} {'MB/s':>8}")
    for r in results["rows"]:
        if "samples_per_s" in r:
            print(f"{r['workers']:>7} {r['mode']:>5} {r['samples_per_s']:10.1f} {r['MB_per_s']:8.0f}")
        else:
            print(f"{r['workers']:>7} {r['mode']:>5} {r['note']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cache_read.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
