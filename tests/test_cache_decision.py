"""Cache or live (issue 14): `vlnflow cache estimate` prints precompute GPU-hours, both epoch times and the
break-even epochs, from this workspace's measurements when they fit the config, else docs/benchmarks.md's,
each labelled; the benchmark report shows the same lines."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlnflow.cache import decision as dc
from vlnflow.cache.decision import Decision, Rate, choose_rates, docs_rates

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


def test_docs_rates_reproduce_the_measured_table():
    rates = docs_rates()
    # per-GPU rates of the 4x H100 rows: 32 samples per step / (s/it x 4 GPUs)
    assert rates["cached"].per_gpu == pytest.approx(32 / (8.06 * 4)) and rates["live"].per_gpu == pytest.approx(32 / (8.87 * 4))
    assert rates["precompute"].per_gpu == 6.4 and all(r.origin == "docs" and "docs/benchmarks.md" in r.source for r in rates.values())


def test_break_even_is_precompute_time_over_the_live_extra_and_independent_of_size_and_gpus():
    rates = docs_rates()
    want = (1 / 6.4) / (8.87 * 4 / 32 - 8.06 * 4 / 32)  # s/sample of precompute over the extra GPU-s/sample live
    for samples, gpus in ((612_492, 8), (10_000, 16), (612_492, 1)):
        d = Decision(samples, gpus, 1, 1, rates)
        assert d.break_even_epochs == pytest.approx(want)
        assert d.precompute_s / (d.epoch_s("live") - d.epoch_s("cached")) == pytest.approx(want)
        assert d.precompute_gpu_hours == pytest.approx(samples / 6.4 / 3600)
    assert 1.5 < want < 1.6
    one, three = Decision(612_492, 8, 1, 1, rates), Decision(612_492, 8, 1, 3, rates)
    assert one.winner() == "live" and three.winner() == "cache"  # 1 pass < 1.54 < 3 passes (runs count as epochs)
    assert three.plan_s()["cache"] == pytest.approx(three.precompute_s + 3 * three.epoch_s("cached"))
    never = Decision(100, 8, 5, 1, {**rates, "live": Rate(rates["cached"].per_gpu * 1.01, "x")})
    assert math.isinf(never.break_even_epochs) and never.winner() == "live"
    assert any("never" in line for line in never.lines())


def test_estimate_r2r_ce_prints_break_even_and_both_epoch_times(tmp_path):
    """The acceptance command (from a folder without results/: the docs figures are used and named)."""
    out = _estimate(tmp_path, "--config", str(R2R), "--samples", "612492", "--epochs", "1")
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "5.309 TB" in lines["total"]
    assert "26.6 GPU-hours = 3.3 h on 8 GPUs" in lines["precompute"] and "docs/benchmarks.md" in lines["precompute"]
    samples_h = lambda s_per_it: 612492 / (32 / (s_per_it * 4) * 8) / 3600  # noqa: E731
    assert f"{samples_h(8.06):,.1f} h on 8 GPUs" in lines["epoch, cached"] and "8.06 s/it" in lines["epoch, cached"]
    assert f"{samples_h(8.87):,.1f} h on 8 GPUs" in lines["epoch, live VGGT"] and "8.87 s/it" in lines["epoch, live VGGT"]
    assert "break-even         1.54 epochs" in out
    assert "1 epoch(s) on 8 GPUs" in lines["your plan"] and "live saves" in lines["your plan"] and "5.31 TB of storage" in lines["your plan"]
    out3 = _estimate(tmp_path, "--config", str(R2R), "--samples", "612492", "--epochs", "2", "--gpus", "16")
    assert "on 16 GPUs" in out3 and "-> cache saves" in out3


def test_estimate_with_fp8_cache_is_about_2_65_tb(tmp_path):
    config = yaml.safe_load(R2R.read_text())
    config["cache"]["dtype"] = "float8_e4m3"
    (tmp_path / "fp8.yaml").write_text(yaml.safe_dump(config))
    out = _estimate(tmp_path, "--config", "fp8.yaml", "--samples", "612492")
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
    assert rates["cached"].per_gpu == pytest.approx(4.3 / 2) and rates["live"].per_gpu == pytest.approx(3.0 / 2)
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
    assert any(f"their cache holds {DEMO_SHAPE}, the config 2116 x 2048" in n for n in notes)
    assert any("trained another model or feature shape" in n for n in notes)

    lone = _workspace(tmp_path / "b", demo, feature_shape=DEMO_SHAPE, live=False)
    rates, notes = choose_rates(demo, lone)
    assert rates["cached"].origin == rates["live"].origin == "docs" and rates["precompute"].origin == "workspace"
    assert any("no live twin" in n for n in notes)
    (tmp_path / "b" / "config.yaml").write_text((REPO / "config.yaml").read_text())
    out = _estimate(tmp_path / "b", "--samples", "1000")
    assert "note               the rates come from different places (docs, workspace)" in out
    assert "left out           only the cached run" in out


def test_benchmark_report_shows_the_decision(tmp_path):
    import pandas as pd

    from vlnflow.report.cache_decision import cache_decision_markdown
    from vlnflow.report.report import STAGES

    table = pd.DataFrame([{"stage": s, "jobs": 0, "samples_per_s": math.nan} for s in STAGES])
    md = cache_decision_markdown(table, {}, 612_492, 8, "config benchmark.projected_samples")
    assert "## Cache or live VGGT" in md and "break-even         1.54 epochs" in md and md.count("docs/benchmarks.md") == 3
    table.loc[table.stage == "precompute", ["jobs", "samples_per_s"]] = [3, 2.0]
    runs = {"cached features": pd.DataFrame({"s_per_it": [1.0, 1.0], "samples_per_s": [4.0, 4.0], "data_wait_s": [0, 0], "world_size": [2, 2]}),
            "live VGGT": pd.DataFrame({"s_per_it": [1.0], "samples_per_s": [3.0], "data_wait_s": [0], "world_size": [2]})}  # fmt: skip
    md = cache_decision_markdown(table, runs, 1000, 8, "x")
    assert md.count("measured:") == 3 and f"{(1 / 2.0) / (1 / 1.5 - 1 / 2.0):.2f} epochs" in md
    assert dc.DOCS_PACKED_CACHED_SAMPLES_PER_S_PER_GPU == 1.153
