"""`vlnflow monitor`: --once on recorded logs, following a log being written, picking the newest run."""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
from pathlib import Path

import pytest

from vlnflow.errors import UserError
from vlnflow.monitor import cli
from vlnflow.monitor.gpu import GpuReading
from vlnflow.monitor.sources import newest_run_dir

DATA = Path(__file__).parent / "data" / "monitor"
NO_GPU = GpuReading((), "no GPU visible (test)")
METRICS = (DATA / "metrics.jsonl").read_text().splitlines(keepends=True)


def run_once(target, **kwargs) -> str:
    out = io.StringIO()
    assert cli.monitor(str(target), once=True, out=out, read_gpus=lambda: NO_GPU, **kwargs) == 0
    return out.getvalue()


def fields(report: str) -> dict[str, str]:
    return dict(re.findall(r"(\S+)=(\S+)", report))


def test_once_on_metrics_jsonl():
    f = fields(run_once(DATA / "metrics.jsonl"))
    assert f["step"] == "30/1000" and f["s/it"] == "2.20" and f["steps/s"] == "0.4545"
    assert f["eta"] == "0:35:34" and f["loss"] == "2.4000"
    assert f["cached"] == "477" and f["live"] == "3" and f["data_wait"] == "5.0%"


def test_once_on_truncated_metrics_reports_the_last_complete_step():
    f = fields(run_once(DATA / "metrics_truncated.jsonl", window=5))
    assert f["step"] == "12/1000" and f["cached"] == "191" and f["live"] == "1"
    assert f["s/it"] == "2.20" and f["eta"] == "0:36:14"  # steps 8..12: 2.3 2.4 2.0 2.1 2.2 -> 2.2; 988 x 2.2 s


def test_once_on_seed_tqdm_log():
    report = run_once(DATA / "seed_hf_tqdm.log", window=10)
    f = fields(report)
    assert f["step"] == "20/28710" and f["s/it"] == "56.12" and f["eta"] == "447:17:06"
    assert f["cached_batches"] == "20" and f["cache"] == "/shared/vln/cache/manifest.json"
    assert "gpu: no GPU visible (test)" in report


def test_once_on_recorded_hf_trainer_log():
    report = run_once(DATA / "hf_trainer_cpu.log")
    assert fields(report)["step"] == "40/40" and "finished" in report


