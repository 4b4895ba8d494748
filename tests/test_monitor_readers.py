"""Incremental reading of metrics.jsonl and tqdm/Trainer logs (recorded logs in tests/data/monitor/)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vlnflow.monitor.readers import LogFollower, parse_log_dict, parse_metrics_line, parse_progress

DATA = Path(__file__).parent / "data" / "monitor"


def test_metrics_jsonl_is_read_whole_with_typed_values():
    updates = LogFollower(DATA / "metrics.jsonl").poll()
    assert [u["step"] for u in updates] == list(range(1, 31))
    last = updates[-1]
    assert last["max_steps"] == 1000 and last["cached_samples"] == 477 and last["live_samples"] == 3
    assert last["s_per_it"] == pytest.approx(2.0) and last["gpu_mem_gib"] == [61.2, 61.4]
    assert isinstance(last["step"], int) and isinstance(last["loss"], float)


def test_truncated_last_line_waits_for_its_newline(tmp_path):
    log = tmp_path / "metrics.jsonl"
    shutil.copy(DATA / "metrics_truncated.jsonl", log)
    follower = LogFollower(log)
    assert [u["step"] for u in follower.poll()] == list(range(1, 13))
    full_line_13 = (DATA / "metrics.jsonl").read_text().splitlines(keepends=True)[12]
    partial = log.read_text().splitlines(keepends=True)[-1]
    rest = full_line_13[len(partial):]
    with open(log, "a") as fh:  # the writer finishes the line in two pieces
        fh.write(rest[:-5])
    assert follower.poll() == []
    with open(log, "a") as fh:
        fh.write(rest[-5:])
    updates = follower.poll()
    assert [u["step"] for u in updates] == [13]
    assert follower.bad_lines == 0


def test_bad_lines_are_counted_with_line_number_and_reason(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "s_per_it": 2.0}\nnot json\n{"step": "two"}\n[1, 2]\n{"step": 3}\n')
    follower = LogFollower(log)
    assert [u["step"] for u in follower.poll()] == [1, 3]
    assert follower.bad_lines == 3
    assert follower.first_bad.startswith("line 2: not valid JSON")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"step": "two"}', '"step" must be an integer'),
        ('{"step": 1.5}', '"step" must be an integer'),
        ('{"loss": true}', '"loss" must be a finite number'),
        ('{"gpu_mem_gib": [1.0, "x"]}', '"gpu_mem_gib" must be a list of numbers'),
        ('"text"', "expected a JSON object"),
    ],
)
def test_metrics_line_errors_name_the_key(line, message):
    with pytest.raises(ValueError, match=message):
        parse_metrics_line(line)


def test_missing_keys_are_unknown_not_errors():
    assert parse_metrics_line('{"step": 4, "loss": null, "extra": "kept out"}') == {"step": 4}


def test_empty_file_and_missing_file_give_nothing(tmp_path):
    empty = tmp_path / "train.log"
    empty.write_text("\n  \n")
    follower = LogFollower(empty)
    assert follower.poll() == [] and follower.format is None
    assert LogFollower(tmp_path / "absent.jsonl").poll() == []


def test_truncated_or_replaced_file_is_read_from_the_start(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = (DATA / "metrics.jsonl").read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:10]))
    follower = LogFollower(log)
    assert len(follower.poll()) == 10
    log.write_text("".join(lines[:3]))  # truncated in place and rewritten (shorter)
    assert [u["step"] for u in follower.poll()] == [1, 2, 3]
    assert follower.restarts == 1
    replacement = tmp_path / "new.jsonl"
    replacement.write_text("".join(lines[:4]))
    os.replace(replacement, log)  # rotated: a new file (new inode) under the same name
    assert [u["step"] for u in follower.poll()] == [1, 2, 3, 4]
    assert follower.restarts == 2


@pytest.mark.parametrize(
    "text, step, total, elapsed, s_per_it",
    [
        ("  0%|          | 20/28710 [23:45<440:39:57, 55.29s/it]", 20, 28710, 1425.0, 55.29),
        (" 50%|#####     | 20/40 [00:04<00:04,  4.95it/s]", 20, 40, 4.0, 1 / 4.95),
        ("  3%|3  | 100/3000 [1:02:03<30:00:00, 37.23s/it, loss=2.1]", 100, 3000, 3723.0, 37.23),
    ],
)
def test_parse_progress_forms(text, step, total, elapsed, s_per_it):
    update = parse_progress(text)
    assert update["step"] == step and update["max_steps"] == total
    assert update["elapsed_s"] == elapsed
    assert update["s_per_it"] == pytest.approx(s_per_it)


def test_parse_progress_unknown_rate_and_incomplete_bar():
    assert parse_progress("  0%|          | 0/28710 [00:00<?, ?it/s]") == {"step": 0, "max_steps": 28710, "elapsed_s": 0.0}
    assert parse_progress("  0%|          | 20/28710 [23:45<440:39:57, 55.2") is None


def test_parse_log_dict_old_and_new_transformers_forms():
    assert parse_log_dict("{'loss': 2.31, 'learning_rate': 1e-05, 'epoch': 0.01}") == {
        "loss": 2.31, "lr": 1e-05, "epoch": 0.01}
    assert parse_log_dict("{'loss': '1.885', 'grad_norm': '0.72', 'learning_rate': '3.75e-05', 'epoch': '0.25'}") == {
        "loss": 1.885, "lr": 3.75e-05, "epoch": 0.25}
    assert parse_log_dict("{'train_runtime': '8.093', 'train_loss': '1.447', 'epoch': '0.4'}") == {
        "epoch": 0.4, "finished": True}


def test_seed_per_segment_log_dict_and_metrics_loss_terms():
    """Issue 26: the seed's compute_loss logs its per-segment losses as a dict of their own (transformers 4.50 prints
    floats, 5.x strings); metrics.jsonl carries the same names."""
    line = ("{'loss_subinstruction': 1.21, 'loss_2d': 2.4, 'loss_3d': 2.05, 'loss_action': 0.08, "
            "'loss_action_head': 0.39, 'loss_text_total': 1.92, 'epoch': 0.01}")
    want = {"loss_subinstruction": 1.21, "loss_2d": 2.4, "loss_3d": 2.05, "loss_action": 0.08, "loss_action_head": 0.39,
            "loss_text_total": 1.92, "epoch": 0.01}
    assert parse_log_dict(line) == want
    assert parse_log_dict(line.replace(": 2.4,", ": '2.4',")) == want
    record = {"step": 3, "loss": 2.31, "loss_text_total": 1.92, "loss_action_head": 0.39, "action_head_weight": 1.0, "loss_2d": 2.4}
    assert parse_metrics_line(json.dumps(record)) == record
    with pytest.raises(ValueError, match='"loss_2d" must be a finite number'):
        parse_metrics_line(json.dumps({"step": 3, "loss_2d": "x"}))


def test_seed_log_gives_training_bar_only_plus_cache_lines():
    updates = LogFollower(DATA / "seed_hf_tqdm.log").poll()
    progress = [u for u in updates if "step" in u]
    # the checkpoint-shard bar (total 5) precedes training; the evaluation bar (total 5) after it is ignored
    assert [u["max_steps"] for u in progress if u["max_steps"] == 5] == [5] * 6
    training = [u["step"] for u in progress if u["max_steps"] == 28710]
    assert training[-1] == 20 and sorted(set(training)) == list(range(21))
    assert progress[-1]["s_per_it"] == pytest.approx(55.0)
    assert {"cache_manifest": "/shared/vln/cache/manifest.json"} in updates
    assert max(u.get("cached_batches", 0) for u in updates) == 20
    assert [u["loss"] for u in updates if "loss" in u] == [2.4, 2.3]


def test_recorded_hf_trainer_log():
    updates = LogFollower(DATA / "hf_trainer_cpu.log").poll()
    progress = [u for u in updates if "step" in u]
    assert progress[-1]["step"] == 40 and progress[-1]["max_steps"] == 40
    assert progress[-1]["s_per_it"] == pytest.approx(1 / 4.94)
    assert [u["loss"] for u in updates if "loss" in u] == [1.359, 1.471, 1.66, 1.298]
    assert any(u.get("finished") for u in updates)


def test_text_log_read_in_pieces_gives_the_same_updates(tmp_path):
    data = (DATA / "seed_hf_tqdm.log").read_bytes()
    whole = LogFollower(DATA / "seed_hf_tqdm.log").poll()
    log = tmp_path / "train.log"
    log.write_bytes(b"")
    follower = LogFollower(log)
    pieces = []
    for start in range(0, len(data), 97):  # cuts land inside bars, dicts and multi-byte bar glyphs
        with open(log, "ab") as fh:
            fh.write(data[start : start + 97])
        pieces.extend(follower.poll())
    # the unterminated newest bar may be reported at several polls; drop consecutive repeats
    deduped = [u for i, u in enumerate(pieces) if i == 0 or u != pieces[i - 1]]
    whole_deduped = [u for i, u in enumerate(whole) if i == 0 or u != whole[i - 1]]
    assert deduped == whole_deduped
