"""`vlnflow cache ...`: look at the feature cache from the shell."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlnflow.cache.estimate import estimate
from vlnflow.config import load_config
from vlnflow.errors import UserError


def add_parser(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="feature cache: estimate its size before building it")
    sub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND", required=True)
    est = sub.add_parser(
        "estimate",
        help="bytes, file count and GPU-hours for the configured data set",
        description="Print what `snakemake precompute_all` will write, before anything runs.",
    )
    est.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    est.add_argument("--samples", type=int, help="number of samples (default: rows of results/index/samples.parquet)")
    est.add_argument("--index", default="results/index/samples.parquet", help="index to count samples from")
    est.add_argument("--samples-per-s", type=float, help="measured encoder throughput per GPU (bench/bench_spatial.py)")
    est.set_defaults(func=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    samples = args.samples
    if samples is None:
        index = Path(args.index)
        if not index.exists():
            raise UserError(f"no --samples given and {index} does not exist (run `snakemake results/index/samples.parquet`)")
        import pyarrow.parquet as pq

        samples = pq.ParquetFile(index).metadata.num_rows
    from vlnflow.spatial.fingerprint import spatial_output

    grid, channels = spatial_output(config["spatial"])
    est = estimate(samples, grid, channels, config["cache"]["dtype"], config["shards"]["count"], args.samples_per_s)
    print("\n".join(est.lines()))
    return 0
