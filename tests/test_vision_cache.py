"""The per-frame vision cache's files and settings (tiny Qwen2.5-VL on CPU): a shard job stores every frame of
its samples once with the tower's rows, resumes after a crash, and validates; the fingerprint follows the Qwen
settings and not the VGGT ones; training refuses a cache of other settings or another tower, and a cache
while the vision blocks train."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlnflow.cache import format as fmt
from vlnflow.cache.vision_fingerprint import fingerprint_fields, vision_fingerprint
from vlnflow.cache.vision_precompute import TOWER_DIGEST, precompute_vision_shard, unique_frames
from vlnflow.cache.vision_validate import merge_vision_manifest, validate_vision_cache, validate_vision_shard
from vlnflow.config import ConfigError, load_config
from vlnflow.errors import UserError
from vlnflow.model.frames import load_qwen_frame
from vlnflow.model.loading import frame_geometry, load_processors, resolve_model_config
from vlnflow.model.vision_rows import build_tower, tower_digest, tower_rows
from vlnflow.train.vision_source import VisionSource, build_vision_source

from conftest import REPO


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A shard of 3 samples over 5 frames (shared across histories), its config, the built vision cache."""
    work = tmp_path_factory.mktemp("vision")
    root = work / "frames"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / f"f{i}.png")
    samples = pd.DataFrame({"sample_id": ["s0", "s1", "s2"], "episode_id": ["e"] * 3,
                            "frames": [["f0.png"], ["f0.png", "f1.png"], ["f0.png", "f2.png", "f3.png", "f4.png"]]})
    shard = work / "shard_00000.parquet"
    samples.to_parquet(shard)
    samples.to_parquet(work / "samples.parquet")
    config = load_config(REPO / "config.yaml", {"dataset": {"root": str(root)}, "cache": {"vision": True, "vision_batch": 2,
                                                                                           "vision_dtype": "float32"}})
    out = work / "vision" / "shard_00000.h5"
    stats = precompute_vision_shard(shard, "fp-shard", out, work / "vision" / ".partial" / out.name, config, progress=False)
    manifest = merge_vision_manifest([out], work / "vision" / "manifest.json", work / "vision" / "manifest.parquet")
    return work, config, shard, out, stats, manifest


def live_rows(config, rel):
    model_cfg = resolve_model_config(config)
    _, processor = load_processors(model_cfg, frame_geometry(config))
    tower = build_tower(model_cfg, "cpu")
    p = processor(images=[load_qwen_frame(f"{config['dataset']['root']}/{rel}", frame_geometry(config))], return_tensors="pt")
    return tower_rows(tower, p["pixel_values"], p["image_grid_thw"])[0]


def test_every_frame_once_with_the_towers_rows(job):
    work, config, shard, out, stats, manifest = job
    assert stats["frames"] == 5 and stats["frame_refs"] == 7 and stats["computed"] == 5
    with h5py.File(out, "r") as f:
        ids = list(f[fmt.SAMPLE_ID].asstr()[...])
        assert ids == ["f0.png", "f1.png", "f2.png", "f3.png", "f4.png"]
        geometry = frame_geometry(config)  # crop 640x480 at 56: a 2x4 grid, the tiny tower's 32 channels
        assert f[fmt.FEATURES].shape == (5, geometry.feature_tokens, 32) and (f.attrs["grid_h"], f.attrs["grid_w"]) == geometry.kept_grid
        assert f.attrs["encoder_fingerprint"] == vision_fingerprint(config)
        stored = fmt.decode(f[fmt.FEATURES][3], "float32")
    assert torch.equal(stored, live_rows(config, "f3.png"))  # float32 storage of the CPU tower: bit for bit
    assert manifest["samples"] == 5 and manifest["kind"] == "vision" and manifest["tower_digest"]


def test_a_killed_job_resumes_and_gives_the_same_file(job, tmp_path):
    work, config, shard, out, _, _ = job
    tower = build_tower(resolve_model_config(config), "cpu")

    forward, calls = tower.forward, []

    def dies(*args, **kwargs):  # the tower, killed on its second batch
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return forward(*args, **kwargs)

    again, partial = tmp_path / "shard_00000.h5", tmp_path / ".partial" / "shard_00000.h5"
    tower.forward = dies
    with pytest.raises(RuntimeError, match="killed"):
        precompute_vision_shard(shard, "fp-shard", again, partial, config, tower=tower, progress=False)
    del tower.forward
    assert partial.exists() and not again.exists()  # never a half file under the final name
    stats = precompute_vision_shard(shard, "fp-shard", again, partial, config, tower=tower, progress=False)
    assert stats["resumed"] == 2 and stats["computed"] == 3
    with h5py.File(again, "r") as a, h5py.File(out, "r") as b:
        assert np.array_equal(a[fmt.FEATURES][...], b[fmt.FEATURES][...])


