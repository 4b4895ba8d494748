"""cache.dtype float8_e4m3 (issue 14): each token row stored as e4m3 bits with a float32 scale absmax/448,
dequantised to bf16 by FeatureStore; the writer measures the round-trip error and validation bounds it per
dtype; a wrong scale fails the live spot check. Library level, no Snakemake (the staleness of switching
dtype is covered in tests/test_workflow_cache.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from test_cache_faults import _config, _index
from vlnflow.cache import format as fmt
from vlnflow.cache.estimate import estimate
from vlnflow.cache.manifest import merge_manifest
from vlnflow.cache.precompute import precompute_shard
from vlnflow.cache.store import FeatureStore
from vlnflow.cache.validate import spot_check_tolerance, validate_shard
from vlnflow.cache.writer import ShardWriter
from vlnflow.spatial import SpatialEncoder

FP8 = "float8_e4m3"
P, C = 16, 64


def _writer(tmp_path, ids, dtype=FP8, name="shard_00000"):
    return ShardWriter(tmp_path / f"{name}.h5", tmp_path / ".partial" / f"{name}.h5", ids, grid=(4, 4), channels=C,
                       dtype=dtype, compression=None, encoder_fingerprint="enc", shard_fingerprint="fp", layer=-2)


def _features(n: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (a per-tensor scale would crush the small ones), one all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, P, C, generator=gen) * torch.logspace(-3, 2, P).view(1, P, 1)
    x[0, 5] = 0.0
    return x


def test_codec_round_trip_is_within_the_e4m3_bound_per_row():
    x = _features(3)
    values, scale = fmt.encode(x, FP8)
    assert values.dtype == np.uint8 and values.shape == (3, P, C) and scale.dtype == np.float32 and scale.shape == (3, P)
    assert scale[0, 5] == 0.0
    np.testing.assert_allclose(scale, x.abs().amax(-1).numpy() / 448.0, rtol=1e-6)
    q = torch.from_numpy(values).view(torch.float8_e4m3fn).float()
    nonzero = torch.from_numpy(scale) > 0
    assert torch.equal(q.abs().amax(-1)[nonzero], torch.full((int(nonzero.sum()),), 448.0)), "each row's absmax maps onto 448"
    back = fmt.decode(values, FP8, scale)
    assert back.dtype == torch.bfloat16 and torch.isfinite(back.float()).all()
    assert torch.equal(back[0, 5].float(), torch.zeros(C)), "an all-zero row comes back as zeros, not NaN"
    err = fmt.row_rel_error(back, x)
    assert err.max() <= fmt.ROUND_TRIP_BOUND[FP8]
    assert 0.005 < err.mean() < 0.05  # e4m3 really rounds (3 mantissa bits): not a lossless pass-through
    assert err[0, :5].max() < 0.07, "small rows keep their own precision (per-row scale)"
    with pytest.raises(ValueError, match="scales"):
        fmt.decode(values, FP8)


def test_writer_store_round_trip_returns_bf16_and_half_the_bytes(tmp_path):
    ids = [f"ep/{i:05d}" for i in range(4)]
    x = _features(4, seed=1)
    with _writer(tmp_path, ids) as w:
        w.write([2, 0], x[[2, 0]])
        for row in (1, 3):  # one sample per call: on the CPU the writer measures each call's first sample
            w.write([row], x[row : row + 1])
        path = w.finalize()
    with h5py.File(path) as f:
        assert f[fmt.FEATURES].dtype == np.uint8 and f[fmt.SCALE].shape == (4, P) and f[fmt.SCALE].chunks == (1, P)
        assert f.attrs["dtype"] == FP8
        worst = float(f.attrs["max_row_rel_error"])
    manifest = merge_manifest([path], tmp_path / "manifest.json", tmp_path / "manifest.parquet")
    assert manifest["dtype"] == FP8
    store = FeatureStore(tmp_path / "manifest.json")
    got = torch.stack([store.get(sid) for sid in ids])
    assert got.dtype == torch.bfloat16
    err = fmt.row_rel_error(got, x)
    assert 0 < err.max().item() <= fmt.ROUND_TRIP_BOUND[FP8]
    measured = err[[2, 1, 3]].max().item()  # sample 0 shared a call with sample 2
    assert worst == pytest.approx(measured, rel=1e-5), "the writer records the error the reader gets"
    assert fmt.bytes_per_sample(P, C, FP8) * 2 - fmt.bytes_per_sample(P, C, "bfloat16") == 2 * P * 4  # values halve, scales added


def test_r2r_ce_fp8_estimate_is_about_2_65_tb():
    est = estimate(612492, (46, 46), 2048, FP8, 256, None)
    assert est.bytes_per_sample == 2116 * 2048 + 2116 * 4
    assert 2.65e12 <= est.total_bytes <= 2.66e12


def test_partial_file_of_another_dtype_is_restarted(tmp_path):
    w = _writer(tmp_path, ["a", "b"], dtype="bfloat16")
    w.write([0], _features(1))
    w.close()
    w2 = _writer(tmp_path, ["a", "b"], dtype=FP8)
    assert w2.pending == [0, 1], "a bf16 partial file must not be resumed as fp8"
    w2.write([0, 1], _features(2))
    w2.finalize()


@pytest.fixture(scope="module")
def fp8_shard(tmp_path_factory, demo_data):
    """The faults test's four demo episodes, precomputed with cache.dtype float8_e4m3, every sample spot-checked."""
    base = tmp_path_factory.mktemp("fp8")
    root = base / "episodes"
    for name in ("ep0000", "ep0005", "ep0006", "ep0008"):
        shutil.copytree(demo_data / "episodes" / name, root / name)
    data = _index(root, base)
    data.config = _config(root, dtype=FP8, spot_check=100)
    data.encoder = SpatialEncoder.from_config(data.config["spatial"])
    data.h5 = base / "cache" / "shard_00000.h5"
    precompute_shard(data.shard, data.fingerprint, data.h5, base / "cache" / ".partial" / "shard_00000.h5", data.config,
                     encoder=data.encoder, progress=False)
    data.expected = {"encoder_fingerprint": data.encoder.fingerprint(), "shard_fingerprint": data.fingerprint, "dtype": FP8}
    return data


