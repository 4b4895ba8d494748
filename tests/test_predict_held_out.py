"""`vlnflow predict --held-out`: which samples it answers, and the majority baseline printed next to the accuracy."""

from __future__ import annotations

import pandas as pd
import pytest

from vlnflow.data.split import is_val_episode
from vlnflow.errors import UserError
from vlnflow.infer.predict import Prediction, held_out_fraction, read_samples, summary


def _prediction(label: str, action: str | None) -> Prediction:
    return Prediction("ep/0", action or "???", label, action, label, action == label, "cached", 1.0)


def test_summary_has_the_majority_baseline_of_the_same_samples():
    labels = ["MOVE_FORWARD"] * 5 + ["TURN_LEFT"] * 3 + ["STOP"] * 2
    answers = ["MOVE_FORWARD"] * 4 + [None] + ["TURN_LEFT", "TURN_RIGHT", "TURN_LEFT"] + ["MOVE_FORWARD", "STOP"]
    result = summary([_prediction(label, answer) for label, answer in zip(labels, answers)])
    assert (result["correct"], result["n"], result["action_accuracy"]) == (7, 10, 0.7)
    assert (result["majority_action"], result["majority_correct"], result["majority_accuracy"]) == ("MOVE_FORWARD", 5, 0.5)
    assert result["per_action"] == {"STOP": {"n": 2, "correct": 1}, "MOVE_FORWARD": {"n": 5, "correct": 4},
                                    "TURN_LEFT": {"n": 3, "correct": 2}}


def test_held_out_samples_are_the_validation_episodes(tmp_path):
    episodes = [f"ep{i:04d}" for i in range(40)]
    table = pd.DataFrame({"sample_id": [f"{e}/{s:05d}" for e in episodes for s in range(3)],
                          "episode_id": [e for e in episodes for _ in range(3)], "action": "STOP"})
    path = tmp_path / "samples.parquet"
    table.to_parquet(path)
    held = read_samples(path, None, 0.1)
    expected = [e for e in episodes if is_val_episode(e, 0.1)]
    assert 0 < len(expected) < len(episodes)  # the fraction holds some episodes out, not all
    assert [r["episode_id"] for r in held] == [e for e in expected for _ in range(3)]
    assert [r["sample_id"] for r in read_samples(path, 4, 0.1)] == [r["sample_id"] for r in held[:4]]
    assert len(read_samples(path, 0)) == len(table)  # without --held-out: every sample
    with pytest.raises(UserError, match=r"holds no held-out samples \(dataset.val_fraction 1e-09\)"):
        read_samples(path, None, 1e-9)


def test_held_out_needs_a_run_that_held_episodes_out():
    assert held_out_fraction({"val_fraction": 0.1}, "results/export/demo") == 0.1
    for settings in ({"val_fraction": 0.0}, {}):  # an export from before val_fraction was recorded has none
        with pytest.raises(UserError, match=r"--held-out: the run exported to results/export/demo held out no episodes"):
            held_out_fraction(settings, "results/export/demo")
