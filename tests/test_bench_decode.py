"""bench/bench_decode.py (issue 21 item 4): frames/s per loader worker for PNG and JPEG, crop and pad, and the
workers a job needs; its smoke mode runs here in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("bench_decode", REPO / "bench" / "bench_decode.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_unique_frames_per_sample_of_an_r2r_like_shard():
    """~3 unique frames per sample at batch 16 (9-frame histories of consecutive steps share most frames)."""
    assert 2.0 < bench.unique_frames_per_sample(16) < 4.0
    assert bench.unique_frames_per_sample(1) > bench.unique_frames_per_sample(16)  # alone, a sample shares nothing


def test_quick_run_writes_every_case(tmp_path):
    out = tmp_path / "decode.json"
    assert bench.main(["--quick", "--out", str(out), "--encoder-samples-per-s", "10,20"]) == 0
    report = json.loads(out.read_text())
    cases = {(c["format"], c["preprocess"]) for c in report["cases"]}
    assert cases == {("png", "crop"), ("png", "pad"), ("jpeg", "crop"), ("jpeg", "pad")}
    for case in report["cases"]:
        assert case["frames_per_s"] > 0 and case["kb_per_file"] > 0 and set(case["loader_frames_per_s"]) == {"1"}
        assert 1 <= case["workers_needed"]["10 samples/s"] <= case["workers_needed"]["20 samples/s"]
    assert report["auto_workers"]["16 cores, 8 jobs"] == 1 and report["provenance"]["versions"]["torch"]