def _validate(data, path: Path) -> dict:
    return validate_shard(path, data.shard, data.expected, data.config, encoder=data.encoder)


def test_fp8_shard_validates_against_the_live_encoder(fp8_shard):
    report = _validate(fp8_shard, fp8_shard.h5)
    assert report["ok"], report["problems"]
    spot = report["spot_check"]
    assert len(spot["checked"]) == 21 and spot["tolerance"] == spot_check_tolerance(FP8) > spot_check_tolerance("bfloat16")
    assert 0.005 < spot["worst_rel_err"] <= fmt.ROUND_TRIP_BOUND[FP8]
    bf16 = dict(fp8_shard.expected, dtype="bfloat16")
    stale = validate_shard(fp8_shard.h5, fp8_shard.shard, bf16, fp8_shard.config, encoder=fp8_shard.encoder)
    assert any("dtype is 'float8_e4m3', expected 'bfloat16' (stale" in p for p in stale["problems"])


def _copy(data, tmp_path) -> Path:
    path = tmp_path / "shard_00000.h5"
    shutil.copy(data.h5, path)
    return path


def test_a_wrong_scale_fails_the_spot_check(fp8_shard, tmp_path):
    path = _copy(fp8_shard, tmp_path)
    with h5py.File(path, "r+") as f:
        f[fmt.SCALE][7, 3] *= 8.0  # one token row of one sample: finite, positive, plausible-looking
    report = _validate(fp8_shard, path)
    assert not report["ok"]
    assert any("live recompute differs" in p and "float8_e4m3" in p for p in report["problems"]), report["problems"]
    assert report["spot_check"]["worst_row_rel_err"] > 5


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 0.0])
def test_an_impossible_scale_is_named_without_recompute(fp8_shard, tmp_path, bad):
    path = _copy(fp8_shard, tmp_path)
    with h5py.File(path, "r+") as f:
        f[fmt.SCALE][4, 0] = bad  # 0.0: a zero scale on a row whose stored values are not zero
    config = dict(fp8_shard.config, cache=dict(fp8_shard.config["cache"], spot_check=0))
    report = validate_shard(path, fp8_shard.shard, fp8_shard.expected, config, encoder=fp8_shard.encoder)
    assert not report["ok"]
    assert any("invalid per-row scales in 1 samples" in p or "NaN/Inf in 1 samples" in p for p in report["problems"]), report["problems"]


def test_a_recorded_round_trip_error_over_the_bound_is_a_problem(fp8_shard, tmp_path):
    path = _copy(fp8_shard, tmp_path)
    with h5py.File(path, "r+") as f:
        assert 0 < f.attrs["max_row_rel_error"] <= fmt.ROUND_TRIP_BOUND[FP8]
        f.attrs["max_row_rel_error"] = 0.2
    config = dict(fp8_shard.config, cache=dict(fp8_shard.config["cache"], spot_check=0))
    report = validate_shard(path, fp8_shard.shard, fp8_shard.expected, config, encoder=fp8_shard.encoder)
    assert any("round-trip error 0.2" in p and "float8_e4m3 bound 0.07" in p for p in report["problems"]), report["problems"]
