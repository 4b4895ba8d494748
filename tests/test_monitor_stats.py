"""s/it (median of the last N steps), steps/s, ETA and counts from recorded logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlnflow.monitor.readers import LogFollower
from vlnflow.monitor.stats import RunState, format_duration, summarize

DATA = Path(__file__).parent / "data" / "monitor"


def state_from(path: Path, window: int) -> RunState:
    state = RunState(window)
    for update in LogFollower(path).poll():
        state.update(update)
    return state


def test_metrics_jsonl_summary():
    # last 20 steps: s/it 2.1, 2.2, 2.3, 2.4, 2.0 four times, one 2.0 replaced by a 9 s outlier -> median 2.2
    s = summarize(state_from(DATA / "metrics.jsonl", window=20))
    assert s.step == 30 and s.max_steps == 1000
    assert s.s_per_it == pytest.approx(2.2) and s.steps_in_median == 20
    assert s.steps_per_s == pytest.approx(1 / 2.2)
    assert s.eta_s == pytest.approx(970 * 2.2)
    assert format_duration(s.eta_s) == "0:35:34"
    assert s.data_wait_frac == pytest.approx(0.05)
    assert (s.latest["cached_samples"], s.latest["live_samples"]) == (477, 3)
    assert s.latest["loss"] == pytest.approx(2.4)
    assert not s.finished


def test_window_sets_how_many_steps_the_median_covers():
    s = summarize(state_from(DATA / "metrics.jsonl", window=3))  # steps 28, 29, 30: 2.3, 2.4, 2.0
    assert s.s_per_it == pytest.approx(2.3) and s.steps_in_median == 3
    assert s.eta_s == pytest.approx(970 * 2.3)


def test_seed_tqdm_log_summary():
    # steps 11..20 take 60 - 0.25 k s: median of 57.25 .. 55.00 = 56.125
    s = summarize(state_from(DATA / "seed_hf_tqdm.log", window=10))
    assert s.step == 20 and s.max_steps == 28710
    assert s.s_per_it == pytest.approx(56.125)
    assert format_duration(s.eta_s) == "447:17:06"  # (28710 - 20) * 56.125 s
    assert s.latest["cached_batches"] == 20 and s.latest["loss"] == pytest.approx(2.3)


def test_recorded_hf_trainer_log_summary():
    s = summarize(state_from(DATA / "hf_trainer_cpu.log", window=5))
    # steps 36..40 show 4.95 it/s; step 40's final redraw says 4.94 it/s and replaces it
    assert s.s_per_it == pytest.approx(1 / 4.95)
    assert s.step == 40 and s.eta_s == 0 and s.finished


def test_s_per_it_derived_from_times_when_lines_lack_it():
    state = RunState(window=10)
    for step, t in [(5, 100.0), (10, 110.0), (15, 125.0), (20, 136.0)]:  # logged every 5 steps
        state.update({"step": step, "time": t, "max_steps": 100})
    s = summarize(state)
    assert s.s_per_it == pytest.approx(2.2)  # median of 2.0, 3.0, 2.2 s per step
    assert s.eta_s == pytest.approx(80 * 2.2)


def test_repeated_step_replaces_and_backwards_step_restarts():
    state = RunState(window=10)
    for step, s_per_it in [(1, 5.0), (2, 5.0), (2, 7.0), (3, 7.0)]:
        state.update({"step": step, "s_per_it": s_per_it, "max_steps": 10})
    assert [p.step for p in state.points] == [1, 2, 3]
    assert summarize(state).s_per_it == pytest.approx(7.0)
    state.update({"step": 1, "s_per_it": 1.0, "max_steps": 10})  # resumed from an earlier checkpoint
    assert [p.step for p in state.points] == [1] and state.restarts == 1
    state.update({"step": 0, "max_steps": 500})  # another bar with another total: not a restart
    assert [p.step for p in state.points] == [0] and state.restarts == 1


def test_nothing_known_yet():
    s = summarize(RunState())
    assert s.step is None and s.s_per_it is None and s.eta_s is None and s.steps_per_s is None


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3600, "1:00:00"), (1586397, "440:39:57")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        RunState(window=0)
