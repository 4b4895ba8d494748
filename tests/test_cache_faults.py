"""Faults of the feature cache at the library level (issue 4): a killed precompute resumes to the same
file, corrupt or truncated shards are named and moved aside by validation, bad images fail naming the
sample or are skipped and counted, and a failing write leaves nothing that looks complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

from vlnflow.cache import format as fmt
from vlnflow.cache.manifest import merge_manifest
from vlnflow.cache.precompute import precompute_shard
from vlnflow.cache.validate import validate_cache, validate_shard
from vlnflow.config import load_config
from vlnflow.data.index import IndexSettings, build_index
from vlnflow.data.shards import stored_fingerprint, write_shards
from vlnflow.errors import DatasetError, UserError
from vlnflow.spatial import SpatialEncoder
from vlnflow.spatial.fingerprint import encoder_fingerprint

REPO = Path(__file__).resolve().parents[1]
EPISODES = ("ep0000", "ep0005", "ep0006", "ep0008")  # 3 + 4 + 5 + 9 steps = 21 samples, 1..9 frames each
BATCH = 2  # -> 13 batches (one frame count per batch)


def _index(root: Path, out: Path) -> SimpleNamespace:
    """Index `root` into one shard under `out` (the index and shard rules' library code)."""
    samples, episodes = out / "index" / "samples.parquet", out / "index" / "episodes.parquet"
    build_index(IndexSettings(root=str(root), shard_count=1), str(samples), str(episodes), str(out / "index" / "skipped.csv"))
    write_shards(str(samples), str(episodes), str(out / "shards"), str(out / "shards" / "shards.json"), 1)
    shard = out / "shards" / "shard_00000.parquet"
    return SimpleNamespace(root=root, samples=samples, shard=shard, fingerprint=stored_fingerprint(str(shard)))


def _config(root: Path, **cache) -> dict:
    return load_config(
        REPO / "config.yaml",
        {
            "dataset": {"root": str(root)},
            "spatial": {"batch_size": BATCH},
            "cache": {"loader_workers": 0, "spot_check": 1, **cache},
        },
    )


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, demo_data) -> SimpleNamespace:
    """Four short demo episodes indexed into one shard; read-only (copy the root to break images)."""
    base = tmp_path_factory.mktemp("faults")
    root = base / "episodes"
    for name in EPISODES:
        shutil.copytree(demo_data / "episodes" / name, root / name)
    data = _index(root, base)
    data.config = _config(root)
    data.encoder = SpatialEncoder.from_config(data.config["spatial"])
    return data


def _run(data, out: Path, config=None, encoder=None) -> dict:
    return precompute_shard(
        data.shard,
        data.fingerprint,
        out / "cache" / "shard_00000.h5",
        out / "cache" / ".partial" / "shard_00000.h5",
        config or data.config,
        encoder=encoder or data.encoder,
        progress=False,
    )


@pytest.fixture(scope="module")
def clean_shard(small_set, tmp_path_factory) -> Path:
    """An uninterrupted precompute of the shard: the reference for every resumed run."""
    out = tmp_path_factory.mktemp("clean")
    stats = _run(small_set, out)
    assert stats["computed"] == stats["samples"] == 21 and stats["resumed"] == 0
    return out / "cache" / "shard_00000.h5"


def _features(path: Path) -> tuple[np.ndarray, list[str], list[bool], list[str]]:
    with h5py.File(path) as f:
        return (
            f[fmt.FEATURES][...],
            list(f[fmt.SAMPLE_ID].asstr()[...]),
            f[fmt.DONE][...].tolist(),
            list(f[fmt.ERROR].asstr()[...]),
        )


def _expected(data) -> dict:
    return {"encoder_fingerprint": data.encoder.fingerprint(), "shard_fingerprint": data.fingerprint, "dtype": "bfloat16"}


class KilledAfter:
    """The real encoder, except that the job dies (raises) when batch `k + 1` starts encoding."""

    def __init__(self, encoder, k: int):
        self.encoder, self.k, self.calls = encoder, k, 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_indexed(self, images, frame_index):
        if self.calls == self.k:
            raise KeyboardInterrupt("killed mid-shard (simulated)")
        self.calls += 1
        return self.encoder.encode_indexed(images, frame_index)


