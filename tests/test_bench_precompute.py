"""bench/bench_precompute.py (issue 21): its arguments, the config it writes, the data plan, the summary arithmetic
and the budget sizing; and the whole bench end to end in its CPU smoke mode (`--quick`)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO
from vlnflow.config import load_config
from vlnflow.data.shards import shard_index

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("bench_precompute", REPO / "bench" / "bench_precompute.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SUMMARY_FIELDS = {"card", "preprocess", "samples", "loop_vs_encoder", "job_vs_encoder", "recompiles_after_warmup",
                  "setup_warm_s", "setup_cold_s", "validate_gpu_share", "r2r_gpu_hours"}  # fmt: skip


def test_defaults_are_real_size_and_pass_the_config_schema(tmp_path):
    args = bench.parse_args([])
    assert (args.preset, args.image_size, args.batch_size, args.size, args.samples) == ("vggt-1b", 644, 16, (640, 480), 2000)
    assert args.cases == ["crop", "pad"] and args.shapes == "dynamic" and args.budget_s == 480
    for case in args.cases:
        config = load_config(REPO / "config.yaml", bench.overrides(args, tmp_path / "data", tmp_path / "w.safetensors", case))
        s = config["spatial"]
        assert (s["preset"], s["preprocess"], s["device"], s["frame_size"], s["compile_shapes"]) == ("vggt-1b", case, "cuda", [640, 480], "dynamic")
        assert config["shards"]["count"] == 2 and config["history"]["max_frames"] == 8
        assert config["cache"]["compile_cache"] == "results/compile_cache" and config["cache"]["loader_workers"] == "auto"


def test_quick_mode_and_bad_arguments(capsys):
    args = bench.parse_args(["--quick", "--cases", "pad"])
    assert (args.preset, args.device, args.compile, args.size, args.cases) == ("tiny", "cpu", "off", (96, 72), ["pad"])
    for bad in (["--size", "640"], ["--image-size", "640"], ["--cases", "square"], ["--samples", "5"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "--image-size must be a multiple of 14" in capsys.readouterr().err


def test_episode_plan_puts_one_short_episode_in_the_cold_shard_and_r2r_lengths_in_the_real_one():
    cold, real = bench.episode_plan(2000)
    assert len(cold) == 1 and cold[0][1] == 10 and shard_index(cold[0][0], 2) == 0
    assert all(shard_index(e, 2) == 1 for e, _ in real)
    lengths = [n for _, n in real]
    assert sum(lengths) >= 2000 and sum(lengths) - lengths[-1] < 2000
    assert min(lengths) == 10 and max(lengths) == 120 and all(10 <= n <= 120 for n in lengths)


def _job(setup, computed, job_wall, steady_rate, recompiles=0, warm=True):
    return {"setup_s": setup, "computed": computed, "job_wall_s": job_wall, "steady_samples_per_s": steady_rate, "loop_s": job_wall - setup,
            "recompiles_after_warmup": recompiles, "gpu_name": "NVIDIA H100 80GB HBM3", "compile": {"cache_warm": warm}}  # fmt: skip


def test_summary_fields_and_projections():
    cold, warm = _job(60.0, 10, 61.0, 0.0, warm=False), _job(10.0, 2000, 250.0, 10.0, recompiles=1)
    spot = {"samples_checked": 32, "timing": {"setup_s": 12.0, "steady_s_per_sample": 0.1, "compute_s": 3.5}}
    alone = {"samples_per_s": 10.5, "identical_to_job": True}
    s = bench.summarise("crop", cold, warm, spot, alone, k_r2r=4)
    assert SUMMARY_FIELDS <= set(s) and s["card"] == "NVIDIA H100 80GB HBM3" and s["preprocess"] == "crop"
    assert s["samples"] == 2000 and s["recompiles_after_warmup"] == 1
    assert s["loop_vs_encoder"] == pytest.approx(10 / 10.5) and s["job_vs_encoder"] == pytest.approx(2000 / 250 / 10.5)
    assert (s["setup_warm_s"], s["setup_cold_s"]) == (10.0, 60.0)
    precompute_s = 612_492 / (2000 / 250)
    assert s["r2r_gpu_hours"] == pytest.approx(precompute_s / 3600)
    assert s["validate_gpu_share"] == pytest.approx((12.0 + 256 * 4 * 0.1) / precompute_s)
    assert s["validate_projection"]["old_design_gpu_s"] == pytest.approx(256 * (12.0 + 0.4))
    g = bench.goals(s)
    assert g["loop_vs_encoder >= 0.90"] and not g["job_vs_encoder >= 0.85"] and not g["recompiles_after_warmup == 0"]
    assert g["setup_warm_s <= 15"] and g["validate_gpu_share <= 0.05"]


def test_later_cases_are_cut_to_the_time_left():
    args = bench.parse_args([])
    crop_tokens = bench.tokens("vggt-1b", 644, (640, 480), "crop")
    assert crop_tokens == 35 * 46 and bench.tokens("vggt-1b", 644, (640, 480), "pad") == 46 * 46
    assert bench.next_samples(args, [], "crop", 480) == 2000
    done = [{"cost": {"fixed_s": 60.0, "per_sample_s": 0.1, "tokens": crop_tokens}}]
    fit = bench.next_samples(args, done, "pad", 160.0)
    assert fit == int(100 / (0.1 * (2116 / 1610) ** 1.2))
    assert bench.next_samples(args, done, "pad", 30.0) == args.min_samples
    assert bench.next_samples(args, done, "pad", 10_000.0) == args.samples


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "precompute_cpu.json"
    assert bench.main(["--quick", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert [s["preprocess"] for s in report["summary"]] == ["crop", "pad"]
    for case in ("crop", "pad"):
        result = report["cases"][case]
        s = result["summary"]
        assert SUMMARY_FIELDS <= set(s) and s["card"] == "cpu" and s["samples"] >= 20
        assert s["recompiles_after_warmup"] == 0 and s["loop_vs_encoder"] > 0 and s["job_vs_encoder"] > 0
        assert s["identical_to_encoder"], "the job's rows equal encode_indexed alone on the same batches"
        assert result["validation_ok"] and result["spot_check"]["samples_checked"] == 4  # 2 shards x spot_check 2
        assert [r["command"] for r in result["snakemake"]] == [
            "snakemake results/shards/shards.json -j 1", "snakemake results/cache/shard_00000.h5 -j 1", "snakemake precompute_all -j 1"]
        assert result["cold_job"]["shard"] == "shard_00000" and result["warm_job"]["shard"] == "shard_00001"
        assert set(result["warm_job"]["setup_split_s"]) == {"imports", "weights", "open", "first_data", "first_batch", "later_warmup"}
        assert set(result["warm_job"]["weights_split_s"]) == {"device_init", "build", "read", "kernels"}
        assert sum(result["warm_job"]["weights_split_s"].values()) <= result["warm_job"]["setup_split_s"]["weights"]
    assert report["provenance"]["versions"]["torch"] and report["data"]["samples"] > 40
