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
from the committed results JSON files under docs/results (`DOCS_SOURCES`: the file names are fixed
here, the numbers are read from the files, with their commit and date). Every rate carries where it
came from and the range its repetitions span (slowest and fastest step or shard), so the break-even
is printed with the range those allow, not as one number.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from vlnflow import docs_results

# The committed runs the defaults come from: the only like-for-like cached/live pair (ZeRO-2 on 4x H100,
# per-device batch 1 x accumulation 8, same run), and the precompute of that run's cache (its preparation
# and the fresh preparation of the "phases" run; the last shard of each is the compiled steady state).
DOCS_SOURCES = {
    "train": "train_bench_h100x4_run1.json",
    "cached_case": "cached_zero2_g4",
    "live_case": "live_zero2_g4",
    "precompute": ("train_bench_h100x4_prep.json", "train_bench_h100x4_phases.json"),
}


@dataclass(frozen=True)
class Rate:
    """Samples per second per GPU, where the number came from, and the range of its repetitions."""

    per_gpu: float
    source: str
    origin: str = "docs"  # docs | workspace | option
    low: float | None = None  # slowest repetition (None: a single figure)
    high: float | None = None  # fastest repetition

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.low if self.low is not None else self.per_gpu, self.high if self.high is not None else self.per_gpu)

    def span(self) -> str:
        lo, hi = self.bounds
        return "" if lo == hi else f", range {lo:.3g}-{hi:.3g}"


def steps_rate(s_per_it: list[float], samples_per_step: int, gpus: int, source: str, origin: str) -> Rate:
    """Per-GPU rate of optimizer steps: median s/it, range from the slowest and fastest step."""
    per_gpu = lambda s: samples_per_step / (s * gpus)  # noqa: E731
    return Rate(per_gpu(statistics.median(s_per_it)), source, origin, per_gpu(max(s_per_it)), per_gpu(min(s_per_it)))


def _train_case(result: docs_results.Result, name: str) -> dict:
    cases = {c["name"]: c for c in result.data.get("cases", [])}
    case = cases.get(name)
    if not case or not case.get("ok") or len(case.get("steps") or []) < 2:
        from vlnflow.errors import UserError

        raise UserError(f"docs/results/{result.name} has no successful case {name!r} with at least 2 steps")
    return case


def docs_rates(root: Path | str | None = None, sources: dict | None = None) -> dict[str, Rate]:
    """The default rates, read from the committed results files named in `sources` (default DOCS_SOURCES).

    Training: the steps after the first (compilation and allocator warm-up) of the cached and the live
    case of ONE run, per GPU; precompute: computed samples / wall seconds of each preparation's last
    (compiled) shard, median over the files.
    """
    src = {**DOCS_SOURCES, **(sources or {})}
    train = docs_results.load(src["train"], root)
    rates = {}
    for kind in ("cached", "live"):
        case = _train_case(train, src[f"{kind}_case"])
        steps = [s["s_per_it"] for s in case["steps"][1:]]
        samples = case["per_device_batch"] * case["grad_accum"] * case["gpus"]
        label = (f"{train.label}: {case['name']}, {case['deepspeed']} on {case['gpus']} GPUs, batch {case['per_device_batch']} x "
                 f"accum {case['grad_accum']}, median {statistics.median(steps):.3g} s/it of {len(steps)} steps")  # fmt: skip
        rates[kind] = steps_rate(steps, samples, case["gpus"], label, "docs")
    shard_rates, labels = [], []
    for name in src["precompute"]:
        result = docs_results.load(name, root)
        last = (result.data.get("precompute") or [None])[-1]
        if not last or not last.get("wall_s"):
            from vlnflow.errors import UserError

            raise UserError(f"docs/results/{name} holds no precompute shard to take a rate from")
        shard_rates.append(last["computed"] / last["wall_s"])
        labels.append(f"{result.label}: {last['shard']}, {last['computed']} samples in {last['wall_s']:.1f} s")
    rates["precompute"] = Rate(statistics.median(shard_rates), "; ".join(labels) + " (compiled shard, 1 GPU)", "docs",
                               min(shard_rates), max(shard_rates))  # fmt: skip
    return rates


