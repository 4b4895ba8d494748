"""Shared by the training tests: a demo feature cache built in-process, a cache with holes, and a
trainer run in a subprocess (DeepSpeed's distributed init would leak state into pytest)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from vlnflow.config import deep_merge, load_config

REPO = Path(__file__).resolve().parents[1]

# The settings the training and workflow tests were written for: config.yaml's before the demo was set up to learn
# (issue 24: 300 steps, held-out episodes, 84 px frames, ...). Tests start from config.yaml + these, then their own
# overrides, so a change to the demo's training does not silently change what they run; the demo's own settings are
# exercised by test_demo_learns.py and the workflow's dry runs.
TEST_SETTINGS = {
    "dataset": {"prompt_style": "auto", "val_fraction": 0.0},
    "spatial": {"image_size": 56, "reference_frame": "last"},
    "model": {"lam": 0.2, "tiny": {"initializer_range": 0.02}},
    "train": {"per_device_batch": 2, "grad_accum": 2, "max_steps": 4, "save_every": 2, "lr": {"llm": 1.0e-5, "merger": 1.0e-4},
              "warmup_steps": 0, "warmup_ratio": 0.0, "eval_every": None, "loader": {"workers": 1}},
}


def pinned_config(overrides: dict) -> dict:
    """config.yaml (raw) + TEST_SETTINGS + overrides, not yet validated."""
    return deep_merge(deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()), TEST_SETTINGS), overrides)


def build_cache(overrides: dict, work: Path, pinned: bool = True) -> dict:
    """index -> shards -> precompute every shard -> manifest, through the library functions.

    `overrides` (deep-merged into config.yaml + TEST_SETTINGS; without `pinned`, config.yaml as shipped) must point dataset.root at a demo and train.samples /
    train.cache under `work`; returns the validated config.
    """
    from vlnflow.cache.manifest import merge_manifest
    from vlnflow.cache.precompute import precompute_shard
    from vlnflow.data.index import IndexSettings, build_index
    from vlnflow.data.shards import read_shard_list, write_shards
    from vlnflow.spatial import SpatialEncoder

    config = load_config(REPO / "config.yaml", deep_merge(TEST_SETTINGS, overrides) if pinned else overrides)
    idx = work / "index"
    build_index(IndexSettings.from_config(config), str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))
    shards = work / "shards"
    write_shards(str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(shards), str(shards / "shards.json"), config["shards"]["count"])
    encoder = SpatialEncoder.from_config(config["spatial"])
    h5s = []
    for shard in read_shard_list(str(shards / "shards.json")):
        out = work / "cache" / f"{shard['name']}.h5"
        precompute_shard(shards / f"{shard['name']}.parquet", shard["fingerprint"], out, work / "cache" / ".partial" / out.name,
                         config, encoder=encoder, progress=False)
        h5s.append(out)
    merge_manifest(h5s, work / "cache" / "manifest.json", work / "cache" / "manifest.parquet")
    return config


def partial_cache(full_manifest: Path, out: Path, drop: list[str]) -> Path:
    """A copy of the cache whose manifest lacks `drop` (shard files linked, not copied)."""
    out.mkdir(parents=True)
    shutil.copy(full_manifest, out / "manifest.json")
    table = pd.read_parquet(full_manifest.with_suffix(".parquet"))
    assert set(drop) <= set(table.sample_id)
    table[~table.sample_id.isin(drop)].to_parquet(out / "manifest.parquet", index=False)
    for h5 in full_manifest.parent.glob("*.h5"):
        (out / h5.name).symlink_to(h5)
    return out / "manifest.json"


def swapped_cache(full_manifest: Path, out: Path, a: str, b: str) -> Path:
    """A copy of the cache whose manifest points sample `a` at `b`'s row and `b` at `a`'s: a reader that
    trusts the manifest gets the wrong features for both (the wrong-feature control of the faithfulness tests)."""
    out.mkdir(parents=True)
    shutil.copy(full_manifest, out / "manifest.json")
    table = pd.read_parquet(full_manifest.with_suffix(".parquet"))
    ia, ib = (int(table.index[table.sample_id == s][0]) for s in (a, b))
    cols = [c for c in table.columns if c != "sample_id"]
    table.loc[[ia, ib], cols] = table.loc[[ib, ia], cols].to_numpy()
    table.to_parquet(out / "manifest.parquet", index=False)
    for h5 in full_manifest.parent.glob("*.h5"):
        (out / h5.name).symlink_to(h5)
    return out / "manifest.json"


# The first lines of a training driver (run_trainer's `driver`): vlnflow.train.run's main with deepspeed.initialize
# wrapped so that the engine is kept (`engines[0]` afterwards); a driver that defines `on_engine(engine)` before
# these lines also sees the engine as initialize returns it (e.g. to copy the initial weights).
KEEP_ENGINE = """
import sys
import deepspeed, torch
engines = []
_initialize = deepspeed.initialize
def _keep(*args, **kwargs):
    out = _initialize(*args, **kwargs)
    engines.append(out[0])
    globals().get("on_engine", lambda engine: None)(out[0])
    return out
deepspeed.initialize = _keep
from vlnflow.train.run import main
rc = main(sys.argv[1:])
if rc:
    sys.exit(rc)
"""


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Run:
    """A finished training subprocess: its output, train.log and metrics.jsonl lines (`metrics`: the
    optimizer-step records, `val`: the validation records, kind "val")."""

    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.proc, self.dir = proc, run_dir
        self.log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
        path = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        self.metrics = [r for r in records if r.get("kind") != "val"]
        self.val = [r for r in records if r.get("kind") == "val"]

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]

    def by_step(self) -> dict[int, dict]:
        """The last metrics line of each step (a crashed attempt's lines come first)."""
        return {m["step"]: m for m in self.metrics}

    def checkpoints(self) -> list[str]:
        ckpt = self.dir / "checkpoints"
        return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) if ckpt.exists() else []


def run_trainer(work: Path, name: str, overrides: dict, driver: str, *args: str, driver_flags: tuple = (),
                expect_rc: int = 0, pinned: bool = True) -> Run:
    """Write <work>/<name>.yaml (config.yaml + TEST_SETTINGS + overrides; without `pinned`, config.yaml as shipped +
    overrides) and run `driver` (a script ending in
    vlnflow.train.run's main) in run dir <work>/runs/<name>; assert its exit code."""
    config = pinned_config(overrides) if pinned else deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()), overrides)
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    driver_path = work / f"{name}.driver.py"
    driver_path.write_text(driver)
    run_dir = work / "runs" / name
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, str(driver_path), *driver_flags, "--config", str(config_path), "--run-dir", str(run_dir), *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect_rc, (
        f"{' '.join(cmd)}: rc {proc.returncode}, expected {expect_rc}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return Run(proc, run_dir)


def step_order(config: dict) -> list[str]:
    """Sample ids in the order a 1-rank run of `config` consumes them in epoch 0."""
    from vlnflow.train.data import micro_batches

    t = config["train"]
    ids = pd.read_parquet(t["samples"]).sample_id.tolist()
    micro = micro_batches(len(ids), t["per_device_batch"], 1, 0, t["seed"], 0)
    return [ids[i] for batch in micro for i in batch]
