"""SpatialEncoder public API: from_config, shapes, fingerprint, errors, and the bench smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlnflow.config import load_config
from vlnflow.errors import UserError
from vlnflow.spatial import ENCODER_CODE_VERSION, SpatialEncoder, load_frame
from vlnflow.spatial.init import build_aggregator, init_random_
from vlnflow.spatial.aggregator import PRESETS
from vlnflow.spatial.fingerprint import spatial_output
from vlnflow.spatial.fingerprint import encoder_fingerprint

REPO = Path(__file__).resolve().parents[1]


def spatial(**kw):
    return {"preset": "tiny", "weights": None, "seed": 0, "image_size": 56, "layer": -2,
            "reference_frame": "last", "dtype": "bfloat16", "device": "cpu", "batch_size": 4, **kw}


def test_from_repo_config_and_shapes():
    cfg = load_config(REPO / "config.yaml", overrides={"spatial": {"device": "cpu"}})
    enc = SpatialEncoder.from_config(cfg["spatial"])
    # the demo crops 640x480 frames at 84: a 56x84 input, 4x6 patches, all of them whole merge blocks
    assert enc.geometry.vggt_hw == (56, 84) and enc.grid == (4, 6) and enc.feature_shape == (24, 64)
    assert enc.compute_dtype == torch.float32  # CPU always computes in float32
    out = enc.encode(torch.rand(2, 3, 3, 56, 84))
    assert out.shape == (2, *enc.feature_shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_real_size_feature_shape():
    """640x480 frames at 644: pad keeps the 46x46 square, crop the 34x46 merge blocks of its 35x46 grid."""
    assert spatial_output({"preset": "vggt-1b", "image_size": 644, "preprocess": "pad"}) == ((46, 46), 2048)
    assert spatial_output({"preset": "vggt-1b", "image_size": 644, "preprocess": "crop", "frame_size": [640, 480]}) == ((34, 46), 2048)
    assert spatial_output({"preset": "tiny", "image_size": 56}) == ((4, 4), 64)


def test_frames_from_disk_encode(tmp_path):
    from PIL import Image

    paths = []
    for i in range(3):
        p = tmp_path / f"step_{i}.png"
        Image.new("RGB", (64, 48), (40 * i, 80, 120)).save(p)
        paths.append(p)
    frames = torch.stack([load_frame(p, 56) for p in paths])[None]
    out = SpatialEncoder.from_config(spatial()).encode(frames)
    assert out.shape == (1, 16, 64)


FINGERPRINT_SNIPPET = """
import sys, json
from vlnflow.spatial import SpatialEncoder
print(SpatialEncoder.from_config(json.loads(sys.argv[1])).fingerprint())
"""


def test_fingerprint_stable_across_processes_and_sensitive_to_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("VLNFLOW_CACHE_DIR", str(tmp_path / "digests"))
    base = SpatialEncoder.from_config(spatial())
    fp = base.fingerprint()
    other = subprocess.run([sys.executable, "-c", FINGERPRINT_SNIPPET, json.dumps(spatial())],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert other == fp and len(fp) == 64
    fields = base.fingerprint_fields()
    assert fields["code_version"] == ENCODER_CODE_VERSION
    assert fields["weights"] == "random:tiny:seed=0" and fields["layer"] == 1
    changed = [spatial(seed=1), spatial(layer=0), spatial(reference_frame="first"), spatial(image_size=70)]
    prints = {SpatialEncoder.from_config(c).fingerprint() for c in changed}
    assert fp not in prints and len(prints) == len(changed)
    # layer -2 and its positive index are the same setting
    assert SpatialEncoder.from_config(spatial(layer=1)).fingerprint() == fp
    # batch size and execution choices do not change the features
    assert SpatialEncoder.from_config(spatial(batch_size=9)).fingerprint() == fp

    # loaded weights: content digest, the same from .pt and .safetensors
    state = {"aggregator." + k: v for k, v in init_random_(build_aggregator(PRESETS["tiny"]), 5).state_dict().items()}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_file(state, str(tmp_path / "a" / "model.safetensors"))
    torch.save(state, tmp_path / "b" / "model.pt")
    fa = SpatialEncoder.from_config(spatial(weights=str(tmp_path / "a")))
    fb = SpatialEncoder.from_config(spatial(weights=str(tmp_path / "b")))
    assert fa.fingerprint() == fb.fingerprint() != fp
    assert fa.fingerprint_fields()["weights"].startswith("sha256:")

    # the settings-only fingerprint (Snakemake parse time, training) is the same string
    for cfg in [spatial(), spatial(layer=1), spatial(reference_frame="first"), spatial(weights=str(tmp_path / "a"))]:
        assert encoder_fingerprint(cfg) == SpatialEncoder.from_config(cfg).fingerprint()
    # ...and computes the weights digest itself when the load-time one was not remembered
    monkeypatch.setenv("VLNFLOW_CACHE_DIR", str(tmp_path / "fresh"))
    assert encoder_fingerprint(spatial(weights=str(tmp_path / "b"))) == fa.fingerprint()


def test_bad_settings_name_the_setting():
    with pytest.raises(UserError, match="spatial.preset"):
        SpatialEncoder.from_config(spatial(preset="huge"))
    with pytest.raises(UserError, match="spatial.layer=5"):
        SpatialEncoder.from_config(spatial(layer=5))
    with pytest.raises(UserError, match="spatial.image_size"):
        SpatialEncoder.from_config(spatial(image_size=50))
    with pytest.raises(UserError, match="spatial.reference_frame"):
        SpatialEncoder.from_config(spatial(reference_frame="middle"))
    with pytest.raises(UserError, match="spatial.weights"):
        SpatialEncoder.from_config(spatial(weights="/nonexistent/vggt"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="spatial.device"):
            SpatialEncoder.from_config(spatial(device="cuda"))
    enc = SpatialEncoder.from_config(spatial())
    with pytest.raises(UserError, match=r"frames must have shape \(B, S, 3, H, W\)"):
        enc.encode(torch.rand(2, 3, 56, 56))
    with pytest.raises(UserError, match="multiples of 14"):
        enc.encode(torch.rand(1, 2, 3, 50, 56))
    with pytest.raises(UserError, match="float images"):
        enc.encode(torch.zeros(1, 2, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(UserError, match="global attention backend"):
        enc.configure(global_backend="dense")


def test_bench_smoke_on_cpu(tmp_path):
    """bench/bench_spatial.py runs end to end with the tiny preset and writes its JSON."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_spatial.py"), "--preset", "tiny", "--image-size", "56",
         "--device", "cpu", "--batch-sizes", "1,2", "--combos", "eager:prefix:default", "--indexed-batch-sizes", "4",
         "--stream-samples", "1", "--iters", "1", "--profile", "--out-json", str(out)],
        capture_output=True, text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    cases = [r["case"] for r in report["rows"]]
    assert cases[:4] == ["matmul", "check", "stream_all", "stream_kept"]
    # crop frames (the default first preparation) drive every row; pad repeats the check and the indexed row
    assert cases.count("batched") == 2 and cases.count("indexed") == 2 and cases.count("batched_same_samples") == 1
    assert report["preprocess"] == "crop" and report["input_hw"] == [42, 56] and report["grid"] == [3, 4]
    pad = [r for r in report["rows"] if r.get("preprocess") == "pad"]
    assert [r["case"] for r in pad] == ["check", "indexed"] and pad[0]["input_hw"] == [56, 56]
    prov = report["provenance"]
    assert prov["card"] == "cpu" and "bench_spatial.py" in prov["command"] and prov["commit_source"] in ("git", "env", "unknown")
    assert prov["repetitions"]["indexed eager/prefix/default/sdpa B=4"] == 1
    indexed = next(r for r in report["rows"] if r["case"] == "indexed")
    # executed FLOPs: DINOv2 once per unique frame (4 steps of one episode: frames 0..3), not the per-sample minimum
    assert indexed["unique_images"] == 4 and indexed["tflop_executed_per_sample"] < report["tflop_min_per_sample"]
    assert indexed["mfu_vs_peak"] is None and indexed["mfu_vs_matmul"] > 0 and indexed["ms_per_sample_min"] <= indexed["ms_per_sample"]
    assert [r["numerator"] for r in report["ratios"]] == ["batched_same_samples", "stream_all", "stream_kept", "indexed"]
    assert report["ratios"][-1]["what"] == "encode_indexed crop / pad frames, B=4"
    check = report["rows"][1]
    assert check["batched_vs_streaming"]["rms_rel"] < 1e-6 and check["indexed_vs_batched"]["rms_rel"] == 0.0
    assert all(r["ms_per_sample"] > 0 for r in report["rows"] if "ms_per_sample" in r)
    assert "profile" in report and "## cpu" in run.stdout
