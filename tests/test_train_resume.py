"""Issue 5, resume and safety of the DeepSpeed trainer (tiny config, CPU, gloo, one process).

A run killed after step 3 (its last complete checkpoint is step 2; a half-written step 3
checkpoint lies beside it) resumes and continues the uninterrupted run's loss curve and its
cached/live sample counters exactly (fp32 on CPU), its metrics.jsonl and TensorBoard curves
holding every step once; keep_last prunes old checkpoints; a cache built by another encoder is
refused unless train.allow_fingerprint_mismatch is set; the zero2_offload and zero3 presets
train, checkpoint and resume to the same curve as zero2. Issue 23: a run stopped by SIGUSR1, then
by train.max_hours, saves where it stops, exits 75 and resumes bit for bit.
Training runs in subprocesses (DeepSpeed's distributed state must not leak into pytest).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_helpers import Run, build_cache, partial_cache, run_trainer, step_order
from vlnflow.config import deep_merge
from vlnflow.train.attempts import read_attempts, read_records
from vlnflow.train.stop import EXIT_STOPPED

CRASH_RC = 17
LOSS_ATOL = 1e-6  # fp32 on CPU, same data order: a resumed run must reproduce the curve bit for bit (almost)
PRESET_RTOL = 1e-5  # another ZeRO stage / DeepSpeedCPUAdam instead of torch AdamW: same math, other kernels

# Runs vlnflow.train.run; --crash-after-metrics N / --crash-after-save N kill the process (no cleanup,
# like a node failure) right after step N's metrics line / step N's checkpoint is written;
# --signal-after-metrics N sends the process SIGUSR1 (Slurm's warning) right after step N's line.
DRIVER = """
import os, signal, sys
crash = {}
while sys.argv[1].startswith(("--crash-after-", "--signal-after-")):
    flag, step = sys.argv.pop(1), int(sys.argv.pop(1))
    crash[flag] = step
from vlnflow.train import checkpoints, metrics
if "--crash-after-metrics" in crash or "--signal-after-metrics" in crash:
    write = metrics.MetricsLog.write
    def write_then_crash(self, **record):
        write(self, **record)
        if record["step"] == crash.get("--crash-after-metrics"):
            if self._tb is not None:
                self._tb.flush()  # as after a long run's periodic flush: the events of this step are on disk
            os._exit(%d)
        if record["step"] == crash.get("--signal-after-metrics"):
            os.kill(os.getpid(), signal.SIGUSR1)
    metrics.MetricsLog.write = write_then_crash
if "--crash-after-save" in crash:
    save = checkpoints.save
    def save_then_crash(engine, ckpt_dir, step, *args, **kwargs):
        save(engine, ckpt_dir, step, *args, **kwargs)
        if step == crash["--crash-after-save"]:
            os._exit(%d)
    checkpoints.save = save_then_crash
