"""The benchmark report: collect what the pipeline's jobs wrote -> per-stage table -> markdown, CSV, plot.

A small collector, not a profiler: every number is read from a file a job already wrote (Snakemake
`benchmark:` TSVs, precompute stats JSON, the cache manifest, training metrics.jsonl), and the only
arithmetic is sums, maxima, medians and ratios of those. The projection is labelled as such and
writes out its inputs.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from vlnflow.report import sources
from vlnflow.report.cache_decision import cache_decision_markdown
from vlnflow.report.runs import train_summary
from vlnflow.errors import UserError

STAGES = ("index", "shard", "precompute", "manifest", "validate", "train")
COLUMNS = (
    "stage", "jobs", "wall_s_sum", "wall_s_max", "cpu_s", "max_rss_mb", "samples",
    "samples_per_s", "frames_per_s", "s_per_it_median", "data_wait_pct", "cache_bytes", "measured_at",
)  # fmt: skip


@dataclass
class ReportInputs:
    """Files per stage, named as in the rule's input (rules/benchmark.smk); each a list, maybe empty."""

    index: list[str] = field(default_factory=list)
    shard: list[str] = field(default_factory=list)
    precompute: list[str] = field(default_factory=list)
    manifest: list[str] = field(default_factory=list)
    validate: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    precompute_stats: list[str] = field(default_factory=list)
    manifest_json: list[str] = field(default_factory=list)
    shard_list: list[str] = field(default_factory=list)  # results/shards/shards.json: samples per source
    train_metrics: list[str] = field(default_factory=list)
    live_metrics: list[str] = field(default_factory=list)
    vision_manifest: list[str] = field(default_factory=list)  # the per-frame vision cache's manifest (cache.vision)
    vision_stats: list[str] = field(default_factory=list)  # its precompute jobs' stats

    @classmethod
    def from_mapping(cls, mapping) -> ReportInputs:
        """From snakemake.input (named) or a dict; a single path becomes a one-item list."""
        known = {f.name for f in fields(cls)}
        values = {k: [v] if isinstance(v, (str, os.PathLike)) else list(v) for k, v in mapping.items()}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown report inputs: {sorted(unknown)}")
        return cls(**{k: [str(p) for p in v] for k, v in values.items()})


def _one(paths: list[str], what: str) -> str | None:
    if len(paths) > 1:
        raise UserError(f"expected one {what}, got {paths}")
    return paths[0] if paths else None


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else math.nan


def load_runs(inputs: ReportInputs) -> dict[str, pd.DataFrame]:
    """The training runs' metrics: the configured run and, when present, its live-VGGT twin."""
    runs = {}
    for label, paths in (("cached features", inputs.train_metrics), ("live VGGT", inputs.live_metrics)):
        path = _one(paths, f"{label} metrics file")
        if path:
            runs[label] = sources.read_metrics(path)
    return runs


def _stage_row(stage: str, tsvs: list[str]) -> dict:
    runs = [sources.read_benchmark(p) for p in tsvs]
    wall = pd.Series([r["s"] for r in runs], dtype=float)
    measured = sources.newest_mtime(tsvs)
    return {
        "stage": stage,
        "jobs": len(runs),
        "wall_s_sum": wall.sum(min_count=1),
        "wall_s_max": wall.max(),
        "cpu_s": pd.Series([r["cpu_time"] for r in runs], dtype=float).sum(min_count=1),
        "max_rss_mb": pd.Series([r["max_rss"] for r in runs], dtype=float).max(),
        "measured_at": "" if math.isnan(measured) else datetime.fromtimestamp(measured, timezone.utc).isoformat(timespec="seconds"),
    }


