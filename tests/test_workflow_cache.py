"""Snakemake on the demo (issue 4): precompute_all builds a validated cache; only stale shards rerun;
corrupt shards are named and rebuilt alone; a failing write leaves nothing complete; bad images fail
naming the sample or are skipped and counted. Plus `vlnflow cache estimate` for the real data set.

The slow tests share one workflow copy (module scope) and run in file order; each leaves the cache
built and up to date for the next one, which it checks first.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, WorkflowCopy, copy_workflow
from vlnflow.cache import format as fmt
from vlnflow.config import load_config
from vlnflow.data.demo import write_episode
from vlnflow.data.shards import shard_of
from vlnflow.spatial.fingerprint import encoder_fingerprint, spatial_output

TARGET = "precompute_all"
N_SHARDS = 4
SHARDS = [f"shard_{i:05d}" for i in range(N_SHARDS)]
JOB_HEADER = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):\s*$")
WILDCARD = re.compile(r"^\s*wildcards: .*\bshard=(\w+)")


@pytest.fixture(scope="module")
def wf(tmp_path_factory, demo_data) -> WorkflowCopy:
    """One workflow copy for the module with a private copy of the demo episodes, built once."""
    copy = copy_workflow(tmp_path_factory.mktemp("cache_wf") / "workflow")
    dest = copy.path
    copy.root = dest / "data" / "episodes"
    shutil.copytree(demo_data / "episodes", copy.root)
    copy.configure({"dataset": {"root": "data/episodes"}, "shards": {"count": N_SHARDS}, "cache": {"spot_check": 1}})
    copy.first_run = copy.snakemake(TARGET, cores=2)
    return copy


@pytest.fixture
def restore_config(wf):
    """Put the module's config.yaml back after a test that edits it."""
    text = (wf.path / "config.yaml").read_text()
    yield
    (wf.path / "config.yaml").write_text(text)


def jobs(proc: subprocess.CompletedProcess) -> list[tuple[str, str | None]]:
    """(rule, shard wildcard or None) of every job a (dry) run printed, in order."""
    found: list[list] = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := JOB_HEADER.match(line):
            found.append([m.group(1), None])
        elif (m := WILDCARD.match(line)) and found:
            found[-1][1] = m.group(1)
    return [tuple(j) for j in found]


def shards_run(proc, rule: str) -> list[str]:
    return sorted(s for r, s in jobs(proc) if r == rule)


def mtimes(wf) -> dict[str, int]:
    cache = wf.path / "results" / "cache"
    files = [*cache.glob("shard_*.h5"), cache / "manifest.json", cache / "validation.json"]
    return {p.name: p.stat().st_mtime_ns for p in files if p.exists()}


def changed(before: dict, after: dict) -> list[str]:
    return sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))


def nothing_to_do(wf) -> bool:
    proc = wf.snakemake("-n", TARGET)
    return "Nothing to be done" in proc.stdout + proc.stderr and not jobs(proc)


def validation(wf) -> dict:
    return json.loads((wf.path / "results/cache/validation.json").read_text())


def features(path: Path) -> np.ndarray:
    with h5py.File(path) as f:
        return f[fmt.FEATURES][...]


def assert_up_to_date_and_valid(wf) -> dict:
    assert nothing_to_do(wf)
    result = validation(wf)
    assert result["ok"] and result["problems"] == []
    assert result["samples_cached"] + result["samples_skipped"] == result["samples_indexed"] > 0
    return result


