"""Cache or live: which one pays for a training plan, from measured rates.

The model. Training live costs extra time on every step (VGGT in the loop); the cache costs one
precompute (GPU-hours, one GPU per shard job) plus its storage. On the same G GPUs:

    precompute wall  = samples / (precompute rate per GPU x G)
    epoch (cached)   = samples / (cached training rate per GPU x G)
    epoch (live)     = samples / (live training rate per GPU x G)
    break-even       = precompute wall / (epoch live - epoch cached)     [epochs, summed over runs]
                     = (1 / precompute rate) / (1 / live rate - 1 / cached rate)

so the break-even number of epochs depends on neither the data set size nor G. Epochs of several
runs over the same data (learning-rate or `lam` sweeps) add up: the cache is built once.

Rates come from this workspace's own files when they exist (precompute stats of the configured
feature shape; metrics.jsonl of a cached run and its `_live` twin with the configured model), else
from the figures in docs/benchmarks.md below; every rate carries where it came from.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

# docs/benchmarks.md, "Feature cache": precompute_shard on one H100 (nvidia-h100-x4, GPU 0), 2026-11-27,
# DataLoader PNG decoding + VGGT-1B encode_indexed + HDF5 writes, compiled shard.
DOCS_PRECOMPUTE_SAMPLES_PER_S = 6.4
DOCS_PRECOMPUTE_SOURCE = "docs/benchmarks.md: precompute_shard on 1x H100, 2026-11-27"
# docs/benchmarks.md, "Training step (issue 5)": Qwen2.5-VL-7B shape, ZeRO-2, 4x H100, per-device batch 1 x
# grad accumulation 8 = 32 samples per optimizer step, 2026-11-27; the only like-for-like cached/live pair.
DOCS_TRAIN_GPUS = 4
DOCS_SAMPLES_PER_STEP = 32
DOCS_CACHED_S_PER_IT = 8.06
DOCS_LIVE_S_PER_IT = 8.87
DOCS_TRAIN_SOURCE = "docs/benchmarks.md: ZeRO-2 on 4x H100, batch 1 x accum 8 (32 samples/step), 2026-11-27"
# Same table, cached only: packed per-device batch 4 x accumulation 2 (live was not measured at this batch).
DOCS_PACKED_CACHED_SAMPLES_PER_S_PER_GPU = 1.153


@dataclass(frozen=True)
class Rate:
    """Samples per second per GPU, and where the number came from."""

    per_gpu: float
    source: str
    origin: str = "docs"  # docs | workspace | option


def docs_rates() -> dict[str, Rate]:
    per_gpu = lambda s_per_it: DOCS_SAMPLES_PER_STEP / (s_per_it * DOCS_TRAIN_GPUS)  # noqa: E731
    return {
        "precompute": Rate(DOCS_PRECOMPUTE_SAMPLES_PER_S, DOCS_PRECOMPUTE_SOURCE),
        "cached": Rate(per_gpu(DOCS_CACHED_S_PER_IT), f"{DOCS_TRAIN_SOURCE}, {DOCS_CACHED_S_PER_IT} s/it"),
        "live": Rate(per_gpu(DOCS_LIVE_S_PER_IT), f"{DOCS_TRAIN_SOURCE}, {DOCS_LIVE_S_PER_IT} s/it"),
    }


def precompute_rate(stats_files: list[Path], label: str) -> Rate | None:
    """Computed samples / summed job wall time of precompute stats JSONs (one GPU per job)."""
    stats = [json.loads(Path(p).read_text()) for p in stats_files]
    samples, wall = sum(s["computed"] for s in stats), sum(s["wall_s"] for s in stats)
    if samples <= 0 or wall <= 0:
        return None
    return Rate(samples / wall, f"{label}: {samples} samples in {wall:.1f} job-s over {len(stats)} precompute jobs", "workspace")


def train_rate(metrics_file: Path, label: str) -> Rate | None:
    """Median samples/s per GPU over a run's logged steps (as the benchmark report's projection)."""
    from vlnflow.report.sources import read_metrics

    steps = read_metrics(metrics_file)
    world = int(steps["world_size"].median()) if "world_size" in steps else 1
    per_gpu = float(statistics.median(steps["samples_per_s"])) / world
    return Rate(per_gpu, f"{label}: median of {len(steps)} steps on {world} GPU(s)", "workspace")


def _model_shape(config: dict) -> tuple:
    from vlnflow.spatial.fingerprint import spatial_output

    m = config.get("model", {})
    return spatial_output(config["spatial"]), m.get("preset"), m.get("qwen_path"), config["spatial"].get("preprocess", "pad")


def workspace_rates(config: dict, results: str | Path = "results") -> tuple[dict[str, Rate], list[str]]:
    """Rates measured in this workspace for the configured shapes, and notes on files left out."""
    import yaml

    from vlnflow.spatial.fingerprint import spatial_output

    results, rates, notes = Path(results), {}, []
    stats = sorted((results / "benchmark" / "precompute").glob("*.stats.json"))
    manifest = results / "cache" / "manifest.json"
    if stats:
        (gh, gw), channels = spatial_output(config["spatial"])
        shape = json.loads(manifest.read_text()).get("feature_shape") if manifest.exists() else None
        if shape == [gh * gw, channels]:
            rate = precompute_rate(stats, f"measured here ({results}/benchmark/precompute)")
            if rate:
                rates["precompute"] = rate
        else:
            notes.append(f"precompute stats in {results}/benchmark/precompute left out: their cache holds {shape}, "
                         f"the config {gh * gw} x {channels}")  # fmt: skip
    run = config.get("train", {}).get("run")
    if run:
        pair = {"cached": results / "train" / run, "live": results / "train" / f"{run}_live"}
        found = {k: d for k, d in pair.items() if (d / "metrics.jsonl").exists()}
        if len(found) == 2:  # only a like-for-like pair: a lone run says nothing about the difference
            want = _model_shape(config)
            for kind, run_dir in found.items():
                frozen = run_dir / ("config.live.yaml" if kind == "live" else "config.yaml")
                if frozen.exists() and _model_shape(yaml.safe_load(frozen.read_text())) != want:
                    notes.append(f"{run_dir} left out: trained another model or feature shape than the config")
                    break
            else:
                for kind, run_dir in found.items():
                    rate = train_rate(run_dir / "metrics.jsonl", f"measured here ({run_dir}/metrics.jsonl)")
                    if rate:
                        rates[kind] = rate
        elif found:
            missing = sorted(set(pair) - set(found))[0]
            notes.append(f"only the {sorted(found)[0]} run in {results}/train: no {missing} twin to compare with "
                         "(benchmark.compare_live_steps > 0 runs one)")  # fmt: skip
    if ("cached" in rates) != ("live" in rates):
        rates.pop("cached", None), rates.pop("live", None)
    return rates, notes


def choose_rates(config: dict, results: str | Path = "results", *, use_workspace: bool = True,
                 precompute_override: float | None = None) -> tuple[dict[str, Rate], list[str]]:
    """Workspace rates where measured, docs/benchmarks.md figures for the rest; --samples-per-s wins for precompute."""
    rates, notes = docs_rates(), []
    if use_workspace:
        measured, notes = workspace_rates(config, results)
        rates.update(measured)
    if precompute_override:
        rates["precompute"] = Rate(precompute_override, "--samples-per-s", "option")
    return rates, notes


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h"


@dataclass
class Decision:
    samples: int
    gpus: int
    epochs: float
    runs: int
    rates: dict[str, Rate]
    cache_bytes: int | None = None

    @property
    def precompute_gpu_hours(self) -> float:
        return self.samples / self.rates["precompute"].per_gpu / 3600

    @property
    def precompute_s(self) -> float:
        """Wall time of precompute on the same G GPUs (G single-GPU jobs side by side)."""
        return self.samples / (self.rates["precompute"].per_gpu * self.gpus)

    def epoch_s(self, kind: str) -> float:
        return self.samples / (self.rates[kind].per_gpu * self.gpus)

    @property
    def break_even_epochs(self) -> float:
        """Epochs (over all runs on the same data) from which the cache is cheaper; inf when live is not slower."""
        extra = self.epoch_s("live") - self.epoch_s("cached")
        return self.precompute_s / extra if extra > 0 else math.inf

    def plan_s(self) -> dict[str, float]:
        passes = self.epochs * self.runs
        return {"cache": self.precompute_s + passes * self.epoch_s("cached"), "live": passes * self.epoch_s("live")}

    def winner(self) -> str:
        plan = self.plan_s()
        return "cache" if plan["cache"] < plan["live"] else "live"

    def lines(self) -> list[str]:
        g, r = self.gpus, self.rates
        out = [
            f"precompute         {self.precompute_gpu_hours:,.1f} GPU-hours = {_hours(self.precompute_s)} on {g} GPUs, "
            f"at {r['precompute'].per_gpu:.3g} samples/s per GPU ({r['precompute'].source})",
            f"epoch, cached      {_hours(self.epoch_s('cached'))} on {g} GPUs at {r['cached'].per_gpu:.3g} samples/s per GPU "
            f"({r['cached'].source})",
            f"epoch, live VGGT   {_hours(self.epoch_s('live'))} on {g} GPUs at {r['live'].per_gpu:.3g} samples/s per GPU "
            f"({r['live'].source})",
        ]
        be = self.break_even_epochs
        if math.isinf(be):
            out.append("break-even         never: live training is not slower than cached here, the cache does not pay")
        else:
            out.append(f"break-even         {be:.2f} epochs (summed over every run on the same data): fewer -> train live, "
                       "more -> build the cache")  # fmt: skip
        plan, win = self.plan_s(), self.winner()
        storage = f" and {self.cache_bytes / 1e12:.2f} TB of storage" if self.cache_bytes and win == "live" else ""
        runs = f" x {self.runs} runs" if self.runs != 1 else ""
        out.append(
            f"your plan          {self.epochs:g} epoch(s){runs} on {g} GPUs: cache {_hours(plan['cache'])} "
            f"(precompute included), live {_hours(plan['live'])} -> {win} saves {_hours(abs(plan['cache'] - plan['live']))}{storage}"
        )
        origins = {rate.origin for rate in r.values()}
        if len(origins) > 1:
            out.append(f"note               the rates come from different places ({', '.join(sorted(origins))}): "
                       "their machines may differ")  # fmt: skip
        return out