def test_once_with_nothing_to_read_fails_naming_the_file(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("")
    out = io.StringIO()
    with pytest.raises(UserError, match=f"nothing to read yet: {re.escape(str(empty))}"):
        cli.monitor(str(empty), once=True, out=out, read_gpus=lambda: NO_GPU)
    assert "waiting for first step" in out.getvalue()


def test_follows_a_log_while_it_is_written(tmp_path):
    run_dir = tmp_path / "results" / "train" / "run1"
    run_dir.mkdir(parents=True)
    log = run_dir / "metrics.jsonl"
    log.write_text("")
    # what the trainer has written by each report: nothing, 10 lines and half of line 11, 20 lines
    chunks = ["".join(METRICS[:10]) + METRICS[10][:30], METRICS[10][30:] + "".join(METRICS[11:20])]
    t0 = 1_764_250_000.0  # the recorded log's start; step 10 was logged at t0 + 22 s, step 20 at t0 + 44 s
    clock = iter([t0, t0 + 27.0, t0 + 174.0])
    slept = []

    def fake_sleep(seconds):
        slept.append(seconds)
        with open(log, "a") as fh:
            fh.write(chunks[len(slept) - 1])

    out = io.StringIO()
    code = cli.monitor(None, results=tmp_path / "results", interval=10, window=5, iterations=3, out=out,
                       clock=lambda: next(clock), sleep=fake_sleep, read_gpus=lambda: NO_GPU)
    assert code == 0 and slept == [10, 10]
    reports = out.getvalue().split("\n[")
    assert len(reports) == 3
    assert "waiting for first step" in reports[0]
    first, second = fields(reports[1]), fields(reports[2])
    assert first["step"] == "10/1000" and first["s/it"] == "2.20"  # steps 6..10: 2.1 2.2 2.3 2.4 2.0
    assert first["eta"] == "0:36:18" and first["cached"] == "159" and first["live"] == "1"
    assert second["step"] == "20/1000" and second["eta"] == "0:35:56"  # 980 x 2.2 s
    assert second["cached"] == "318" and second["live"] == "2"
    assert first["updated"] == "5s_ago" and second["updated"] == "0:02:10_ago"


def test_switches_to_a_newer_run(tmp_path):
    results = tmp_path / "results"
    old, new = results / "train" / "old", results / "train" / "new"
    old.mkdir(parents=True)
    (old / "metrics.jsonl").write_text("".join(METRICS[:5]))

    def start_new_run(_seconds):
        new.mkdir()
        (new / "metrics.jsonl").write_text("".join(METRICS[:2]))
        os.utime(old / "metrics.jsonl", (1, 1))  # make the order certain whatever the clock resolution

    out = io.StringIO()
    cli.monitor(None, results=results, iterations=2, out=out, sleep=start_new_run, read_gpus=lambda: NO_GPU)
    first, second = out.getvalue().split("\n[")
    assert str(old / "metrics.jsonl") in first and fields(first)["step"] == "5/1000"
    assert str(new / "metrics.jsonl") in second and fields(second)["step"] == "2/1000"


def test_newest_run_is_chosen_by_last_write(tmp_path):
    for name, mtime in [("a", 300), ("b", 100), ("c", 200)]:
        run = tmp_path / "train" / name
        run.mkdir(parents=True)
        log = run / ("train.log" if name == "a" else "metrics.jsonl")
        log.write_text("")
        os.utime(log, (mtime, mtime))
    (tmp_path / "train" / "empty_dir").mkdir()
    assert newest_run_dir(tmp_path).name == "a"


def test_run_dir_with_only_a_trainer_log_and_status_lines_beside_metrics(tmp_path):
    hf_run = tmp_path / "hf"
    hf_run.mkdir()
    shutil.copy(DATA / "hf_trainer_cpu.log", hf_run / "train.log")
    assert fields(run_once(hf_run))["step"] == "40/40"

    ours = tmp_path / "ours"
    ours.mkdir()
    shutil.copy(DATA / "metrics.jsonl", ours / "metrics.jsonl")
    (ours / "train.log").write_text(
        "[INFO] VGGT feature cache enabled: /cache/manifest.json\n"
        "  0%|   | 1/9 [00:01<00:08, 1.00s/it]\n"  # progress in train.log must not mix with metrics.jsonl
    )
    f = fields(run_once(ours))
    assert f["step"] == "30/1000" and f["cache"] == "/cache/manifest.json"


def test_bad_lines_are_reported_with_their_count(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(METRICS[:3]) + '{"step": "x"}\n')
    report = run_once(log)
    assert f"warning: 1 unreadable line(s) in {log} (first: line 4: \"step\" must be an integer" in report


@pytest.mark.parametrize(
    "target, kwargs, message",
    [
        (None, {}, r"no training run under .*train"),
        ("missing.log", {}, "no such log file or run directory: missing.log"),
        (str(DATA / "metrics.jsonl"), {"interval": 0}, "--interval must be > 0"),
        (str(DATA / "metrics.jsonl"), {"window": 0}, "--window must be >= 1"),
    ],
)
def test_user_errors_name_the_setting_or_path(tmp_path, target, kwargs, message):
    with pytest.raises(UserError, match=message):
        cli.monitor(target, results=tmp_path, once=True, out=io.StringIO(), read_gpus=lambda: NO_GPU, **kwargs)


def test_parser_options_reach_the_loop(capsys):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["monitor", str(DATA / "metrics.jsonl"), "--once", "--window", "3", "--interval", "5"])
    assert (args.once, args.window, args.interval, args.results) == (True, 3, 5.0, "results")
    assert args.func(args) == 0
    assert fields(capsys.readouterr().out)["s/it"] == "2.30"  # steps 28..30: 2.3 2.4 2.0


def test_validation_records_show_as_their_own_line_and_leave_the_step_statistics(tmp_path):
    """Issue 12: metrics.jsonl records of kind "val" (held-out loss) are shown, never counted as steps."""
    val = ('{"kind": "val", "step": %d, "val_loss": %s, "val_action_accuracy": %s, "val_samples": 61, '
           '"val_tokens": 900, "val_s": 40.0, "time": %s}\n')
    lines = METRICS[:10] + [val % (10, 2.75, 0.5, 1e9)] + METRICS[10:20] + [val % (20, 2.5, 0.625, 2e9)] + METRICS[20:]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(lines))
    plain = fields(run_once(DATA / "metrics.jsonl"))
    report = run_once(path)
    got = fields("\n".join(line for line in report.splitlines() if not line.startswith("  val:")))
    for key in ("step", "s/it", "steps/s", "eta", "loss", "cached", "live", "data_wait"):
        assert got[key] == plain[key], key
    assert "  val: step=20 loss=2.5000 action_acc=62.5% samples=61" in report, report
    assert "val:" not in run_once(DATA / "metrics.jsonl")


def test_loss_parts_and_head_accuracy_show_as_their_own_lines(tmp_path):
    """Issue 26: the loss's parts (text, action head with its weight, each answer segment) and the held-out head
    accuracy; a run without them prints neither."""
    parts = ('{"step": 31, "max_steps": 1000, "time": 1764250070.0, "s_per_it": 2.2, "loss": 2.31, '
             '"loss_text_total": 1.92, "loss_action_head": 0.39, "action_head_weight": 1.0, "loss_subinstruction": 1.21, '
             '"loss_2d": 2.4, "loss_3d": 2.05, "loss_action": 0.08}\n')
    val = '{"kind": "val", "step": 31, "val_loss": 2.5, "val_action_accuracy": 0.5, "val_action_head_accuracy": 0.75}\n'
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(METRICS) + parts + val)
    report = run_once(path)
    assert ("  losses: text=1.9200 head=0.3900 (weight 1) subinstruction=1.2100 2d=2.4000 3d=2.0500 action=0.0800"
            in report), report
    assert "head_acc=75.0%" in report
    assert "losses:" not in run_once(DATA / "metrics.jsonl")