def precompute_rate(stats_files: list[Path], label: str) -> Rate | None:
    """Computed samples / summed job wall time of precompute stats JSONs (one GPU per job); range over the jobs."""
    stats = [json.loads(Path(p).read_text()) for p in stats_files]
    samples, wall = sum(s["computed"] for s in stats), sum(s["wall_s"] for s in stats)
    if samples <= 0 or wall <= 0:
        return None
    per_job = [s["computed"] / s["wall_s"] for s in stats if s["wall_s"] > 0 and s["computed"] > 0]
    return Rate(samples / wall, f"{label}: {samples} samples in {wall:.1f} job-s over {len(stats)} precompute jobs", "workspace",
                min(per_job, default=None), max(per_job, default=None))  # fmt: skip


def metrics_rate(steps, label: str, origin: str = "workspace") -> Rate:
    """Median samples/s per GPU over a run's logged steps (a metrics table, as the report's projection); the
    range spans the steps after the first (which carries compilation and warm-up) when there are more than two."""
    world = int(steps["world_size"].median()) if "world_size" in steps else 1
    rates = [float(v) / world for v in steps["samples_per_s"]]
    settled = rates[1:] if len(rates) > 2 else rates
    return Rate(statistics.median(rates), f"{label}: median of {len(rates)} steps on {world} GPU(s)", origin, min(settled), max(settled))


def train_rate(metrics_file: Path, label: str) -> Rate | None:
    """metrics_rate of a metrics.jsonl file (as the benchmark report's projection)."""
    from vlnflow.report.sources import read_metrics

    return metrics_rate(read_metrics(metrics_file), label)


def _model_shape(config: dict) -> tuple:
    from vlnflow.spatial.fingerprint import spatial_output

    m = config.get("model", {})
    return spatial_output(config["spatial"]), m.get("preset"), m.get("qwen_path"), config["spatial"].get("preprocess", "pad")


def feature_shape_note(config: dict, manifest_file: Path | str | None, what: str) -> str | None:
    """None when the cache behind `what` holds the configured feature shape, else why `what` is left out."""
    from vlnflow.spatial.fingerprint import spatial_output

    (gh, gw), channels = spatial_output(config["spatial"])
    manifest = Path(manifest_file) if manifest_file else None
    shape = json.loads(manifest.read_text()).get("feature_shape") if manifest and manifest.exists() else None
    if shape == [gh * gw, channels]:
        return None
    return f"{what} left out: their cache holds {shape}, the config {gh * gw} x {channels}"


def run_pair_note(config: dict, run_dirs: dict[str, Path]) -> str | None:
    """None when the cached and live run (their frozen configs) trained the configured model and feature shape."""
    import yaml

    want = _model_shape(config)
    for kind, run_dir in run_dirs.items():
        frozen = Path(run_dir) / ("config.live.yaml" if kind == "live" else "config.yaml")
        if frozen.exists() and _model_shape(yaml.safe_load(frozen.read_text())) != want:
            return f"{run_dir} left out: trained another model or feature shape than the config"
    return None


def workspace_rates(config: dict, results: str | Path = "results") -> tuple[dict[str, Rate], list[str]]:
    """Rates measured in this workspace for the configured shapes, and notes on files left out."""
    results, rates, notes = Path(results), {}, []
    stats = sorted((results / "benchmark" / "precompute").glob("*.stats.json"))
    if stats:
        note = feature_shape_note(config, results / "cache" / "manifest.json", f"precompute stats in {results}/benchmark/precompute")
        rate = None if note else precompute_rate(stats, f"measured here ({results}/benchmark/precompute)")
        if rate:
            rates["precompute"] = rate
        if note:
            notes.append(note)
    run = config.get("train", {}).get("run")
    if run:
        pair = {"cached": results / "train" / run, "live": results / "train" / f"{run}_live"}
        found = {k: d for k, d in pair.items() if (d / "metrics.jsonl").exists()}
        if len(found) == 2:  # only a like-for-like pair: a lone run says nothing about the difference
            note = run_pair_note(config, found)
            if note:
                notes.append(note)
            else:
                for kind, run_dir in found.items():
                    rates[kind] = train_rate(run_dir / "metrics.jsonl", f"measured here ({run_dir}/metrics.jsonl)")
        elif found:
            missing = sorted(set(pair) - set(found))[0]
            notes.append(f"only the {sorted(found)[0]} run in {results}/train: no {missing} twin to compare with "
                         "(benchmark.compare_live_steps > 0 runs one)")  # fmt: skip
    if ("cached" in rates) != ("live" in rates):
        rates.pop("cached", None), rates.pop("live", None)
    return rates, notes