def test_clean_run_matches_the_encoder_and_is_complete(small_set, clean_shard):
    feats, ids, done, errors = _features(clean_shard)
    table = pd.read_parquet(small_set.shard)
    assert ids == table.sample_id.tolist() and all(done) and not any(errors)
    assert feats.shape == (21, *small_set.encoder.feature_shape)
    with h5py.File(clean_shard) as f:
        assert f.attrs["complete"] and f.attrs["encoder_fingerprint"] == encoder_fingerprint(small_set.config["spatial"])
        assert f.attrs["shard_fingerprint"] == small_set.fingerprint
    assert not (clean_shard.parent / ".partial" / clean_shard.name).exists()
    report = validate_shard(clean_shard, small_set.shard, _expected(small_set), small_set.config, encoder=small_set.encoder)
    assert report["ok"], report["problems"]


def test_killed_mid_shard_resumes_to_the_uninterrupted_file(small_set, clean_shard, tmp_path):
    final, partial = tmp_path / "cache" / "shard_00000.h5", tmp_path / "cache" / ".partial" / "shard_00000.h5"
    with pytest.raises(KeyboardInterrupt):
        _run(small_set, tmp_path, encoder=KilledAfter(small_set.encoder, k=5))
    assert not final.exists(), "a killed job must leave nothing under the final name"
    with h5py.File(partial) as f:
        assert not f.attrs["complete"]
        n_done = int(f[fmt.DONE][...].sum())
    assert 0 < n_done < 21

    stats = _run(small_set, tmp_path)
    assert stats["resumed"] == n_done and stats["computed"] == 21 - n_done
    assert final.exists() and not partial.exists()
    got, want = _features(final), _features(clean_shard)
    assert np.array_equal(got[0], want[0]), "resumed features differ from an uninterrupted run's"
    assert got[1:] == want[1:]