def stage_table(inputs: ReportInputs, runs: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per stage (all six, a stage without files has jobs = 0)."""
    runs = load_runs(inputs) if runs is None else runs
    rows = {stage: _stage_row(stage, getattr(inputs, stage)) for stage in STAGES}
    samples_path = _one(inputs.samples, "sample index")
    if samples_path:
        rows["index"]["samples"] = sources.count_samples(samples_path)
        rows["index"]["samples_per_s"] = _rate(rows["index"]["samples"], rows["index"]["wall_s_sum"])
    stats = [sources.read_json(p) for p in inputs.precompute_stats]
    if stats:
        if len(stats) != rows["precompute"]["jobs"]:
            raise UserError(f"{len(stats)} precompute stats files but {rows['precompute']['jobs']} benchmark files")
        pre = rows["precompute"]
        pre["samples"] = sum(s["computed"] for s in stats)
        pre["samples_per_s"] = _rate(pre["samples"], pre["wall_s_sum"])
        pre["frames_per_s"] = _rate(sum(s["frames"] for s in stats), pre["wall_s_sum"])
    manifest_path = _one(inputs.manifest_json, "cache manifest")
    if manifest_path:
        manifest = sources.read_json(manifest_path)
        rows["manifest"]["samples"] = manifest["samples"]
        rows["manifest"]["cache_bytes"] = manifest["bytes"]
    if "cached features" in runs:
        summary = train_summary(runs["cached features"])
        rows["train"].update({k: summary[k] for k in ("s_per_it_median", "samples_per_s", "data_wait_pct")})
    return pd.DataFrame([rows[s] for s in STAGES], columns=list(COLUMNS))


def live_comparison(runs: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    """Cached vs live-VGGT training from the two runs' metrics; None without both runs."""
    if len(runs) < 2:
        return None
    table = pd.DataFrame([train_summary(m) for m in runs.values()], index=list(runs))
    table["s_per_it_vs_cached"] = table["s_per_it_median"] / table.loc["cached features", "s_per_it_median"]
    return table


def projection(table: pd.DataFrame, runs: dict[str, pd.DataFrame], samples: int, gpus: int) -> pd.DataFrame:
    """PROJECTION of one pass over `samples` on `gpus` GPUs, assuming linear scaling of the measured
    per-GPU rate: precompute jobs use one GPU each; a training rate is divided by its world size."""
    rows = []
    pre = table.set_index("stage").loc["precompute"]
    if not math.isnan(pre["samples_per_s"]) and pre["samples_per_s"] > 0:
        rows.append(("precompute (one-off cache build)", pre["samples_per_s"],
                     f"{int(pre['samples'])} samples / {pre['wall_s_sum']:.1f} job-s over {int(pre['jobs'])} jobs, 1 GPU each"))  # fmt: skip
    for label, metrics in runs.items():
        s = train_summary(metrics)
        rows.append((f"train epoch, {label}", s["samples_per_s"] / s["world_size"],
                         f"median {s['samples_per_s']:.3g} samples/s over {s['steps']} steps / world size {s['world_size']}"))  # fmt: skip
    out = pd.DataFrame(rows, columns=["stage", "samples_per_s_per_gpu", "measured_from"])
    out["samples"] = samples
    out["gpus"] = gpus
    out["projected_s"] = samples / (out["samples_per_s_per_gpu"] * gpus)
    return out


def per_source_markdown(inputs: ReportInputs) -> str:
    """Samples, shards, cache bytes and computed vs reused rows per data source (vlnflow.cache.per_source)."""
    from vlnflow.cache import per_source

    shard_list = _one(inputs.shard_list, "shard list")
    if shard_list is None:
        return ""
    table = per_source.source_table(
        per_source.shard_samples_from_list(shard_list), _one(inputs.manifest_json, "cache manifest"), inputs.precompute_stats
    )
    return (
        "\n## Per data source\n\n"
        + per_source.markdown(table)
        + "\n\nSamples and shards from the shard list, cache bytes from the manifest; computed / reused / resumed "
        "rows are those of each shard's last precompute job (reused = copied from the shard's previous file, "
        "cache.reuse; resumed = from a killed job's partial file).\n"
    )


def machine() -> dict[str, object]:
    """Where the report job ran (stage jobs may have run elsewhere, e.g. on Slurm nodes)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"
    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "gpu": gpu}


def _num(value) -> str:
    if value is None or math.isnan(value):
        return ""
    value = float(value)
    if value.is_integer():
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h ({seconds:,.0f} s)"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _throughput(row) -> str:
    if row.jobs == 0 and math.isnan(row.samples_per_s) and math.isnan(row.s_per_it_median):
        return "not run (no benchmark files)"
    parts = []
    if not math.isnan(row.samples_per_s):
        parts.append(f"{_num(row.samples_per_s)} samples/s")
    if not math.isnan(row.frames_per_s):
        parts.append(f"{_num(row.frames_per_s)} frames/s")
    if not math.isnan(row.s_per_it_median):
        parts.insert(0, f"{_num(row.s_per_it_median)} s/it (median)")
        parts.append(f"data wait {row.data_wait_pct:.1f}%")
    return ", ".join(parts)


def render_markdown(table, comparison, proj, *, command: str, host: dict, run: str | None, samples_source: str) -> str:
    out = [
        "# vlnflow benchmark report",
        "",
        f"Command: `{command}`",
        f"Machine (report job): host `{host['host']}`, {host['cpus']} CPUs, GPU: {host['gpu']}",
        f"Training run: `{run}`" if run else "Training run: none configured (config train.run)",
        "",
        "Every number is read from files the pipeline's jobs wrote (Snakemake `benchmark:` TSVs, precompute "
        "stats, the cache manifest, metrics.jsonl); `measured` is the newest of a stage's benchmark files, so "
        "stages this command did not rerun keep the numbers of the run that wrote them.",
        "",
        "## Per-stage timing",
        "",
    ]
    rows = [
        [r.stage, str(r.jobs), _num(r.wall_s_sum), _num(r.wall_s_max), _num(r.cpu_s), _num(r.max_rss_mb),
         _throughput(r), "" if math.isnan(r.cache_bytes) else f"{r.cache_bytes / 1e9:.3g} GB ({int(r.cache_bytes):,} B)",
         r.measured_at]  # fmt: skip
        for r in table.itertuples()
    ]
    header = ["stage", "jobs", "wall s (sum)", "wall s (max)", "CPU s", "max RSS MB", "throughput", "cache", "measured"]
    out += [_md_table(header, rows), ""]
    out.append(
        "Throughput: index = samples / wall s; precompute = computed samples (frames) / summed job wall s; "
        "train = median over logged steps, data wait = sum data_wait_s / sum s_per_it. Blank = not run or "
        "not sampled (a job shorter than Snakemake's benchmark interval has no RSS/CPU numbers)."
    )
    if comparison is not None:
        out += ["", "## Cached vs live VGGT training", ""]
        out.append(_md_table(
            ["run", "steps", "s/it (median)", "samples/s (median)", "data wait %", "s/it vs cached"],
            [[name, str(int(r.steps)), _num(r.s_per_it_median), _num(r.samples_per_s), f"{r.data_wait_pct:.1f}",
              f"{r.s_per_it_vs_cached:.2f}x"] for name, r in comparison.iterrows()],
        ))  # fmt: skip
    out += ["", "## PROJECTION (estimate from the measurements above, not a measurement)", ""]
    if proj.empty:
        out.append("No measured throughput to project from (precompute and train have not run).")
    else:
        first = proj.iloc[0]
        out.append(f"Inputs: {int(first.samples):,} samples ({samples_source}), {int(first.gpus)} GPUs "
                   "(config benchmark.gpus_for_projection); assumes the per-GPU rate scales linearly.")  # fmt: skip
        out += ["", _md_table(
            ["stage", "measured samples/s per GPU", "measured from", "projected time"],
            [[r.stage, _num(r.samples_per_s_per_gpu), r.measured_from, _duration(r.projected_s)] for r in proj.itertuples()],
        )]  # fmt: skip
    return "\n".join(out) + "\n"


def write_report(
    inputs: ReportInputs,
    out_md: str | Path,
    out_csv: str | Path,
    out_png: str | Path,
    *,
    command: str,
    run: str | None = None,
    projected_samples: int | None = None,
    gpus: int = 8,
    host: dict | None = None,
    config: dict | None = None,
) -> pd.DataFrame:
    """Collect, then write report.md, report.csv and timing.png; returns the stage table.

    `config` (the workflow's) decides which measurements the cache decision may use (same feature shape
    and model); without it the decision uses the committed docs/results rates only."""
    from vlnflow.report.attempts import attempts_markdown
    from vlnflow.report.per_gpu import per_gpu_markdown
    from vlnflow.report.plot import plot_timing

    runs = load_runs(inputs)
    table = stage_table(inputs, runs)
    comparison = live_comparison(runs)
    indexed = table.set_index("stage").loc["index", "samples"]
    if projected_samples is not None:
        samples, source = projected_samples, "config benchmark.projected_samples"
    elif not math.isnan(indexed):
        samples, source = int(indexed), "rows of the sample index"
    else:
        raise UserError("no sample index and no benchmark.projected_samples: nothing to project to")
    proj = projection(table, runs, samples, gpus)
    text = render_markdown(table, comparison, proj, command=command, host=host or machine(), run=run, samples_source=source)
    text += per_source_markdown(inputs)
    text += per_gpu_markdown(inputs.precompute_stats)
    run_dirs = {kind: Path(paths[0]).parent for kind, paths in (("cached", inputs.train_metrics), ("live", inputs.live_metrics)) if paths}
    text += cache_decision_markdown(table, runs, samples, gpus, source, config=config, manifest_json=_one(inputs.manifest_json, "cache manifest"),
                                    precompute_stats=inputs.precompute_stats, run_dirs=run_dirs)  # fmt: skip
    if config is not None:
        from vlnflow.cache.vision_estimate import report_markdown as vision_markdown

        text += vision_markdown(config, samples, index=_one(inputs.samples, "sample index"), train_metrics=runs.get("cached features"),
                                manifest_json=_one(inputs.vision_manifest, "vision cache manifest"), stats_files=inputs.vision_stats)
    text += attempts_markdown(inputs.train_metrics)
    for path in (out_md, out_csv, out_png):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_md).write_text(text)
    table.to_csv(out_csv, index=False)
    val = {"held-out": sources.read_val_metrics(p) for p in inputs.train_metrics[:1]}
    plot_timing(table, runs, out_png, val={k: v for k, v in val.items() if not v.empty})
    return table