@pytest.mark.slow
def test_precompute_all_builds_a_validated_cache(wf):
    ran = jobs(wf.first_run)
    assert shards_run(wf.first_run, "precompute_shard") == SHARDS
    assert shards_run(wf.first_run, "validate_shard") == SHARDS
    assert [r for r, _ in ran].count("merge_manifest") == 1 and [r for r, _ in ran].count("validate_cache") == 1

    config = load_config(wf.path / "config.yaml")
    result = assert_up_to_date_and_valid(wf)
    index = pd.read_parquet(wf.path / "results/index/samples.parquet")
    assert result["samples_indexed"] == result["samples_cached"] == len(index) and result["samples_skipped"] == 0
    assert result["spot_checked"] == N_SHARDS and result["worst_spot_rel_err"] <= result["tolerance"]
    assert result["encoder_fingerprint"] == encoder_fingerprint(config["spatial"])

    manifest = json.loads((wf.path / "results/cache/manifest.json").read_text())
    (gh, gw), channels = spatial_output(config["spatial"])
    assert manifest["n_shards"] == N_SHARDS and manifest["samples"] == len(index)
    assert manifest["feature_shape"] == [gh * gw, channels] and manifest["dtype"] == "bfloat16"
    assert {s["encoder_fingerprint"] for s in manifest["shards"]} == {result["encoder_fingerprint"]}
    table = pd.read_parquet(wf.path / "results/cache/manifest.parquet")
    assert sorted(table.sample_id) == sorted(index.sample_id)
    for name in SHARDS:
        with h5py.File(wf.path / f"results/cache/{name}.h5") as f:
            assert f.attrs["complete"] and f[fmt.DONE][...].all()
            assert f[fmt.FEATURES].shape[1:] == (gh * gw, channels)
    assert list((wf.path / "results/cache/.partial").glob("*")) == [], "partial files must be renamed away"


@pytest.mark.slow
def test_rerun_with_nothing_changed_runs_nothing(wf):
    before = mtimes(wf)
    assert len(before) == N_SHARDS + 2
    assert nothing_to_do(wf)
    proc = wf.snakemake(TARGET, cores=2)
    assert "Nothing to be done" in proc.stdout + proc.stderr and jobs(proc) == []
    assert mtimes(wf) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [
        {"spatial": {"layer": -1}},
        {"spatial": {"seed": 1}},
        {"spatial": {"image_size": 42}},
        {"spatial": {"preprocess": "pad"}},
        {"spatial": {"reference_frame": "first"}},
        {"spatial": {"dtype": "float32"}},
        {"cache": {"dtype": "float16"}},
        {"cache": {"dtype": "float8_e4m3"}},
    ],
    ids=lambda c: ".".join(next((k, *v) for k, v in c.items())),
)
def test_any_encoder_or_storage_setting_makes_every_shard_stale(wf, restore_config, change):
    before = mtimes(wf)
    wf.configure(change)
    proc = wf.snakemake("-n", TARGET)
    assert shards_run(proc, "precompute_shard") == SHARDS
    assert "Params have changed since last execution" in proc.stdout
    assert mtimes(wf) == before  # a dry run touches nothing


@pytest.mark.slow
def test_settings_back_to_the_original_run_nothing(wf):
    """After the setting changes above were undone (dry runs only), nothing is stale."""
    assert_up_to_date_and_valid(wf)


@pytest.mark.slow
def test_one_episode_edit_reruns_only_its_shard(wf):
    assert_up_to_date_and_valid(wf)
    before = mtimes(wf)
    old_manifest = json.loads((wf.path / "results/cache/manifest.json").read_text())
    step = sorted((wf.root / "ep0004").glob("step_*.json"))[1]
    content = json.loads(step.read_text())
    content["landmark_description"] += " A plant stands in the corner."
    step.write_text(json.dumps(content))
    stale = shard_of("ep0004", N_SHARDS)

    proc = wf.snakemake(TARGET, cores=2)
    assert shards_run(proc, "precompute_shard") == [stale]
    assert shards_run(proc, "validate_shard") == [stale]
    assert [r for r, _ in jobs(proc)].count("merge_manifest") == 1
    assert [r for r, _ in jobs(proc)].count("validate_cache") == 1
    assert changed(before, mtimes(wf)) == sorted([f"{stale}.h5", "manifest.json", "validation.json"])

    new_manifest = json.loads((wf.path / "results/cache/manifest.json").read_text())
    fps = lambda m: {s["name"]: s["shard_fingerprint"] for s in m["shards"]}  # noqa: E731
    assert [n for n in SHARDS if fps(old_manifest)[n] != fps(new_manifest)[n]] == [stale]
    assert_up_to_date_and_valid(wf)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped_chunk", "truncated"])