def test_hard_kill_without_cleanup_resumes_to_the_uninterrupted_file(small_set, clean_shard, tmp_path):
    """os._exit in the middle of a shard: no exception handler, no h5py close; the next run resumes."""
    script = textwrap.dedent(
        f"""
        import json, os
        from vlnflow.cache.precompute import precompute_shard
        from vlnflow.spatial import SpatialEncoder
        config = json.loads({json.dumps(small_set.config)!r})
        encoder = SpatialEncoder.from_config(config["spatial"])
        real, calls = encoder.encode_indexed, []
        def dying(images, index):
            if len(calls) == 7:
                os._exit(9)
            calls.append(1)
            return real(images, index)
        encoder.encode_indexed = dying
        precompute_shard({str(small_set.shard)!r}, {small_set.fingerprint!r}, {str(tmp_path / 'cache' / 'shard_00000.h5')!r},
                         {str(tmp_path / 'cache' / '.partial' / 'shard_00000.h5')!r}, config, encoder=encoder, progress=False)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (tmp_path / "cache" / "shard_00000.h5").exists()
    stats = _run(small_set, tmp_path)
    assert stats["resumed"] > 0, "rows flushed before the kill must not be recomputed"
    assert stats["resumed"] + stats["computed"] == 21
    got, want = _features(tmp_path / "cache" / "shard_00000.h5"), _features(clean_shard)
    assert np.array_equal(got[0], want[0]) and got[1:] == want[1:]


def _flip_chunk_bytes(path: Path, row: int) -> None:
    with h5py.File(path) as f:
        info = f[fmt.FEATURES].id.get_chunk_info(row)
    offset = info.byte_offset + info.size // 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(8)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("damage", ["flipped_chunk", "truncated"])
def test_corrupt_finished_shard_is_named_and_moved_aside(small_set, clean_shard, tmp_path, damage):
    cache = tmp_path / "cache"
    cache.mkdir()
    shard = cache / "shard_00000.h5"
    shutil.copy(clean_shard, shard)
    manifest = merge_manifest([shard], cache / "manifest.json", cache / "manifest.parquet")  # built before the damage
    assert manifest["samples"] == 21
    if damage == "flipped_chunk":
        _flip_chunk_bytes(shard, row=7)
    else:
        os.truncate(shard, shard.stat().st_size // 2)

    quarantine = cache / "corrupt"
    report = validate_shard(shard, small_set.shard, _expected(small_set), small_set.config, encoder=small_set.encoder, quarantine_dir=quarantine)
    assert not report["ok"] and report["shard"] == "shard_00000"
    assert any("corrupt" in p for p in report["problems"]), report["problems"]
    assert not shard.exists(), "a corrupt shard must be moved away so that the next run rebuilds it"
    moved = list(quarantine.glob("shard_00000.*.h5"))
    assert len(moved) == 1 and report["quarantined"] == str(moved[0])

    (cache / "validation").mkdir()
    (cache / "validation" / "shard_00000.json").write_text(json.dumps(report))
    result = validate_cache(
        cache / "manifest.json", [cache / "validation" / "shard_00000.json"], small_set.samples,
        encoder_fingerprint(small_set.config["spatial"]), cache / "validation.json",
    )
    assert not result["ok"]
    assert any(p.startswith("shard shard_00000: unreadable or corrupt") for p in result["problems"]), result["problems"]


def test_unflipped_copy_passes_the_same_validation(small_set, clean_shard, tmp_path):
    """Control for the test above: the same steps without damage validate fine and move nothing."""
    shard = tmp_path / "shard_00000.h5"
    shutil.copy(clean_shard, shard)
    report = validate_shard(shard, small_set.shard, _expected(small_set), small_set.config, encoder=small_set.encoder, quarantine_dir=tmp_path / "corrupt")
    assert report["ok"] and shard.exists() and not (tmp_path / "corrupt").exists()
    assert report["spot_check"]["worst_rel_err"] < 2e-2 and len(report["spot_check"]["checked"]) == 1


@pytest.fixture
def broken_set(small_set, tmp_path) -> SimpleNamespace:
    """A private copy of the small set, indexed, then with one image deleted and one made undecodable."""
    root = tmp_path / "episodes"
    shutil.copytree(small_set.root, root)
    data = _index(root, tmp_path)
    table = pd.read_parquet(data.shard)
    missing = "ep0006/" + sorted(p.name for p in (root / "ep0006").glob("*.png"))[-1]  # last frame: in one sample only
    garbled = "ep0008/" + sorted(p.name for p in (root / "ep0008").glob("*.png"))[3]  # frame 3: in several samples
    (root / missing).unlink()
    (root / garbled).write_bytes((root / garbled).read_bytes()[:60])  # a truncated PNG
    data.bad = {
        sid: rel for sid, frames in zip(table.sample_id, table.frames) for rel in (missing, garbled) if rel in list(frames)
    }
    data.missing, data.garbled = missing, garbled
    data.encoder = small_set.encoder
    return data


def test_bad_image_with_on_error_fail_names_the_sample(broken_set, tmp_path):
    config = _config(broken_set.root)
    with pytest.raises(DatasetError) as err:
        _run(broken_set, tmp_path / "out", config=config)
    message = str(err.value)
    sample = next(sid for sid in broken_set.bad if message.startswith(f"sample {sid}:"))
    assert broken_set.bad[sample] in message and "cannot read image" in message
    assert not (tmp_path / "out" / "cache" / "shard_00000.h5").exists()


def test_bad_image_with_on_error_skip_is_recorded_and_counted(broken_set, tmp_path):
    bad = broken_set.bad
    assert len(bad) >= 2 and {broken_set.missing, broken_set.garbled} == set(bad.values())
    config = _config(broken_set.root)
    config["dataset"]["on_error"] = "skip"
    stats = _run(broken_set, tmp_path, config=config)
    assert stats["skipped"] == len(bad) and stats["computed"] == 21 - len(bad)

    shard = tmp_path / "cache" / "shard_00000.h5"
    _, ids, done, errors = _features(shard)
    assert all(done)
    recorded = {sid: why for sid, why in zip(ids, errors) if why}
    assert set(recorded) == set(bad)
    for sid, why in recorded.items():
        assert why.startswith(f"sample {sid}: cannot read image") and bad[sid] in why
    with h5py.File(shard) as f:
        assert f.attrs["n_skipped"] == len(bad) and f.attrs["complete"]

    cache = tmp_path / "cache"
    manifest = merge_manifest([shard], cache / "manifest.json", cache / "manifest.parquet")
    assert manifest["skipped"] == len(bad) and manifest["samples"] == 21 - len(bad)
    assert manifest["shards"][0]["n_skipped"] == len(bad)
    assert set(pd.read_parquet(cache / "manifest.parquet").sample_id).isdisjoint(bad)

    report = validate_shard(shard, broken_set.shard, _expected(broken_set), config, encoder=broken_set.encoder)
    assert report["ok"], report["problems"]
    assert report["skipped"] == len(bad)
    assert all(c["sample_id"] not in bad for c in report["spot_check"]["checked"])
    report_path = cache / "shard_00000.report.json"
    report_path.write_text(json.dumps(report))
    result = validate_cache(cache / "manifest.json", [report_path], broken_set.samples, broken_set.encoder.fingerprint(), cache / "validation.json")
    assert result["ok"], result["problems"]
    assert result["samples_skipped"] == len(bad) and result["samples_cached"] == 21 - len(bad) and result["samples_indexed"] == 21

    # a skip the manifest does not account for is not silently accepted
    manifest_json = json.loads((cache / "manifest.json").read_text())
    manifest_json["skipped"] = 0
    (cache / "manifest.json").write_text(json.dumps(manifest_json))
    result = validate_cache(cache / "manifest.json", [report_path], broken_set.samples, broken_set.encoder.fingerprint(), cache / "validation.json")
    assert not result["ok"] and any("not in the cache" in p for p in result["problems"])


def test_disk_full_during_precompute_leaves_nothing_that_looks_complete(small_set, clean_shard, tmp_path, monkeypatch):
    real_setitem = h5py.Dataset.__setitem__
    writes = []

    def disk_full(self, key, value):
        if self.name == "/" + fmt.FEATURES:
            if len(writes) == 6:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            writes.append(key)
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _run(small_set, tmp_path)
    monkeypatch.undo()

    final, partial = tmp_path / "cache" / "shard_00000.h5", tmp_path / "cache" / ".partial" / "shard_00000.h5"
    assert not final.exists()
    with h5py.File(partial) as f:
        assert not f.attrs["complete"] and "created_at" not in f.attrs
        done = f[fmt.DONE][...]
    assert 0 < done.sum() < 21
    # neither the final name nor the partial file passes validation or enters a manifest
    report = validate_shard(final, small_set.shard, _expected(small_set), small_set.config, encoder=small_set.encoder, quarantine_dir=tmp_path / "q")
    assert not report["ok"] and not (tmp_path / "q").exists()
    report = validate_shard(partial, small_set.shard, _expected(small_set), small_set.config, encoder=small_set.encoder)
    assert not report["ok"] and any("not marked complete" in p or "missing attributes" in p for p in report["problems"])
    with pytest.raises(UserError, match="not marked complete"):
        merge_manifest([partial], tmp_path / "m.json", tmp_path / "m.parquet")

    # with space again the job resumes and ends with the uninterrupted run's file
    stats = _run(small_set, tmp_path)
    assert stats["resumed"] == int(done.sum())
    got, want = _features(final), _features(clean_shard)
    assert np.array_equal(got[0], want[0]) and got[1:] == want[1:]


def test_a_wrong_writer_passes_the_cpu_checks_and_is_caught_by_the_one_spot_check_job(small_set, clean_shard, tmp_path):
    """Issue 21: validation is split into CPU checks per shard and live spot checks of all shards in one job;
    rows written under the wrong sample id are well-formed, so only the live recompute can catch them."""
    from vlnflow.cache.spot_check import spot_check_cache

    good = tmp_path / "good.h5"
    wrong = tmp_path / "wrong.h5"
    shutil.copy(clean_shard, good)
    shutil.copy(clean_shard, wrong)
    with h5py.File(wrong, "r+") as f:  # a writer that put each row's features one row down
        f[fmt.FEATURES][...] = np.roll(f[fmt.FEATURES][...], 1, axis=0)
    cpu = validate_shard(wrong, small_set.shard, _expected(small_set), small_set.config, spot_check=0)
    assert cpu["ok"] and "spot_check" not in cpu, cpu["problems"]
    config = {**small_set.config, "cache": {**small_set.config["cache"], "spot_check": 3, "compile_cache": None}}
    report = spot_check_cache([(good, small_set.shard), (wrong, small_set.shard)], config, encoder=small_set.encoder)
    assert report["samples_checked"] == 6 and not report["ok"]
    assert report["shards"]["good"]["worst_rel_err"] < 2e-2 and len(report["shards"]["good"]["checked"]) == 3
    assert report["problems"] == [p for p in report["problems"] if p.startswith("shard wrong: live recompute differs")] != []
    assert set(report["timing"]["setup_split_s"]) == {"imports", "read", "weights", "first_batch"}
    assert report["timing"]["compute_s"] > 0 and report["timing"]["steady_s_per_sample"] is not None
