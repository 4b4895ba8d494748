"""Shard writer, manifest and FeatureStore on random features (no encoder needed)."""

import errno
import json

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vlnflow.cache import format as fmt
from vlnflow.cache.manifest import merge_manifest
from vlnflow.cache.store import FeatureStore
from vlnflow.cache.writer import ShardWriter
from vlnflow.errors import UserError

P, C = 16, 8


def _writer(tmp_path, name, ids, dtype="bfloat16", compression=None, enc="enc-A"):
    return ShardWriter(
        tmp_path / "cache" / f"{name}.h5",
        tmp_path / "cache" / ".partial" / f"{name}.h5",
        ids,
        grid=(4, 4),
        channels=C,
        dtype=dtype,
        compression=compression,
        encoder_fingerprint=enc,
        shard_fingerprint=f"fp-{name}",
        layer=-2,
    )


def _features(n, seed=0):
    return torch.randn(n, P, C, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("compression", [None, "lzf", "gzip-4"])
def test_roundtrip_each_dtype(tmp_path, dtype, compression):
    ids = [f"ep/{i:05d}" for i in range(5)]
    feats = _features(5)
    with _writer(tmp_path, "shard_00000", ids, dtype, compression) as w:
        w.write([0, 1, 2, 3, 4], feats)
        final = w.finalize()
    assert final.exists() and not (tmp_path / "cache" / ".partial" / "shard_00000.h5").exists()
    with h5py.File(final) as f:
        got = fmt.from_storage(f[fmt.FEATURES][...], dtype)
        assert f.attrs["complete"] and f.attrs["dtype"] == dtype
        assert f[fmt.FEATURES].chunks == (1, P, C)
        cast_err = float(f.attrs["max_abs_cast_error"])
    expected = feats.to({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype])
    assert torch.equal(got, expected), "stored values must be the exact cast of the encoder output"
    if dtype == "float32":
        assert cast_err == 0.0
    else:
        assert cast_err == pytest.approx((expected.float() - feats).abs().max().item())


def test_bf16_input_is_stored_bit_exact(tmp_path):
    feats = _features(3).to(torch.bfloat16)
    with _writer(tmp_path, "s", ["a", "b", "c"]) as w:
        w.write([2, 0, 1], feats)
        path = w.finalize()
    with h5py.File(path) as f:
        got = fmt.from_storage(f[fmt.FEATURES][...], "bfloat16")
    assert torch.equal(got[[2, 0, 1]].view(torch.int16), feats.view(torch.int16))


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    ids = [f"ep/{i:05d}" for i in range(6)]
    feats = _features(6, seed=3)
    w = _writer(tmp_path / "a", "s", ids)
    w.write([0, 1, 2], feats[:3])
    w.close()  # the job is killed here: no finalize
    assert not (tmp_path / "a" / "cache" / "s.h5").exists(), "an unfinished shard must not appear under its final name"
    w2 = _writer(tmp_path / "a", "s", ids)
    assert w2.pending == [3, 4, 5]
    w2.write([3, 4, 5], feats[3:])
    resumed = w2.finalize()
    with _writer(tmp_path / "b", "s", ids) as w3:
        w3.write(list(range(6)), feats)
        straight = w3.finalize()
    with h5py.File(resumed) as a, h5py.File(straight) as b:
        assert np.array_equal(a[fmt.FEATURES][...], b[fmt.FEATURES][...])
        assert list(a[fmt.SAMPLE_ID].asstr()[...]) == list(b[fmt.SAMPLE_ID].asstr()[...])


def test_partial_from_other_settings_is_restarted(tmp_path):
    ids = ["a", "b"]
    w = _writer(tmp_path, "s", ids, enc="enc-A")
    w.write([0], _features(1))
    w.close()
    w2 = _writer(tmp_path, "s", ids, enc="enc-B")
    assert w2.pending == [0, 1], "a partial file written with another encoder must not be resumed"
    w2.close()


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    ids = [f"x{i}" for i in range(4)]
    w = _writer(tmp_path, "s", ids)
    w.write([0, 1], _features(2))
    real_setitem = h5py.Dataset.__setitem__

    def disk_full(self, key, value):
        if self.name == "/" + fmt.FEATURES:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    with pytest.raises(OSError, match="No space left"):
        w.write([2, 3], _features(2, seed=9))
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="not done"):
        w.finalize()
    w.close()
    assert not (tmp_path / "cache" / "s.h5").exists()
    with h5py.File(tmp_path / "cache" / ".partial" / "s.h5") as f:
        assert not f.attrs["complete"]
        assert f[fmt.DONE][...].tolist() == [True, True, False, False]


def test_non_finite_features_are_refused(tmp_path):
    feats = _features(2)
    feats[1, 0, 0] = float("nan")
    with _writer(tmp_path, "s", ["a", "b"]) as w, pytest.raises(FloatingPointError, match="'b'"):
        w.write([0, 1], feats)


def _two_shards(tmp_path):
    paths, all_feats = [], {}
    for k, name in enumerate(["shard_00000", "shard_00001"]):
        ids = [f"ep{k}/{i:05d}" for i in range(3)]
        feats = _features(3, seed=k)
        with _writer(tmp_path, name, ids) as w:
            w.write([0, 1, 2], feats)
            if k == 1:
                pass
            paths.append(w.finalize())
        all_feats.update({sid: feats[i].to(torch.bfloat16) for i, sid in enumerate(ids)})
    return paths, all_feats


def test_manifest_and_store(tmp_path):
    paths, feats = _two_shards(tmp_path)
    out = tmp_path / "cache" / "manifest.json"
    manifest = merge_manifest(paths, out, out.with_suffix(".parquet"))
    assert manifest["samples"] == 6 and manifest["n_shards"] == 2
    assert manifest["feature_shape"] == [P, C] and manifest["dtype"] == "bfloat16"
    assert manifest["bytes"] == sum(p.stat().st_size for p in paths)
    assert json.loads(out.read_text())["encoder_fingerprint"] == "enc-A"
    store = FeatureStore(out)
    assert len(store) == 6 and "ep1/00002" in store and store.get("nope") is None
    for sid, f in feats.items():
        assert torch.equal(store.get(sid), f)


def test_manifest_refuses_mixed_encoders(tmp_path):
    with _writer(tmp_path, "a", ["x"], enc="enc-A") as w:
        w.write([0], _features(1))
        pa = w.finalize()
    with _writer(tmp_path, "b", ["y"], enc="enc-B") as w:
        w.write([0], _features(1))
        pb = w.finalize()
    with pytest.raises(UserError, match="encoder_fingerprint"):
        merge_manifest([pa, pb], tmp_path / "m.json", tmp_path / "m.parquet")


class _Reads(Dataset):
    def __init__(self, store, ids):
        self.store, self.ids = store, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.store.get(self.ids[i]).view(torch.int16)


def test_store_is_safe_in_forked_workers(tmp_path):
    paths, feats = _two_shards(tmp_path)
    out = tmp_path / "cache" / "manifest.json"
    merge_manifest(paths, out, out.with_suffix(".parquet"))
    store = FeatureStore(out)
    ids = sorted(feats)
    store.get(ids[0])  # open a handle in the parent before forking: workers must not reuse it
    loader = DataLoader(_Reads(store, ids), batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = list(loader)
    for sid, tensor in zip(ids, got):
        assert torch.equal(tensor, feats[sid].view(torch.int16))