def test_corrupt_shard_is_named_by_validation_and_rebuilt_alone(wf, damage):
    assert_up_to_date_and_valid(wf)
    victim = "shard_00001" if damage == "flipped_chunk" else "shard_00002"
    path = wf.path / "results/cache" / f"{victim}.h5"
    good = features(path)
    if damage == "flipped_chunk":  # fletcher32 must catch one flipped run of bytes inside a feature chunk
        with h5py.File(path) as f:
            info = f[fmt.FEATURES].id.get_chunk_info(2)
        with open(path, "r+b") as fh:
            fh.seek(info.byte_offset + info.size // 2)
            data = fh.read(8)
            fh.seek(info.byte_offset + info.size // 2)
            fh.write(bytes(b ^ 0xFF for b in data))
    else:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size * 2 // 3)
    before = mtimes(wf)

    failed = wf.snakemake(TARGET, cores=2, check=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert f"{victim}: unreadable or corrupt" in out, out
    assert f"{victim}: unreadable or corrupt" in (wf.path / f"results/logs/validate/{victim}.log").read_text()
    assert not path.exists() and len(list((wf.path / "results/cache/corrupt").glob(f"{victim}.*.h5"))) == 1
    assert not (wf.path / "results/cache/validation.json").exists(), "the cache must not stay marked valid"
    assert shards_run(failed, "precompute_shard") == []

    dry = wf.snakemake("-n", TARGET)
    assert shards_run(dry, "precompute_shard") == [victim]
    proc = wf.snakemake(TARGET, cores=2)
    assert shards_run(proc, "precompute_shard") == [victim]
    assert shards_run(proc, "validate_shard") == [victim]
    unchanged = [f"{s}.h5" for s in SHARDS if s != victim]
    after = mtimes(wf)
    assert all(after[n] == before[n] for n in unchanged), "only the corrupt shard may be rebuilt"
    assert np.array_equal(features(path), good), "the rebuilt shard must hold the same features"
    assert_up_to_date_and_valid(wf)


@pytest.mark.slow
def test_disk_full_during_precompute_leaves_nothing_complete_and_next_run_recovers(wf, restore_config):
    """RLIMIT_FSIZE makes writes past a size fail with EFBIG, as a full disk does; loader workers off,
    since the limit would also hit their shared-memory files."""
    assert_up_to_date_and_valid(wf)
    wf.configure({"cache": {"loader_workers": 0}})  # not a content setting: nothing becomes stale
    assert nothing_to_do(wf)
    episode = next(f"ep{n:04d}" for n in range(700, 900) if shard_of(f"ep{n:04d}", N_SHARDS) == "shard_00003")
    write_episode(str(wf.root / episode), episode, 30, seed=11, size=(48, 36))
    victim = wf.path / "results/cache/shard_00003.h5"
    partial = wf.path / "results/cache/.partial/shard_00003.h5"
    limit = victim.stat().st_size + 20_000  # the grown shard needs ~60 kB more
    before = mtimes(wf)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    failed = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-c", "2", TARGET],
        cwd=wf.path, env=env, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300,
    )
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert shards_run(failed, "precompute_shard") == ["shard_00003"]
    assert "File too large" in (wf.path / "results/logs/precompute/shard_00003.log").read_text()
    assert not victim.exists(), "a failed write must leave nothing under the final name"
    assert partial.exists() and partial.stat().st_size <= limit
    try:
        with h5py.File(partial) as f:
            looks_complete = bool(f.attrs.get("complete")) and bool(f[fmt.DONE][...].all())
    except OSError:
        looks_complete = False  # the cut-off partial file does not even open
    assert not looks_complete

    dry = wf.snakemake("-n", TARGET)
    assert shards_run(dry, "precompute_shard") == ["shard_00003"] and "validate_cache" in [r for r, _ in jobs(dry)]
    proc = wf.snakemake(TARGET, cores=2)
    assert shards_run(proc, "precompute_shard") == ["shard_00003"]
    assert changed(before, mtimes(wf)) == ["manifest.json", "shard_00003.h5", "validation.json"]
    result = assert_up_to_date_and_valid(wf)
    index = pd.read_parquet(wf.path / "results/index/samples.parquet")
    assert result["samples_cached"] == len(index) and (index.episode_id == episode).sum() == 30
    assert not partial.exists()


@pytest.mark.slow
def test_undecodable_image_fails_naming_the_sample_or_is_skipped_and_counted(wf, restore_config):
    """Runs last: it leaves the cache with one skipped sample."""
    assert_up_to_date_and_valid(wf)
    episode = "ep0003"  # 13 steps: its last frame is in the last sample's history only
    stale = shard_of(episode, N_SHARDS)
    frame = sorted((wf.root / episode).glob("*.png"))[-1]
    rel = f"{episode}/{frame.name}"
    frame.write_bytes(frame.read_bytes()[:80])  # a truncated PNG: present (the index accepts it), undecodable
    before = mtimes(wf)

    failed = wf.snakemake(TARGET, cores=2, check=False)
    assert failed.returncode != 0
    assert shards_run(failed, "precompute_shard") == [stale]
    rows = pd.read_parquet(wf.path / f"results/shards/{stale}.parquet")
    bad = [sid for sid, frames in zip(rows.sample_id, rows.frames) if rel in list(frames)]
    assert len(bad) == 1
    log = (wf.path / f"results/logs/precompute/{stale}.log").read_text()
    assert f"sample {bad[0]}: cannot read image" in log and rel in log
    assert not (wf.path / f"results/cache/{stale}.h5").exists()

    wf.configure({"dataset": {"on_error": "skip"}})
    proc = wf.snakemake(TARGET, cores=2)
    assert shards_run(proc, "precompute_shard") == [stale], "on_error is no encoder setting: one shard reruns"
    stats = json.loads((wf.path / f"results/benchmark/precompute/{stale}.stats.json").read_text())
    assert stats["skipped"] == 1 and stats["resumed"] > 0, stats  # the failed run's finished rows are reused
    assert stats["resumed"] + stats["computed"] + stats["skipped"] == stats["samples"] == len(rows)
    assert changed(before, mtimes(wf)) == sorted([f"{stale}.h5", "manifest.json", "validation.json"])

    with h5py.File(wf.path / f"results/cache/{stale}.h5") as f:
        ids, errors = list(f[fmt.SAMPLE_ID].asstr()[...]), list(f[fmt.ERROR].asstr()[...])
        assert f.attrs["n_skipped"] == 1
    recorded = {sid: why for sid, why in zip(ids, errors) if why}
    assert list(recorded) == bad and rel in recorded[bad[0]]
    manifest = json.loads((wf.path / "results/cache/manifest.json").read_text())
    assert manifest["skipped"] == 1 and {s["name"]: s["n_skipped"] for s in manifest["shards"]}[stale] == 1
    assert bad[0] not in set(pd.read_parquet(wf.path / "results/cache/manifest.parquet").sample_id)
    result = assert_up_to_date_and_valid(wf)
    assert result["samples_skipped"] == 1 and result["samples_cached"] == result["samples_indexed"] - 1
    assert "(1 skipped on error)" in (wf.path / "results/logs/validate_cache.log").read_text()


@pytest.mark.parametrize("preprocess, rows", [("pad", 2116), ("crop", 1564)])
def test_cache_estimate_for_the_real_data_set(tmp_path, preprocess, rows):
    """R2R-CE at 644: pad keeps 46x46 patch rows (5.31 TB), crop the 34x46 of its 35x46 grid (3.92 TB)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["spatial"].update(preset="vggt-1b", image_size=644, preprocess=preprocess, frame_size=[640, 480])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vlnflow"), "cache", "estimate", "--config", "config.yaml", "--samples", "612492"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    total = 612492 * rows * 2048 * 2
    assert total == {"pad": 5_308_551_462_912, "crop": 3_923_711_950_848}[preprocess]
    assert f"total              {total:,} B = {total / 1e12:.3f} TB" in proc.stdout, proc.stdout
    assert f"{rows} x 2048 bfloat16 = {rows * 4096:,} B" in proc.stdout
    count = config["shards"]["count"]
    assert f"files              {count + 2} ({count} shard files + manifest.json + manifest.parquet)" in proc.stdout