def choose_rates(config: dict, results: str | Path = "results", *, use_workspace: bool = True,
                 precompute_override: float | None = None, docs: dict[str, Rate] | None = None) -> tuple[dict[str, Rate], list[str]]:
    """Workspace rates where measured, the committed docs/results rates for the rest (`docs`, default
    docs_rates()); --samples-per-s wins for precompute."""
    rates, notes = dict(docs if docs is not None else docs_rates()), []
    if use_workspace:
        measured, notes = workspace_rates(config, results)
        rates.update(measured)
    if precompute_override:
        rates["precompute"] = Rate(precompute_override, "--samples-per-s", "option")
    return rates, notes


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h"


def break_even(precompute: float, cached: float, live: float) -> float:
    """Epochs from which the cache pays, from per-GPU rates: (1 / precompute) / (1 / live - 1 / cached); inf if live is not slower."""
    extra = 1 / live - 1 / cached
    return (1 / precompute) / extra if extra > 0 else math.inf


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

    @property
    def break_even_range(self) -> tuple[float, float]:
        """The break-even the rates' ranges allow: fastest precompute with the largest live-cached gap, and
        slowest precompute with the smallest gap (inf: within the ranges, live may be as fast as cached)."""
        (p_lo, p_hi), (c_lo, c_hi), (l_lo, l_hi) = (self.rates[k].bounds for k in ("precompute", "cached", "live"))
        return break_even(p_hi, c_hi, l_lo), break_even(p_lo, c_lo, l_hi)

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
            f"at {r['precompute'].per_gpu:.3g} samples/s per GPU{r['precompute'].span()} ({r['precompute'].source})",
            f"epoch, cached      {_hours(self.epoch_s('cached'))} on {g} GPUs at {r['cached'].per_gpu:.3g} samples/s per GPU"
            f"{r['cached'].span()} ({r['cached'].source})",
            f"epoch, live VGGT   {_hours(self.epoch_s('live'))} on {g} GPUs at {r['live'].per_gpu:.3g} samples/s per GPU"
            f"{r['live'].span()} ({r['live'].source})",
        ]
        be = self.break_even_epochs
        lo, hi = self.break_even_range
        span = "" if (lo, hi) == (be, be) else f" (range {lo:.2f}-{'never' if math.isinf(hi) else f'{hi:.2f}'} from the rates' ranges)"
        if math.isinf(be):
            out.append(f"break-even         never: live training is not slower than cached here, the cache does not pay{span}")
        else:
            out.append(f"break-even         {be:.2f} epochs{span} (summed over every run on the same data): fewer -> train live, "
                       "more -> build the cache")  # fmt: skip
        plan, win = self.plan_s(), self.winner()
        storage = f" and {self.cache_bytes / 1e12:.2f} TB of storage" if self.cache_bytes and win == "live" else ""
        runs = f" x {self.runs} runs" if self.runs != 1 else ""
        out.append(
            f"your plan          {self.epochs:g} epoch(s){runs} on {g} GPUs: cache {_hours(plan['cache'])} "
            f"(precompute included), live {_hours(plan['live'])} -> {win} saves {_hours(abs(plan['cache'] - plan['live']))}{storage}"
        )
        if lo < self.epochs * self.runs < hi:
            out.append("note               your plan lies inside the break-even range: the measured spread does not decide it")
        origins = {rate.origin for rate in r.values()}
        if len(origins) > 1:
            out.append(f"note               the rates come from different places ({', '.join(sorted(origins))}): "
                       "their machines may differ")  # fmt: skip
        return out