from vlnflow.train.run import main
sys.exit(main(sys.argv[1:]))
""" % (CRASH_RC, CRASH_RC)


def base_config(demo: Path, work: Path) -> dict:
    return {
        "dataset": {"root": str(demo / "episodes")},
        "train": {
            "samples": str(work / "index" / "samples.parquet"),
            "cache": str(work / "cache" / "manifest.json"),
            "deepspeed": "zero2",
            "max_steps": 4,
            "per_device_batch": 2,
            "grad_accum": 2,
            "save_every": 1,
            "keep_last": 2,
            "lr": {"llm": 1e-3, "merger": 1e-2},  # large enough that every step moves the loss visibly
            "loader": {"workers": 1},
        },
    }


def train(work: Path, name: str, overrides: dict, *args: str, driver_flags: tuple = (), expect_rc: int = 0) -> Run:
    return run_trainer(work, name, overrides, DRIVER, *args, driver_flags=driver_flags, expect_rc=expect_rc)


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    """The demo cache plus a copy lacking one sample of step 1 and two of step 3 (so live counters matter)."""
    work = tmp_path_factory.mktemp("train_resume")
    config = build_cache(base_config(demo_data, work), work)
    t = config["train"]
    per_step = t["per_device_batch"] * t["grad_accum"]
    order = step_order(config)
    missing = [order[0], order[2 * per_step], order[2 * per_step + 1]]  # step 1: 1 live sample, step 3: 2
    manifest = partial_cache(Path(t["cache"]), work / "partial_cache", missing)
    overrides = deep_merge(base_config(demo_data, work), {"train": {"cache": str(manifest)}})
    return work, overrides, config


@pytest.fixture(scope="module")
def straight(setup):
    work, overrides, _ = setup
    return train(work, "straight", overrides)


@pytest.fixture(scope="module")
def resumed(setup):
    """Killed right after step 3's metrics (before its checkpoint), a half-written step 3 checkpoint planted, rerun
    (TensorBoard on: its curves must not repeat step 3 either)."""
    work, setup_overrides, _ = setup
    overrides = deep_merge(setup_overrides, {"train": {"tensorboard": True}})
    crashed = train(work, "resumed", overrides, driver_flags=("--crash-after-metrics", "3"), expect_rc=CRASH_RC)
    ckpt = crashed.dir / "checkpoints"
    assert crashed.checkpoints() == ["step_0000001", "step_0000002"]
    (ckpt / "step_0000003").mkdir()  # a save cut short: no vlnflow_complete marker, unreadable states
    (ckpt / "step_0000003" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (ckpt / "latest").write_text("step_0000003")
    return crashed, train(work, "resumed", overrides)


@pytest.mark.slow
def test_resumed_run_continues_the_uninterrupted_loss_curve(straight, resumed):
    crashed, run = resumed
    assert [m["step"] for m in straight.metrics] == [1, 2, 3, 4]
    assert [m["step"] for m in crashed.metrics] == [1, 2, 3]
    # step 3 once: the resumed run put metrics.jsonl back to its checkpoint (step 2) and ran step 3 again
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4]
    assert "resuming at optimizer step 2" in run.log and "metrics.jsonl put back to step 2" in run.log
    ref = [m["loss"] for m in straight.metrics]
    assert abs(ref[3] - ref[0]) > 1000 * LOSS_ATOL  # the curve moves: a wrong resume would show
    got = run.by_step()
    for step in (1, 2, 3, 4):
        assert abs(got[step]["loss"] - ref[step - 1]) <= LOSS_ATOL, (step, got[step]["loss"], ref[step - 1])
        assert got[step]["lr"] == pytest.approx(straight.metrics[step - 1]["lr"], rel=1e-9, abs=1e-15)
    assert abs(crashed.metrics[2]["loss"] - ref[2]) <= LOSS_ATOL
    assert run.metrics[-1]["epoch"] == straight.metrics[-1]["epoch"]


@pytest.mark.slow
def test_tensorboard_curves_of_a_resumed_run_hold_each_step_once(straight, resumed):
    """The resumed writer purges what the crashed attempt logged after the checkpoint (step 3)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = resumed
    events = EventAccumulator(str(run.dir / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([m["loss"] for m in straight.metrics], abs=1e-6)


@pytest.mark.slow
def test_stopped_runs_save_exit_75_and_resume_bit_for_bit(setup, straight):
    """SIGUSR1 after step 1 (Slurm's warning, the trainer run alone), then train.max_hours too short for
    another step: each attempt saves where it stops (save_every is far off), exits 75 without summary.json,
    and the next one resumes there; the losses and lr equal the uninterrupted run's, step for step."""
    work, setup_overrides, _ = setup
    overrides = deep_merge(setup_overrides, {"train": {"save_every": 100, "keep_last": 5}})
    signalled = train(work, "stopped", overrides, driver_flags=("--signal-after-metrics", "1"), expect_rc=EXIT_STOPPED)
    assert signalled.checkpoints() == ["step_0000001"] and [m["step"] for m in signalled.metrics] == [1]
    assert "stopping after step 1 of 4: stop_request (SIGUSR1 to pid" in signalled.log
    assert not (signalled.dir / "summary.json").exists()

    budgeted = train(work, "stopped", overrides, "--set", "train.max_hours=1e-6", expect_rc=EXIT_STOPPED)
    assert budgeted.checkpoints() == ["step_0000001", "step_0000002"]
    assert "stopping after step 2 of 4: max_hours (train.max_hours 1e-06 h" in budgeted.log
    assert not (budgeted.dir / "summary.json").exists()

    run = train(work, "stopped", overrides)
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4]  # every step once across the three attempts
    for got, ref in zip(run.metrics, straight.metrics):
        assert (got["loss"], got["lr"], got["live_samples"]) == (ref["loss"], ref["lr"], ref["live_samples"])
    assert (run.dir / "summary.json").exists()

    attempts = read_attempts(run.dir / "attempts.jsonl")
    assert [(a.number, a.resumed_step, a.last_step, a.reason) for a in attempts] == [
        (1, 0, 1, "stop_request"), (2, 1, 2, "max_hours"), (3, 2, 4, "done")]
    assert attempts[0].why.startswith("SIGUSR1 to pid") and attempts[1].why.startswith("train.max_hours")
    assert all(a.restart_lost_s > 0 for a in attempts[1:]) and attempts[0].restart_lost_s is None
    # the stop's own checkpoint is recorded (and in the second attempt the only one)
    events = [(r["attempt"], r["event"], r.get("step")) for r in read_records(run.dir / "attempts.jsonl")]
    assert (2, "checkpoint", 2) in events and (1, "checkpoint", 1) in events


@pytest.mark.slow
def test_resume_restores_the_cached_and_live_counters(straight, resumed):
    _, run = resumed
    assert [m["live_samples"] for m in straight.metrics] == [1, 1, 3, 3]
    assert [m["cached_samples"] for m in straight.metrics] == [3, 7, 9, 13]
    got = run.by_step()
    for step, ref in enumerate(straight.metrics, start=1):
        assert (got[step]["cached_samples"], got[step]["live_samples"]) == (ref["cached_samples"], ref["live_samples"])
    # the resumed process logs step 3's own live samples, not the total since the run began
    after_resume = run.log.split("resuming at optimizer step 2", 1)[1]
    assert "[ACCELERATION] step 3: 2 samples computed live" in after_resume
    assert "[ACCELERATION] Using cached features for batch 4" in after_resume


@pytest.mark.slow
def test_keep_last_prunes_old_checkpoints_and_skips_incomplete_ones(straight, resumed):
    _, run = resumed
    for r in (straight, run):
        assert r.checkpoints() == ["step_0000003", "step_0000004"]  # keep_last 2 of 4 saves
        for tag in r.checkpoints():
            assert (r.dir / "checkpoints" / tag / "vlnflow_complete").read_text().strip() == str(int(tag[5:]))
    # the planted half-written step 3 was overwritten by the resumed run's real save
    assert (run.dir / "checkpoints" / "step_0000003" / "mp_rank_00_model_states.pt").stat().st_size > 1000


@pytest.mark.slow
def test_cache_of_another_encoder_is_refused_unless_overridden(setup):
    work, overrides, config = setup
    full = {"train": {"cache": config["train"]["cache"]}}
    refused = train(work, "mismatch", deep_merge(overrides, full), "--max-steps", "1", "--set", "spatial.seed=1", expect_rc=2)
    manifest = config["train"]["cache"]
    message = f"feature cache {manifest} was built by encoder"
    assert message in refused.proc.stderr and message in refused.log
    assert "train.allow_fingerprint_mismatch: true" in refused.log
    assert not (refused.dir / "metrics.jsonl").exists() and not refused.checkpoints()

    allowed = train(
        work, "mismatch_allowed", deep_merge(overrides, full), "--max-steps", "1",
        "--set", "spatial.seed=1", "--set", "train.allow_fingerprint_mismatch=true",
    )
    assert message in allowed.log and "override set: using it anyway" in allowed.log
    assert f"[INFO] VGGT feature cache enabled: {manifest}" in allowed.log
    assert [(m["step"], m["live_samples"], m["cached_samples"]) for m in allowed.metrics] == [(1, 0, 4)]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zero2_offload", "zero3"])
def test_preset_trains_checkpoints_and_resumes_like_zero2(setup, straight, preset):
    """zero2_offload compiles DeepSpeed's cpu_adam on first use (~45 s, cached in ~/.cache/torch_extensions)."""
    work, overrides, _ = setup
    cfg = deep_merge(overrides, {"train": {"deepspeed": preset}})
    crashed = train(work, preset, cfg, driver_flags=("--crash-after-save", "2"), expect_rc=CRASH_RC)
    assert [m["step"] for m in crashed.metrics] == [1, 2]
    run = train(work, preset, cfg)
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4]
    assert "resuming at optimizer step 2" in run.log
    ref = [m["loss"] for m in straight.metrics]
    assert [m["loss"] for m in run.metrics] == pytest.approx(ref, rel=PRESET_RTOL)
    assert [m["live_samples"] for m in run.metrics] == [m["live_samples"] for m in straight.metrics]
    states = torch.load(run.dir / "checkpoints" / "step_0000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        map_location="cpu", weights_only=False)
    zero = states["ds_config"]["zero_optimization"]
    assert zero["stage"] == (3 if preset == "zero3" else 2)
    assert (zero.get("offload_optimizer") or {}).get("device") == ("cpu" if preset == "zero2_offload" else None)
