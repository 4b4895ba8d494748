"""bench/bench_precompute.py without a GPU: its arguments, the config it writes, and its summary arithmetic.
(The end-to-end smoke run, `--tiny --device cpu`, takes a minute of Snakemake start-up: run by hand.)"""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO
from vlnflow.config import load_config

spec = importlib.util.spec_from_file_location("bench_precompute", REPO / "bench" / "bench_precompute.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_defaults_are_real_size_and_pass_the_config_schema(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = bench.parse_args([])
    assert (args.preset, args.image_size, args.history, args.batch_size, args.size) == ("vggt-1b", 644, 8, 16, (640, 480))
    assert args.out == str(tmp_path / "bench_precompute.json")
    config = load_config(REPO / "config.yaml", bench.overrides(args, "data/demo/episodes"))
    assert config["spatial"]["preset"] == "vggt-1b" and config["spatial"]["device"] == "cuda"
    assert config["history"]["max_frames"] + 1 == 9 and config["cache"]["spot_check"] == 1


def test_tiny_mode_and_bad_arguments(capsys):
    args = bench.parse_args(["--tiny", "--device", "cpu", "--out", "x.json"])
    assert (args.preset, args.image_size, args.size, args.device, args.out) == ("tiny", 56, (96, 72), "cpu", "x.json")
    for bad in (["--size", "640"], ["--image-size", "640"], ["--episodes", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "--image-size must be a multiple of 14" in capsys.readouterr().err


def test_summary_compares_job_rates_with_the_encoder_alone():
    split = {"data_wait": 1.0, "compute": 2.0, "write_wait": 3.0, "device_busy": 40.0, "writer_hdf5": 5.0}
    jobs = [{"shard": "shard_00000", "computed": 300, "wall_s": 60.0, "loop_s": 50.0, "setup_s": 10.0, "time_split_s": split},
            {"shard": "shard_00001", "computed": 100, "wall_s": 20.0, "loop_s": 20.0, "setup_s": 0.0, "time_split_s": split}]  # fmt: skip
    s = bench.summarise(jobs, {"samples_per_s": 8.0})
    assert s["job_samples_per_s"] == pytest.approx(5.0) and s["job_loop_samples_per_s"] == pytest.approx(400 / 70)
    assert s["ratio_job_wall"] == pytest.approx(5 / 8) and s["ratio_job_loop"] == pytest.approx(400 / 70 / 8)
    assert s["time_split_s"]["device_busy"] == 80.0 and s["job_setup_s"] == 10.0
    assert s["last_job"] == "shard_00001" and s["ratio_last_job_loop"] == pytest.approx(5 / 8)
