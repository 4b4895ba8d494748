"""`vlnflow cache ...`: look at the feature cache from the shell."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlnflow.cache.estimate import estimate
from vlnflow.config import load_config
from vlnflow.errors import UserError


def add_parser(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="feature cache: its size, and whether it pays against training live")
    sub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND", required=True)
    est = sub.add_parser(
        "estimate",
        help="bytes, GPU-hours, epoch times cached vs live, break-even epochs for the configured data set",
        description="Print what `snakemake precompute_all` will write and cost, and when the cache pays against "
        "training with live VGGT (train.cache: null), before anything runs.",
    )
    est.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    est.add_argument("--samples", type=int, help="number of samples (default: rows of results/index/samples.parquet)")
    est.add_argument("--index", default="results/index/samples.parquet", help="index to count samples from")
    est.add_argument("--samples-per-s", type=float, help="precompute rate per GPU to use instead of the measured one")
    est.add_argument("--epochs", type=float, default=1.0, help="epochs you plan per run (default 1)")
    est.add_argument("--runs", type=int, default=1, help="training runs over the same data, e.g. a sweep (default 1)")
    est.add_argument("--gpus", type=int, help="GPUs for training and precompute (default: cluster.nodes x gpus_per_node)")
    est.add_argument("--results", default="results", help="where this workspace's measurements live (default: results)")
    est.add_argument("--docs-rates", action="store_true", help="ignore this workspace's measurements, use the committed docs/results rates")
    est.set_defaults(func=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    from vlnflow.cache.decision import Decision, choose_rates
    from vlnflow.spatial.fingerprint import spatial_output

    config = load_config(args.config)
    samples = args.samples
    if samples is None:
        index = Path(args.index)
        if not index.exists():
            raise UserError(f"no --samples given and {index} does not exist (run `snakemake results/index/samples.parquet`)")
        import pyarrow.parquet as pq

        samples = pq.ParquetFile(index).metadata.num_rows
    for name in ("epochs", "runs", "gpus"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    grid, channels = spatial_output(config["spatial"])
    rates, notes = choose_rates(config, args.results, use_workspace=not args.docs_rates, precompute_override=args.samples_per_s)
    est = estimate(samples, grid, channels, config["cache"]["dtype"], config["shards"]["count"], rates["precompute"].per_gpu)
    gpus = args.gpus or config["cluster"]["nodes"] * config["cluster"]["gpus_per_node"]
    decision = Decision(samples, gpus, args.epochs, args.runs, rates, cache_bytes=est.total_bytes)
    lines = [line for line in est.lines() if not line.startswith("GPU time")] + decision.lines()
    lines += [f"left out           {note}" for note in notes]
    if args.samples is None:
        lines += per_source_lines(Path(args.index), Path(args.results), est.bytes_per_sample, rates["precompute"].per_gpu)
    print("\n".join(lines))
    return 0


def per_source_lines(index: Path, results: Path, bytes_per_sample: int, samples_per_s: float | None) -> list[str]:
    """Samples, shards, cache bytes (estimated and on disk), samples not cached yet and their GPU-hours,
    and the rows the last precompute jobs computed vs reused, per source of the index."""
    from vlnflow.cache.per_source import new_samples_by_shard, shard_samples_from_episodes, source_table

    episodes = index.with_name("episodes.parquet")
    if not episodes.exists():
        return []
    cache = results / "cache"
    table = source_table(
        shard_samples_from_episodes(episodes),
        cache / "manifest.json",
        sorted((results / "benchmark" / "precompute").glob("*.stats.json")),
        new_samples_by_shard(index, episodes, cache / "manifest.parquet"),
    )
    header = f"{'source':<18} {'samples':>10} {'shards':>6} {'est. bytes':>14} {'cached B':>14} {'new':>9} {'GPU-h new':>9} {'computed':>9} {'reused':>9}"
    out = ["", "per source (index, cache manifest, last precompute job of each shard):", header]
    for r in table.itertuples():
        hours = "" if not samples_per_s else f"{r.new_samples / samples_per_s / 3600:.2f}"
        cell = lambda v: "" if v != v else f"{int(v):,}"  # noqa: E731 - NaN: not known
        out.append(
            f"{r.source:<18} {r.samples:>10,} {r.shards:>6} {r.samples * bytes_per_sample:>14,} {cell(r.cache_bytes):>14} "
            f"{cell(r.new_samples):>9} {hours:>9} {cell(r.computed):>9} {cell(r.reused):>9}"
        )
    out.append("new = indexed samples not in the cache yet: at most what the next precompute_all encodes (rows of "
               "unchanged samples are reused, cache.reuse)")
    return out
