"""Cache or live (issue 14): `vlnflow cache estimate` prints precompute GPU-hours, both epoch times and the
break-even epochs (with the range the measured repetitions allow), from this workspace's measurements when
they fit the config, else from the committed docs/results files (read, never copied as literals), each
labelled; the benchmark report applies the same checks and shows the same lines."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlnflow.cache import decision as dc
from vlnflow.cache.decision import Decision, Rate, choose_rates, docs_rates
from vlnflow.errors import UserError

REPO = Path(__file__).resolve().parents[1]
R2R = REPO / "configs" / "janusvln_r2r_h800.yaml"
VLNFLOW = str(Path(sys.executable).parent / "vlnflow")


def _demo_shape() -> list[int]:
    from vlnflow.config import load_config
    from vlnflow.spatial.fingerprint import spatial_output

    (gh, gw), channels = spatial_output(load_config(REPO / "config.yaml")["spatial"])
    return [gh * gw, channels]


DEMO_SHAPE = _demo_shape()


def _estimate(cwd: Path, *args: str) -> str:
    proc = subprocess.run([VLNFLOW, "cache", "estimate", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _results_dir(root: Path) -> Path:
    """A docs/results of our own: one training run with a cached and a live case, two preparations with
    precompute shards; one file carries its own provenance, the others are named in provenance.json."""
    root.mkdir(parents=True, exist_ok=True)

    def case(name, s_per_it):
        return {"name": name, "ok": True, "gpus": 2, "deepspeed": "zero2", "per_device_batch": 2, "grad_accum": 2,
                "steps": [{"step": i + 1, "s_per_it": s} for i, s in enumerate(s_per_it)]}  # fmt: skip

    train = {"provenance": {"commit": "abcdef0123456789", "date": "2026-12-10T10:00:00+00:00", "card": "NVIDIA H200"},
             "cases": [case("cached", [9.0, 2.0, 4.0, 3.0]), case("live", [30.0, 8.0, 4.0]), {"name": "other", "ok": False}]}
    (root / "train.json").write_text(json.dumps(train))
    for name, last in (("prep_a.json", (30, 10.0)), ("prep_b.json", (40, 10.0))):
        shards = [{"shard": "shard_00000", "computed": 90, "wall_s": 60.0}, {"shard": "shard_00001", "computed": last[0], "wall_s": last[1]}]
        (root / name).write_text(json.dumps({"precompute": shards}))
    index = {"files": {"prep_a.json": {"committed_in": "1111111aaaa", "date": "2026-11-01", "card": "NVIDIA H100 80GB HBM3"},
                       "prep_b.json": {"committed_in": "2222222bbbb", "date": "2026-11-02", "card": "NVIDIA H100 80GB HBM3",
                                       "stale_since": [{"commit": "3333333cccc", "what": "a faster precompute"}]}}}  # fmt: skip
    (root / "provenance.json").write_text(json.dumps(index))
    return root


SOURCES = {"train": "train.json", "cached_case": "cached", "live_case": "live", "precompute": ("prep_a.json", "prep_b.json")}


def test_docs_rates_are_read_from_the_results_files(tmp_path):
    rates = docs_rates(_results_dir(tmp_path / "results"), SOURCES)
    # 2 x 2 x 2 = 8 samples per step; the first step (warm-up) left out: cached 2, 4, 3 s/it -> median 3
    assert rates["cached"].per_gpu == 8 / (3.0 * 2) and rates["cached"].bounds == (8 / (4.0 * 2), 8 / (2.0 * 2))
    assert rates["live"].per_gpu == 8 / (6.0 * 2) and rates["live"].bounds == (8 / (8.0 * 2), 8 / (4.0 * 2))
    # the last (compiled) shard of each preparation: 3.0 and 4.0 samples/s -> median 3.5
    assert rates["precompute"].per_gpu == 3.5 and rates["precompute"].bounds == (3.0, 4.0)
    assert all(r.origin == "docs" for r in rates.values())
    cached = rates["cached"].source
    assert "docs/results/train.json (commit abcdef0, 2026-12-10" in cached and "NVIDIA H200" in cached and "3 steps" in cached
    pre = rates["precompute"].source
    assert "prep_a.json (tree committed in 1111111, 2026-11-01" in pre and "prep_b.json (tree committed in 2222222" in pre
    assert "STALE: 3333333 changed its code path" in pre and "STALE" not in cached
    with pytest.raises(UserError, match="no successful case 'other'"):
        docs_rates(tmp_path / "results", {**SOURCES, "live_case": "other"})
    with pytest.raises(UserError, match="missing.json"):
        docs_rates(tmp_path / "results", {**SOURCES, "train": "missing.json"})


def test_committed_default_rates_come_from_their_json():
    """The defaults are whatever the committed files hold (recomputed here from the raw JSON), with commit and date."""
    rates = docs_rates()
    run = json.loads((REPO / "docs/results" / dc.DOCS_SOURCES["train"]).read_text())
    cases = {c["name"]: c for c in run["cases"]}
    for kind in ("cached", "live"):
        c = cases[dc.DOCS_SOURCES[f"{kind}_case"]]
        steps = [s["s_per_it"] for s in c["steps"][1:]]
        per_step = c["per_device_batch"] * c["grad_accum"] * c["gpus"]
        assert rates[kind].per_gpu == pytest.approx(per_step / (statistics.median(steps) * c["gpus"]))
        assert rates[kind].bounds == pytest.approx((per_step / (max(steps) * c["gpus"]), per_step / (min(steps) * c["gpus"])))
        assert f"docs/results/{dc.DOCS_SOURCES['train']}" in rates[kind].source and "commit" in rates[kind].source
    last = [json.loads((REPO / "docs/results" / f).read_text())["precompute"][-1] for f in dc.DOCS_SOURCES["precompute"]]
    assert rates["precompute"].per_gpu == pytest.approx(statistics.median(s["computed"] / s["wall_s"] for s in last))


def test_break_even_arithmetic_and_its_range():
    rates = {"precompute": Rate(2.0, "p", low=1.5, high=2.5), "cached": Rate(1.0, "c", low=0.8, high=1.2),
             "live": Rate(0.5, "l", low=0.4, high=0.6)}  # fmt: skip
    # (1/2 s of precompute per sample) / (1/0.5 - 1/1.0 extra GPU-s per sample live) = 0.5 epochs
    want = 0.5
    for samples, gpus in ((612_492, 8), (10_000, 16), (612_492, 1)):
        d = Decision(samples, gpus, 1, 1, rates)
        assert d.break_even_epochs == pytest.approx(want)
        assert d.precompute_s / (d.epoch_s("live") - d.epoch_s("cached")) == pytest.approx(want)
        assert d.precompute_gpu_hours == pytest.approx(samples / 2.0 / 3600)
    lo, hi = Decision(1000, 8, 1, 1, rates).break_even_range
    # fastest precompute, largest gap: (1/2.5) / (1/0.4 - 1/1.2) = 0.4 / (2.5 - 0.8333) = 0.24
    # slowest precompute, smallest gap: (1/1.5) / (1/0.6 - 1/0.8) = 0.6667 / 0.41667 = 1.6
    assert lo == pytest.approx(0.24) and hi == pytest.approx(1.6)
    one, three = Decision(1000, 8, 0.25, 1, rates), Decision(1000, 8, 1, 3, rates)
    assert one.winner() == "live" and three.winner() == "cache"  # 0.25 pass < 0.5 < 3 passes (runs count as epochs)
    assert three.plan_s()["cache"] == pytest.approx(three.precompute_s + 3 * three.epoch_s("cached"))
    assert any("inside the break-even range" in line for line in Decision(1000, 8, 1, 1, rates).lines())
    assert not any("inside the break-even range" in line for line in three.lines())
    assert any("break-even         0.50 epochs (range 0.24-1.60" in line for line in three.lines())
    # ranges that overlap: within them live may be as fast as cached
    close = {**rates, "live": Rate(0.9, "l", low=0.8, high=1.1)}
    assert math.isinf(Decision(1000, 8, 1, 1, close).break_even_range[1])
    never = Decision(100, 8, 5, 1, {**rates, "live": Rate(1.01, "x")})
    assert math.isinf(never.break_even_epochs) and never.winner() == "live"
    assert any("never" in line for line in never.lines())


def test_estimate_r2r_ce_prints_break_even_and_both_epoch_times(tmp_path):
    """The acceptance command (from a folder without results/: the committed docs/results rates are used and named)."""
    out = _estimate(tmp_path, "--config", str(R2R), "--samples", "612492", "--epochs", "1")
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    d = Decision(612_492, 8, 1, 1, docs_rates())
    assert "3.924 TB" in lines["total"]  # crop frames (the upstream preset): 1564 x 2048 bf16 per sample
    assert f"{d.precompute_gpu_hours:,.1f} GPU-hours = {d.precompute_s / 3600:,.1f} h on 8 GPUs" in lines["precompute"]
    assert "docs/results/" in lines["precompute"] and "range" in lines["precompute"]
    assert f"{d.epoch_s('cached') / 3600:,.1f} h on 8 GPUs" in lines["epoch, cached"] and "cached_zero2_g4" in lines["epoch, cached"]
    assert f"{d.epoch_s('live') / 3600:,.1f} h on 8 GPUs" in lines["epoch, live VGGT"] and "live_zero2_g4" in lines["epoch, live VGGT"]
    lo, hi = d.break_even_range
    assert f"break-even         {d.break_even_epochs:.2f} epochs (range {lo:.2f}-{hi:.2f}" in out
    assert "1 epoch(s) on 8 GPUs" in lines["your plan"] and f"{d.winner()} saves" in lines["your plan"]
    out3 = _estimate(tmp_path, "--config", str(R2R), "--samples", "612492", "--epochs", "7", "--gpus", "16")
    assert "on 16 GPUs" in out3 and "-> cache saves" in out3  # beyond the range's top: the cache wins


def test_estimate_with_fp8_cache_is_about_2_65_tb_pad_and_1_97_tb_crop(tmp_path):
    config = yaml.safe_load(R2R.read_text())
    config["cache"]["dtype"] = "float8_e4m3"
    (tmp_path / "fp8.yaml").write_text(yaml.safe_dump(config))
    out = _estimate(tmp_path, "--config", "fp8.yaml", "--samples", "612492")
    assert "1564 x 2048 float8_e4m3 + 1564 float32 row scales = 3,209,328 B" in out
    assert "1,965,687,725,376 B = 1.966 TB" in out
    config["spatial"]["preprocess"] = "pad"
    (tmp_path / "fp8_pad.yaml").write_text(yaml.safe_dump(config))
    out = _estimate(tmp_path, "--config", "fp8_pad.yaml", "--samples", "612492")
    assert "2116 x 2048 float8_e4m3 + 2116 float32 row scales = 4,342,032 B" in out
    assert "2,659,459,863,744 B = 2.659 TB" in out


def _metrics(path: Path, samples_per_s: list[float], world: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": i + 1, "s_per_it": 1.0, "data_wait_s": 0.0, "samples_per_s": v, "world_size": world}
            for i, v in enumerate(samples_per_s)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _workspace(tmp_path: Path, config: dict, *, feature_shape, live=True) -> Path:
    """results/ as the workflow writes it: precompute stats, a manifest, a run and (maybe) its _live twin."""
    r = tmp_path / "results"
    (r / "benchmark" / "precompute").mkdir(parents=True)
    for i, (computed, wall) in enumerate(((30, 10.0), (50, 30.0))):
        (r / "benchmark" / "precompute" / f"shard_{i:05d}.stats.json").write_text(json.dumps({"computed": computed, "wall_s": wall}))
    (r / "cache").mkdir()
    (r / "cache" / "manifest.json").write_text(json.dumps({"feature_shape": feature_shape}))
    run = config["train"]["run"]
    _metrics(r / "train" / run / "metrics.jsonl", [9.0, 4.0, 4.4, 4.2], world=2)
    (r / "train" / run / "config.yaml").write_text(yaml.safe_dump(config))
    if live:
        _metrics(r / "train" / f"{run}_live" / "metrics.jsonl", [1.0, 3.0, 3.2], world=2)
        (r / "train" / f"{run}_live" / "config.live.yaml").write_text(yaml.safe_dump(config))
    return r


def test_workspace_measurements_are_used_and_labelled(tmp_path):
    from vlnflow.config import load_config

    config = load_config(REPO / "config.yaml")
    results = _workspace(tmp_path, config, feature_shape=DEMO_SHAPE)  # the demo's tiny VGGT at 56 px
    rates, notes = choose_rates(config, results)
    assert notes == []
    assert rates["precompute"].per_gpu == pytest.approx(80 / 40.0) and "2 precompute jobs" in rates["precompute"].source
    assert rates["precompute"].bounds == pytest.approx((50 / 30.0, 30 / 10.0))  # the slowest and fastest job
    assert rates["cached"].per_gpu == pytest.approx(4.3 / 2) and rates["live"].per_gpu == pytest.approx(3.0 / 2)
    # ranges over the steps after the first (compilation, warm-up): cached 4.0, 4.4, 4.2; live 3.0, 3.2 (/ 2 GPUs)
    assert rates["cached"].bounds == pytest.approx((2.0, 2.2)) and rates["live"].bounds == pytest.approx((1.5, 1.6))
    assert all(r.origin == "workspace" and "measured here" in r.source for r in rates.values())
    assert choose_rates(config, results, use_workspace=False)[0] == docs_rates()
    assert choose_rates(config, results, precompute_override=3.0)[0]["precompute"] == Rate(3.0, "--samples-per-s", "option")

    d = Decision(1000, 1, 1, 1, rates)
    assert d.break_even_epochs == pytest.approx((1 / 2.0) / (1 / 1.5 - 1 / 2.15))
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    out = _estimate(tmp_path, "--samples", "1000")
    assert f"break-even         {d.break_even_epochs:.2f} epochs" in out and out.count("measured here") == 3


def test_measurements_of_another_shape_or_without_a_live_twin_are_left_out(tmp_path):
    from vlnflow.config import load_config

    demo, r2r = load_config(REPO / "config.yaml"), load_config(R2R)
    # the demo's tiny models measured under the R2R config's run name: nothing says anything about VGGT-1B + 7B
    demo_as_r2r = dict(demo, train=dict(demo["train"], run=r2r["train"]["run"]))
    results = _workspace(tmp_path / "a", demo_as_r2r, feature_shape=DEMO_SHAPE)
    rates, notes = choose_rates(r2r, results)
    assert rates == docs_rates()
    assert any(f"their cache holds {DEMO_SHAPE}, the config 1564 x 2048" in n for n in notes)
    assert any("trained another model or feature shape" in n for n in notes)

    lone = _workspace(tmp_path / "b", demo, feature_shape=DEMO_SHAPE, live=False)
    rates, notes = choose_rates(demo, lone)
    assert rates["cached"].origin == rates["live"].origin == "docs" and rates["precompute"].origin == "workspace"
    assert any("no live twin" in n for n in notes)
    (tmp_path / "b" / "config.yaml").write_text((REPO / "config.yaml").read_text())
    out = _estimate(tmp_path / "b", "--samples", "1000")
    assert "note               the rates come from different places (docs, workspace)" in out
    assert "left out           only the cached run" in out


def test_benchmark_report_decision_applies_the_same_checks(tmp_path):
    import pandas as pd

    from vlnflow.config import load_config
    from vlnflow.report.cache_decision import cache_decision_markdown
    from vlnflow.report.report import STAGES
    from vlnflow.report.sources import read_metrics

    table = pd.DataFrame([{"stage": s, "jobs": 0, "samples_per_s": math.nan} for s in STAGES])
    md = cache_decision_markdown(table, {}, 612_492, 8, "config benchmark.projected_samples")
    d = Decision(612_492, 8, 1, 1, docs_rates())
    assert "## Cache or live VGGT" in md and f"break-even         {d.break_even_epochs:.2f} epochs" in md
    assert md.count("docs/results/") >= 3 and "measured:" not in md

    config = load_config(REPO / "config.yaml")
    results = _workspace(tmp_path, config, feature_shape=DEMO_SHAPE)
    run = config["train"]["run"]
    run_dirs = {"cached": results / "train" / run, "live": results / "train" / f"{run}_live"}
    runs = {"cached features": read_metrics(run_dirs["cached"] / "metrics.jsonl"), "live VGGT": read_metrics(run_dirs["live"] / "metrics.jsonl")}
    table.loc[table.stage == "precompute", ["jobs", "samples_per_s"]] = [2, 2.0]
    inputs = {"manifest_json": str(results / "cache" / "manifest.json"), "run_dirs": run_dirs,
              "precompute_stats": sorted(str(p) for p in (results / "benchmark" / "precompute").glob("*.stats.json"))}
    md = cache_decision_markdown(table, runs, 1000, 8, "x", config=config, **inputs)
    assert md.count("measured:") == 3 and f"{(1 / 2.0) / (1 / 1.5 - 1 / 2.15):.2f} epochs" in md and "left out" not in md
    # without the config nothing measured can be checked, so nothing measured is used, and the section says so
    md = cache_decision_markdown(table, runs, 1000, 8, "x", **inputs)
    assert "measured:" not in md and "no config given" in md
    # the R2R config (VGGT-1B, 7B): the demo's cache and runs are left out, as choose_rates leaves them out
    md = cache_decision_markdown(table, runs, 1000, 8, "x", config=load_config(R2R), **inputs)
    assert "measured:" not in md and f"their cache holds {DEMO_SHAPE}, the config 1564 x 2048" in md
    assert "trained another model or feature shape" in md