def test_validation_passes_and_catches_a_missing_frame(job, tmp_path):
    work, config, shard, out, _, _ = job
    expected = {"encoder_fingerprint": vision_fingerprint(config), "shard_fingerprint": "fp-shard", "dtype": "float32"}
    report = validate_vision_shard(out, shard, expected, config, device="cpu")
    assert report["ok"], report["problems"]
    assert report["spot_check"]["checked"] and all(c["identical"] for c in report["spot_check"]["checked"])
    (tmp_path / "r.json").write_text(__import__("json").dumps(report))
    result = validate_vision_cache(work / "vision" / "manifest.json", [tmp_path / "r.json"], work / "samples.parquet",
                                   expected["encoder_fingerprint"], tmp_path / "v.json")
    assert result["ok"], result["problems"]
    more = pd.read_parquet(work / "samples.parquet")
    more.loc[len(more)] = ["s3", "e", ["f0.png", "f9.png"]]  # an indexed frame the cache lacks
    more.to_parquet(tmp_path / "more.parquet")
    result = validate_vision_cache(work / "vision" / "manifest.json", [tmp_path / "r.json"], tmp_path / "more.parquet",
                                   expected["encoder_fingerprint"], tmp_path / "v2.json")
    assert not result["ok"] and "f9.png" in result["problems"][0]
    stale = validate_vision_shard(out, shard, {**expected, "encoder_fingerprint": "other"}, config, device="cpu")
    assert not stale["ok"] and "stale" in stale["problems"][0]


def test_fingerprint_follows_qwen_settings_not_vggt_ones():
    base = load_config(REPO / "config.yaml")
    fp = vision_fingerprint(base)
    for overrides in ({"spatial": {"seed": 5}}, {"spatial": {"layer": -3}}, {"spatial": {"reference_frame": "first"}},
                      {"cache": {"dtype": "float8_e4m3"}}, {"model": {"lam": 1.0}}, {"model": {"attention": "torch"}}):
        assert vision_fingerprint(load_config(REPO / "config.yaml", overrides)) == fp, overrides
    for overrides in ({"model": {"seed": 1}}, {"model": {"dtype": "float16"}}, {"spatial": {"preprocess": "pad"}},
                      {"spatial": {"image_size": 112}}, {"model": {"tiny": {"vision_depth": 3}}}):
        assert vision_fingerprint(load_config(REPO / "config.yaml", overrides)) != fp, overrides


def test_fingerprint_of_a_checkpoint_digests_its_visual_tensors(tmp_path):
    from vlnflow.model.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "qwen", image_size=56)
    config = load_config(REPO / "config.yaml", {"model": {"qwen_path": str(ckpt)}})
    fields = fingerprint_fields(config)
    assert fields["weights"].startswith("sha256:") and fields["vision_config"]["depth"] == 2
    other = write_tiny_checkpoint(tmp_path / "qwen2", image_size=56, seed=1)
    assert fingerprint_fields(load_config(REPO / "config.yaml", {"model": {"qwen_path": str(other)}}))["weights"] != fields["weights"]


def test_training_refuses_another_fingerprint_or_tower(job):
    work, config, _, _, _, manifest = job
    path = work / "vision" / "manifest.json"
    good = VisionSource(path, expected_fingerprint=vision_fingerprint(config), tower_digest=manifest["tower_digest"])
    assert len(good.rows(["f0.png", "f4.png"])) == 2 and good.rows(["f0.png", "f9.png"]) is None
    with pytest.raises(UserError, match=f"vision fingerprint {manifest['encoder_fingerprint']}.*give other"):
        VisionSource(path, expected_fingerprint="other", tower_digest=manifest["tower_digest"])
    with pytest.raises(UserError, match="weights digest"):
        VisionSource(path, expected_fingerprint=vision_fingerprint(config), tower_digest="0" * 64)
    with pytest.raises(UserError, match="does not exist"):
        VisionSource(work / "nowhere.json", expected_fingerprint="x", tower_digest="y")


