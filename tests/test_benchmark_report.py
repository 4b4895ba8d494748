"""The benchmark report reads what the jobs wrote: each row is checked against the raw numbers of its files."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml

from train_helpers import TEST_SETTINGS
from vlnflow.config import deep_merge
from vlnflow.report.report import ReportInputs, live_comparison, load_runs, projection, stage_table, write_report
from vlnflow.report.sources import read_benchmark

REPO = Path(__file__).resolve().parents[1]
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
HOST = {"host": "testhost", "cpus": 2, "gpu": "none visible to torch"}

# Raw measurements per job: (wall s, max RSS MB, CPU s); None = "NA" (job shorter than a sampling interval).
JOBS = {
    "index": [(4.5, 310.0, 3.9)],
    "shard": [(1.25, 120.5, 0.8)],
    "precompute": [(30.0, 2100.0, 55.0), (42.5, 2300.0, 80.25), (12.0, None, None)],
    "manifest": [(2.0, 150.0, 1.5)],
    "validate": [(5.0, 900.0, 6.0), (6.5, 950.0, 7.0), (3.0, 800.0, 2.5), (1.5, 200.0, 1.0)],
    "train": [(600.0, 40000.0, 1100.0)],
}
PRECOMPUTE_STATS = [  # (computed, resumed, frames) per shard, same order as JOBS["precompute"]
    (100, 0, 800),
    (140, 10, 1190),
    (37, 0, 301),
]
MANIFEST = {"samples": 287, "bytes": 2_488_000_000, "n_shards": 3, "dtype": "bfloat16", "feature_shape": [2116, 2048]}
INDEXED = 287
CACHED_STEPS = [(1, 9.0, 0.9, 1.5), (2, 2.0, 0.1, 8.0), (3, 2.2, 0.2, 7.5), (4, 1.9, 0.05, 8.2), (5, 2.1, 0.15, 7.6)]
LIVE_STEPS = [(1, 14.0, 0.3, 1.1), (2, 6.0, 0.2, 2.6), (3, 6.4, 0.1, 2.5)]  # (step, s_per_it, data_wait_s, samples_per_s)
WORLD = 2
MTIME = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc).timestamp()


def _tsv(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for s, rss, cpu in rows:
        na = lambda v: "NA" if v is None else f"{v}"  # noqa: E731
        lines.append(f"{s}\t0:00:{int(s):02d}\t{na(rss)}\t{na(rss)}\t{na(rss)}\t{na(rss)}\t0.1\t0.2\t{na(cpu)}\t{na(cpu)}\n")
    path.write_text("".join(lines))
    return str(path)


def _metrics(path: Path, steps) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for step, s_it, wait, sps in steps:
            record = {"time": 1.0e9 + step, "step": step, "max_steps": 100, "s_per_it": s_it, "data_wait_s": wait,
                      "samples_per_s": sps, "tokens_per_s": 100 * sps, "loss": 2.0 / step, "lr": 1e-5,
                      "cached_samples": 4 * step, "live_samples": 0, "gpu_mem_gib": [1.0, 1.1], "world_size": WORLD}  # fmt: skip
            fh.write(json.dumps(record) + "\n")
        fh.write("\n")  # a trailing blank line is not a step
    return str(path)


@pytest.fixture
def tree(tmp_path) -> ReportInputs:
    """A results/ tree as the workflow lays it out, with the raw numbers above."""
    r = tmp_path / "results"
    shards = [f"shard_{i:05d}" for i in range(3)]
    validate = [_tsv(r / f"benchmark/validate/{s}.tsv", [row]) for s, row in zip(shards, JOBS["validate"])]
    inputs = ReportInputs(
        index=[_tsv(r / "benchmark/index/index.tsv", JOBS["index"])],
        shard=[_tsv(r / "benchmark/shards/shard.tsv", JOBS["shard"])],
        precompute=[_tsv(r / f"benchmark/precompute/{s}.tsv", [row]) for s, row in zip(shards, JOBS["precompute"])],
        manifest=[_tsv(r / "benchmark/merge_manifest.tsv", JOBS["manifest"])],
        validate=validate + [_tsv(r / "benchmark/validate_cache.tsv", JOBS["validate"][3:])],
        train=[_tsv(r / "benchmark/train/demo.tsv", JOBS["train"])],
        train_metrics=[_metrics(r / "train/demo/metrics.jsonl", CACHED_STEPS)],
        live_metrics=[_metrics(r / "train/demo_live/metrics.jsonl", LIVE_STEPS)],
    )
    for s, (computed, resumed, frames), (wall, _, _) in zip(shards, PRECOMPUTE_STATS, JOBS["precompute"]):
        stats = {"shard": s, "samples": computed + resumed, "computed": computed, "resumed": resumed, "skipped": 0,
                 "frames": frames, "wall_s": wall - 1, "encode_s": wall - 3, "samples_per_s": computed / (wall - 1)}  # fmt: skip
        (r / f"benchmark/precompute/{s}.stats.json").write_text(json.dumps(stats))
        inputs.precompute_stats.append(str(r / f"benchmark/precompute/{s}.stats.json"))
    (r / "cache").mkdir()
    (r / "cache/manifest.json").write_text(json.dumps(MANIFEST))
    inputs.manifest_json = [str(r / "cache/manifest.json")]
    (r / "index").mkdir()
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(INDEXED)]}).to_parquet(r / "index/samples.parquet")
    inputs.samples = [str(r / "index/samples.parquet")]
    for i, path in enumerate(sorted(r.rglob("*.tsv"))):
        os.utime(path, (MTIME + i, MTIME + i))
    return inputs


def _present(values):
    return [v for v in values if v is not None]


def test_each_stage_row_matches_its_benchmark_files(tree):
    table = stage_table(tree).set_index("stage")
    assert list(table.index) == ["index", "shard", "precompute", "manifest", "validate", "train"]
    for stage, jobs in JOBS.items():
        row = table.loc[stage]
        walls = [j[0] for j in jobs]
        assert row.jobs == len(jobs), stage
        assert row.wall_s_sum == pytest.approx(sum(walls)), stage
        assert row.wall_s_max == pytest.approx(max(walls)), stage
        assert row.cpu_s == pytest.approx(sum(_present(j[2] for j in jobs))), stage
        assert row.max_rss_mb == pytest.approx(max(_present(j[1] for j in jobs))), stage
        stamps = [MTIME + i for i, p in enumerate(sorted(Path(tree.index[0]).parents[1].rglob("*.tsv")))
                  if str(p) in getattr(tree, stage)]  # fmt: skip
        assert row.measured_at == datetime.fromtimestamp(max(stamps), timezone.utc).isoformat(timespec="seconds")


def test_throughput_and_cache_columns(tree):
    table = stage_table(tree).set_index("stage")
    index, pre, manifest, train = (table.loc[s] for s in ("index", "precompute", "manifest", "train"))
    assert index.samples == INDEXED
    assert index.samples_per_s == pytest.approx(INDEXED / 4.5)
    job_seconds = 30.0 + 42.5 + 12.0
    assert pre.samples == 100 + 140 + 37  # computed, not resumed
    assert pre.samples_per_s == pytest.approx(277 / job_seconds)
    assert pre.frames_per_s == pytest.approx((800 + 1190 + 301) / job_seconds)
    assert manifest.cache_bytes == MANIFEST["bytes"] and manifest.samples == MANIFEST["samples"]
    assert train.s_per_it_median == pytest.approx(statistics.median(s[1] for s in CACHED_STEPS))
    assert train.samples_per_s == pytest.approx(statistics.median(s[3] for s in CACHED_STEPS))
    wait = sum(s[2] for s in CACHED_STEPS) / sum(s[1] for s in CACHED_STEPS)
    assert train.data_wait_pct == pytest.approx(100 * wait)
    for stage in ("shard", "validate"):
        assert math.isnan(table.loc[stage].samples_per_s)


def test_live_comparison_and_projection(tree):
    runs = load_runs(tree)
    comparison = live_comparison(runs)
    cached_median = statistics.median(s[1] for s in CACHED_STEPS)
    live_median = statistics.median(s[1] for s in LIVE_STEPS)
    assert comparison.loc["live VGGT", "steps"] == len(LIVE_STEPS)
    assert comparison.loc["live VGGT", "s_per_it_vs_cached"] == pytest.approx(live_median / cached_median)
    assert comparison.loc["cached features", "s_per_it_vs_cached"] == pytest.approx(1.0)
    live_wait = sum(s[2] for s in LIVE_STEPS) / sum(s[1] for s in LIVE_STEPS)
    assert comparison.loc["live VGGT", "data_wait_pct"] == pytest.approx(100 * live_wait)

    proj = projection(stage_table(tree, runs), runs, 612_492, 8).set_index("stage")
    pre_rate = 277 / (30.0 + 42.5 + 12.0)  # samples per job-second, one GPU per job
    assert proj.loc["precompute (one-off cache build)", "projected_s"] == pytest.approx(612_492 / (pre_rate * 8))
    cached_rate = statistics.median(s[3] for s in CACHED_STEPS) / WORLD
    assert proj.loc["train epoch, cached features", "samples_per_s_per_gpu"] == pytest.approx(cached_rate)
    assert proj.loc["train epoch, cached features", "projected_s"] == pytest.approx(612_492 / (cached_rate * 8))
    live_rate = statistics.median(s[3] for s in LIVE_STEPS) / WORLD
    assert proj.loc["train epoch, live VGGT", "projected_s"] == pytest.approx(612_492 / (live_rate * 8))


def test_write_report_files(tree, tmp_path):
    out = tmp_path / "out"
    write_report(tree, out / "report.md", out / "report.csv", out / "timing.png", command="snakemake -c 1 benchmark_report",
                 run="demo", projected_samples=612_492, gpus=8, host=HOST)  # fmt: skip
    md = (out / "report.md").read_text()
    assert md.splitlines()[2] == "Command: `snakemake -c 1 benchmark_report`"
    assert "host `testhost`, 2 CPUs" in md
    assert "PROJECTION" in md and "612,492 samples (config benchmark.projected_samples), 8 GPUs" in md
    assert "## Cached vs live VGGT" in md and f"{statistics.median(s[1] for s in LIVE_STEPS) / statistics.median(s[1] for s in CACHED_STEPS):.2f}x" in md
    csv = pd.read_csv(out / "report.csv").set_index("stage")
    assert csv.loc["precompute", "wall_s_sum"] == pytest.approx(84.5) and csv.loc["validate", "jobs"] == 4
    png = (out / "timing.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # without a live run, projected_samples, or training: index count is the default, no comparison table
    tree.live_metrics, tree.train_metrics, tree.train = [], [], []
    write_report(tree, out / "r2.md", out / "r2.csv", out / "t2.png", command="x", host=HOST)
    md = (out / "r2.md").read_text()
    assert "Cached vs live" not in md and f"{INDEXED:,} samples (rows of the sample index)" in md
    assert "| train | 0 |" in md and "train epoch" not in md


def test_repeated_benchmark_rows_and_inputs_mapping(tmp_path):
    path = _tsv(tmp_path / "b.tsv", [(2.0, 100.0, 1.0), (4.0, 300.0, 3.0)])
    assert read_benchmark(path) == {"s": 3.0, "max_rss": 300.0, "cpu_time": 2.0}
    inputs = ReportInputs.from_mapping({"index": path, "precompute": [path, path]})
    assert inputs.index == [path] and inputs.precompute == [path, path] and inputs.train == []
    with pytest.raises(ValueError, match="unknown report inputs"):
        ReportInputs.from_mapping({"nonsense": path})


@pytest.mark.slow
def test_workflow_benchmark_report_and_html(tmp_path):
    """`snakemake benchmark_report` on a tiny demo in a copy of the workflow, then `--report` embeds it."""
    for name in ("Snakefile", "config.yaml", "rules", "workflow_scripts", "report", "envs"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    config = tmp_path / "config.yaml"  # 2 episodes: the tests' sizes (none held out, 4 steps), not the full demo's
    config.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(config.read_text()), TEST_SETTINGS), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run("vlnflow", "demo-data", "data/demo", "--episodes", "2", "--size", "32x24")  # 4:3 like the config's 640x480 frames (crop)
    run("snakemake", "-c", "1", "benchmark_report")
    bench = tmp_path / "results/benchmark"
    table = pd.read_csv(bench / "report.csv").set_index("stage")
    for stage, tsv in (("index", "index/index.tsv"), ("shard", "shards/shard.tsv")):
        raw = pd.read_csv(bench / tsv, sep="\t")
        assert table.loc[stage, "jobs"] == 1 and table.loc[stage, "wall_s_sum"] == pytest.approx(raw.s.iloc[0])
    samples = len(pd.read_parquet(tmp_path / "results/index/samples.parquet"))
    assert table.loc["index", "samples"] == samples
    assert (bench / "report.md").read_text().splitlines()[2] == "Command: `snakemake -c 1 benchmark_report`"
    run("snakemake", "benchmark_report", "--report", "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "Per-stage timing" in html and "timing.png" in html and "report.csv" in html
    # Neither `--report` nor a dry run with other flags makes the report stale.
    assert "Nothing to be done" in run("snakemake", "-n", "benchmark_report").stdout


def test_validation_records_are_not_steps_and_are_plotted(tmp_path):
    """Issue 12: metrics.jsonl val records (kind "val") stay out of the step table and go to the loss panel."""
    from matplotlib.figure import Figure

    from vlnflow.report.plot import _plot_losses
    from vlnflow.report.sources import read_metrics, read_val_metrics

    path = Path(_metrics(tmp_path / "metrics.jsonl", CACHED_STEPS))
    with open(path, "a") as fh:
        for step, loss in ((2, 3.5), (5, 3.25)):
            fh.write(json.dumps({"kind": "val", "step": step, "val_loss": loss, "val_action_accuracy": 0.5}) + "\n")
    steps = read_metrics(path)
    assert steps["step"].tolist() == [s[0] for s in CACHED_STEPS] and "val_loss" not in steps
    val = read_val_metrics(path)
    assert val["step"].tolist() == [2, 5] and val["val_loss"].tolist() == [3.5, 3.25]
    assert read_val_metrics(_metrics(tmp_path / "plain.jsonl", CACHED_STEPS)).empty
    ax = Figure().subplots()
    _plot_losses(ax, {"cached features": steps.assign(loss=2.0)}, {"held-out": val})
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["validation (held-out)"].get_xdata()) == [2, 5]
    assert list(lines["validation (held-out)"].get_ydata()) == [3.5, 3.25]
    assert list(lines["train (cached features)"].get_xdata()) == steps["step"].tolist()
    assert ax.get_yscale() == "log"  # issue 24: a loss falling from ~7 to ~0.05 stays readable
    flat = Figure().subplots()
    _plot_losses(flat, {"cached features": steps.assign(loss=0.0)}, {})  # a zero cannot go on a log axis
    assert flat.get_yscale() == "linear"