def test_training_builds_the_source_only_with_cache_vision_and_the_same_frozen_tower(job):
    work, config, _, _, _, manifest = job
    from vlnflow.model.loading import build_model

    model = build_model(resolve_model_config(config), 4, (2, 4))
    config = {**config, "train": {**config["train"], "vision_cache": str(work / "vision" / "manifest.json")}}
    assert build_vision_source({**config, "cache": {**config["cache"], "vision": False}}, model) is None
    assert build_vision_source(config, model).store.dtype == "float32"
    assert tower_digest(model.visual) == manifest["tower_digest"]  # training builds the tower the job built
    with pytest.raises(ConfigError, match="vision blocks train"):
        build_vision_source({**config, "train": {**config["train"], "lr": {**config["train"]["lr"], "vision": 1e-5}}}, model)
    other = build_model({**resolve_model_config(config), "seed": 7}, 4, (2, 4))  # same settings but the seed: refused
    with pytest.raises(UserError):
        build_vision_source(config, other)


def test_settings_that_exclude_each_other_fail_at_parse_time():
    with pytest.raises(ConfigError, match="'train.vision_cache'"):
        load_config(REPO / "config.yaml", {"cache": {"vision": True}, "train": {"vision_cache": None}})
    with pytest.raises(ConfigError, match="'cache.vision'.*freeze_vision"):
        load_config(REPO / "config.yaml", {"cache": {"vision": True}, "model": {"freeze_vision": False}})
    with pytest.raises(ConfigError, match="'cache.vision'.*lr.vision"):
        load_config(REPO / "config.yaml", {"cache": {"vision": True}, "train": {"lr": {"vision": 1e-6}}})
    assert load_config(REPO / "config.yaml", {"model": {"freeze_vision": False}})["cache"]["vision"] is False


def test_unique_frames_keep_first_appearance():
    assert unique_frames([["a", "b"], ["b", "c"], ["a"]]) == ["a", "b", "c"]


def test_estimate_gives_the_sizes_and_read_rate(job):
    from vlnflow.cache.vision_estimate import vision_estimate

    real = {"spatial": {"image_size": 644, "frame_size": [640, 480]}, "model": {"preset": "qwen2.5-vl-7b"},
            "history": {"max_frames": 8}, "cluster": {"gpus_per_node": 8}}
    crop = vision_estimate(load_config(REPO / "config.yaml", {**real, "spatial": {**real["spatial"], "preprocess": "crop"}}), 612492)
    pad = vision_estimate(load_config(REPO / "config.yaml", {**real, "spatial": {**real["spatial"], "preprocess": "pad"}}), 612492)
    assert (crop.grid, crop.channels, crop.bytes_per_frame) == ((34, 46), 1280, 34 * 46 * 1280 * 2)  # 4.0 MB
    assert (pad.grid, pad.bytes_per_frame) == ((46, 46), 46 * 46 * 1280 * 2)  # 5.4 MB
    fp8 = vision_estimate(load_config(REPO / "config.yaml", {**real, "cache": {"vision_dtype": "float8_e4m3"}}), 612492)
    assert fp8.bytes_per_frame == 34 * 46 * (1280 + 4)  # crop (config.yaml): half, plus one float32 scale per row
    assert crop.frames == 612492 and crop.frames_per_sample == 9 and crop.total_bytes == 612492 * crop.bytes_per_frame
    assert crop.read_rate(2.0) == (9 * crop.bytes_per_frame * 2.0, 9 * crop.bytes_per_frame * 2.0 * 8)
    work = job[0]  # from an index: its distinct frames and mean frames per sample
    small = vision_estimate(job[1], 3, index=work / "samples.parquet")
    assert (small.frames, small.frames_per_sample) == (5, 7 / 3)
    assert any("36.0 MB" in line for line in crop.lines())


def test_report_section_says_what_was_built_and_how_fast(job, tmp_path):
    import json

    from vlnflow.cache.vision_estimate import report_markdown

    work, config, _, _, stats, _ = job
    (tmp_path / "s.stats.json").write_text(json.dumps(stats))
    text = report_markdown(config, 3, index=str(work / "samples.parquet"), manifest_json=str(work / "vision" / "manifest.json"),
                           stats_files=[str(tmp_path / "s.stats.json")])
    assert "## Per-frame vision cache" in text and "frames           5 (distinct frames" in text
    assert "built            5 frames in 1 files" in text and "frames/s per GPU (5 frames in" in text
    assert "read rate" in text  # at the committed docs/results training rate (no run here)
