"""Issue 23, stopping a run cleanly: the ranks' agreement, the signal plumbing, the time budget, the exit
status, metrics.jsonl after a resume, the attempt records and where they show, the requeue decision.

The end-to-end runs are elsewhere: tests/test_train_resume.py (a trainer stopped by SIGUSR1 and by
train.max_hours resumes bit for bit) and tests/slurm/test_slurm_stop.py (Slurm's warning signal to a
two-node job, the requeue, the resumed run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlnflow.monitor.cli import monitor
from vlnflow.monitor.gpu import GpuReading
from vlnflow.report.attempts import attempts_markdown
from vlnflow.train import stop
from vlnflow.train.attempts import AttemptLog, read_attempts
from vlnflow.train.launch import stopped_or
from vlnflow.train.metrics import restore_history
from vlnflow.workflow.requeue import requeue_after_stop


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the agreement: two gloo ranks that see a stop at different steps ---------------------------------

AGREE_WORKER = textwrap.dedent("""
    import json, sys, time
    import torch.distributed as dist
    from vlnflow.train.stop import StopControl, TimeBudget

    rank, port, scenarios = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for scenario in scenarios:
        kind, at = scenario[rank]  # what this rank sees (kind "signal" or "budget") and after which step
        control = StopControl(dist, "cpu", total=8, request_file=None, budget=TimeBudget(1e9, time.time()))
        stopped_at = None
        for step in range(1, 9):
            if rank == 1:
                time.sleep(0.02)  # rank 1 is the slower one: it reaches each step boundary later
            if at == step and kind == "signal":
                control._signalled = "SIGUSR1 to rank %d" % rank
            if at == step and kind == "budget":
                control.budget.budget_s = 0.0
            if control.check(step, saved=False):
                stopped_at = step
                break
        results.append({"step": stopped_at, "reason": control.reason, "why": control.why})
    dist.destroy_process_group()
    print(json.dumps(results))
""")


def test_ranks_agree_on_one_stop_step_whenever_each_sees_the_request(tmp_path):
    """Every rank stops after the first step at which ANY rank saw a request (no rank waits for another);
    a budget stop wins over a signal seen at the same step; nothing seen, no stop (the last step ends the run)."""
    scenarios = [
        [["signal", 2], ["signal", 4]],  # rank 0 sees it first
        [["none", None], ["signal", 3]],  # only the slower rank sees it
        [["signal", 5], ["signal", 5]],
        [["budget", 3], ["signal", 3]],
        [["signal", 8], ["none", None]],  # at the last step: no stop, the run is done
        [["none", None], ["none", None]],
    ]
    script = tmp_path / "agree.py"
    script.write_text(AGREE_WORKER)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), json.dumps(scenarios)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rank0, rank1 = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    expected = [(2, "stop_request"), (3, "stop_request"), (5, "stop_request"), (3, "max_hours"), (None, None),
                (None, None)]
    assert [(r["step"], r["reason"]) for r in rank0] == expected
    assert [(r["step"], r["reason"]) for r in rank1] == expected
    # what each rank knows about why: its own sighting, or that another rank saw it
    assert rank1[0]["why"] == "another rank saw it" and rank0[1]["why"] == "another rank saw it"
    assert rank0[0]["why"] == "SIGUSR1 to rank 0" and rank1[1]["why"] == "SIGUSR1 to rank 1"


# ---- the signal plumbing of vlnflow launch -----------------------------------------------------------------

LAUNCH_LIKE = textwrap.dedent("""
    import subprocess, sys, time
    from vlnflow.train import stop
    request = sys.argv[1]
    stop.catch_stop_signal(request, "node n9")
    with stop.ChildrenIgnoreStopSignal():  # what vlnflow launch does around starting torchrun / srun
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(0.05)
        if stop.read_record(request) is not None:
            break
    print("alive" if child.poll() is None else "child died %s" % child.returncode, flush=True)
    child.kill()
""")


def test_sigusr1_to_the_whole_step_writes_the_request_and_kills_nothing(tmp_path):
    """As Slurm's --signal does (every process of the job step): the launch / node agent writes the stop
    request, its children (torchrun, ranks, DataLoader workers) ignore the signal and live on."""
    script, request = tmp_path / "launch_like.py", tmp_path / "stop_request"
    script.write_text(LAUNCH_LIKE)
    proc = subprocess.Popen([sys.executable, str(script), str(request)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    child_pid = int(proc.stdout.readline())
    os.killpg(proc.pid, signal.SIGUSR1)  # the process group: parent and child alike
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "alive", (out, err)
    record = json.loads(request.read_text())
    assert record["why"] == "SIGUSR1 on node n9" and record["pid"] == proc.pid
    assert "asked the ranks to stop at the next step" in err
    assert child_pid != proc.pid


def test_a_stale_request_or_marker_is_cleared_before_the_ranks_start(tmp_path, capsys):
    request = tmp_path / "stop_request"
    stop.write_request(request, "left by attempt 1")
    stop.stopped_path(request).write_text("{}")
    stop.clear_stale(request)
    assert not request.exists() and not stop.stopped_path(request).exists()
    assert "left by an earlier attempt" in capsys.readouterr().err


def test_launch_reports_a_stop_as_exit_75_only_with_the_trainers_marker(tmp_path, capsys):
    request = tmp_path / "stop_request"
    env = {stop.STOP_FILE_ENV: str(request)}
    assert stopped_or(0, env) == 0 and stopped_or(3, env) == 3 and stopped_or(0, {}) == 0
    stop.stopped_path(request).write_text(json.dumps({"step": 7, "reason": "stop_request", "why": "SIGUSR1 on node n1"}))
    assert stopped_or(0, env) == stop.EXIT_STOPPED
    assert stopped_or(143, env) == stop.EXIT_STOPPED  # a sibling killed after the complete checkpoint changes nothing
    err = capsys.readouterr().err
    assert "training stopped on request after step 7 (stop_request: SIGUSR1 on node n1)" in err and "exit 75" in err


# ---- time budget and exit status ---------------------------------------------------------------------------


def test_time_budget_keeps_room_for_one_more_step_and_a_save():
    budget = stop.TimeBudget(budget_s=100.0, started=0.0)
    budget.observe(10.0, saved=False)
    budget.observe(8.0, saved=False)
    assert budget.longest_step == 10.0 and not budget.exhausted(now=89.0)
    assert budget.exhausted(now=90.0)  # 90 s + one 10 s step = the budget
    budget.observe(35.0, saved=True)  # a step with a save: the save added 25 s
    assert budget.longest_save == 25.0
    assert not budget.exhausted(now=64.0) and budget.exhausted(now=65.0)


def test_exit_status_of_a_rank():
    assert stop.exit_code_after({"step": 4}, environ={}) == 0
    assert stop.exit_code_after({"step": 2, "stopped": "max_hours"}, environ={}) == stop.EXIT_STOPPED == 75
    # under vlnflow launch the ranks end cleanly; the launch reports the stop (torchrun would kill the siblings)
    assert stop.exit_code_after({"step": 2, "stopped": "stop_request"}, environ={stop.STOP_FILE_ENV: "x"}) == 0


def test_a_run_that_reached_its_last_step_leaves_no_stopped_marker(tmp_path):
    """Else the launch would report a finished run as stopped and the job would requeue itself forever."""
    request = tmp_path / "stop_request"
    control = stop.StopControl(None, "cpu", total=8, request_file=request, budget=None)
    assert not control.check(8, saved=True)  # the last step: no collective, no stop
    control.finish(8, is_rank0=True)
    assert not stop.stopped_path(request).exists()


def test_stop_control_reads_the_request_file_and_finish_consumes_it(tmp_path, monkeypatch):
    request = tmp_path / "stop_request"
    monkeypatch.setenv(stop.STOP_FILE_ENV, str(request))
    monkeypatch.setenv(stop.LAUNCHED_AT_ENV, "1000.5")
    monkeypatch.setattr(stop, "agree", lambda dist, code, device: code)  # one rank
    previous = signal.getsignal(stop.STOP_SIGNAL)
    signal.signal(stop.STOP_SIGNAL, signal.SIG_IGN)  # as under vlnflow launch: no handler of its own
    try:
        control = stop.StopControl.for_run({"max_hours": 2}, None, "cpu", total=10)
    finally:
        signal.signal(stop.STOP_SIGNAL, previous)
    assert control.budget.started == 1000.5 and control.budget.budget_s == 7200.0
    control.budget.started = time.time()
    assert not control.check(1, saved=False)
    stop.write_request(request, "SIGUSR1 on node n2")
    assert control.check(2, saved=False) and (control.reason, control.why) == ("stop_request", "SIGUSR1 on node n2")
    control.finish(2, is_rank0=False)  # only rank 0 writes
    assert request.exists() and not stop.stopped_path(request).exists()
    control.finish(2, is_rank0=True)
    assert not request.exists()
    assert json.loads(stop.stopped_path(request).read_text())["step"] == 2


# ---- metrics.jsonl after a resume -----------------------------------------------------------------------------


def _lines(*steps, kind=None) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s, **({"kind": kind} if kind else {})}) + "\n" for s in steps)


def test_resume_puts_metrics_back_to_the_checkpoint(tmp_path):
    metrics, tag = tmp_path / "metrics.jsonl", tmp_path / "step_0000002"
    tag.mkdir()
    # the checkpoint's copy wins: Snakemake may have deleted the file, a crash may have left later steps
    (tag / "metrics.jsonl").write_text(_lines(1, 2) + _lines(2, kind="val"))
    metrics.write_text(_lines(1, 2, 3) + '{"step": 4, "lo')
    assert restore_history(metrics, tag, 2) == tag / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 2]
    metrics.unlink()
    restore_history(metrics, tag, 2)
    assert len(metrics.read_text().splitlines()) == 3
    # an older checkpoint without a copy: the file is cut after the checkpoint's step (a cut line dropped)
    (tag / "metrics.jsonl").unlink()
    metrics.write_text(_lines(1, 2, 3) + '{"step": 4, "lo')
    assert restore_history(metrics, tag, 2) == metrics
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    metrics.unlink()
    assert restore_history(metrics, tag, 2) is None and not metrics.exists()


# ---- attempt records: written by rank 0, shown by the monitor and the report ----------------------------------


def _three_attempts(run_dir: Path, monkeypatch) -> None:
    """Attempt 1 stopped on Slurm's warning, attempt 2 crashed after a checkpoint, attempt 3 runs."""
    clock = iter(range(1000, 2000, 10))
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    first = AttemptLog.begin(run_dir, enabled=True, resumed_step=0, fresh=True, launched=990.0)
    first.step_done(world_size=16)  # t=1000
    first.step_done(world_size=16)  # no second start record
    first.checkpoint(100)  # 1010
    first.end(120, "stop_request", "SIGUSR1 on node gpu01")  # 1020
    second = AttemptLog.begin(run_dir, enabled=True, resumed_step=120, fresh=False, launched=1100.0)
    second.step_done(world_size=16)  # 1030: restart lost 10 s
    second.checkpoint(200)  # 1040, then a crash
    third = AttemptLog.begin(run_dir, enabled=True, resumed_step=200, fresh=False, launched=1200.0)
    third.step_done(world_size=16)  # 1050: 10 s after the crashed attempt's last record


def test_attempts_are_numbered_and_their_restart_time_measured(tmp_path, monkeypatch):
    _three_attempts(tmp_path, monkeypatch)
    attempts = read_attempts(tmp_path / "attempts.jsonl")
    assert [(a.number, a.job_id, a.resumed_step, a.last_step, a.reason) for a in attempts] == [
        (1, "41", 0, 120, "stop_request"), (2, "41", 120, 200, None), (3, "41", 200, None, None)]
    assert [a.restart_lost_s for a in attempts] == [None, 10.0, 10.0]
    assert attempts[0].steps_done == 120 and attempts[0].why == "SIGUSR1 on node gpu01"
    assert attempts[1].outcome(is_last=False).startswith("crashed") and attempts[2].outcome(is_last=True).startswith("running")
    # a run that restores no checkpoint starts its history anew
    AttemptLog.begin(tmp_path, enabled=True, resumed_step=0, fresh=True, launched=0.0)
    assert read_attempts(tmp_path / "attempts.jsonl") == []


def test_monitor_shows_each_attempt(tmp_path, monkeypatch):
    _three_attempts(tmp_path, monkeypatch)
    monkeypatch.undo()
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "max_steps": 300, "time": 1000.0 + s, "s_per_it": 1.0, "loss": 0.5}) + "\n"
                for s in range(195, 211)))
    out = []

    class Sink:
        def write(self, text):
            out.append(text)

        def flush(self):
            pass

    monitor(str(tmp_path), once=True, out=Sink(), clock=lambda: 1300.0, read_gpus=lambda: GpuReading([], "no GPU"))
    text = "".join(out)
    assert "  attempts: 3, restarts lost 0:00:20 in all" in text
    assert "    #1 job 41: steps 1-120 (120 done), stop_request: SIGUSR1 on node gpu01" in text
    assert "    #2 job 41: steps 121-? (checkpoint at 200), crashed or killed (no end record); restart lost 0:00:10" in text
    assert "    #3 job 41: steps 201-210 so far, running (or killed); restart lost 0:00:10" in text


def test_report_section_lists_each_attempt(tmp_path, monkeypatch):
    _three_attempts(tmp_path, monkeypatch)
    text = attempts_markdown([str(tmp_path / "metrics.jsonl")])
    assert "## Training attempts" in text
    assert "| 1 | 41 |" in text and "| 1-120 | 120 |" in text and "stop_request (SIGUSR1 on node gpu01)" in text
    assert "| 2 | 41 |" in text and "crashed or killed (no end record) | 10 |" in text
    assert "Restarts lost 20 s in all over 2 restart(s)." in text
    assert attempts_markdown([str(tmp_path / "elsewhere" / "metrics.jsonl")]) == ""


# ---- the requeue decision ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A `scontrol` on PATH that reports Restarts=$FAKE_RESTARTS and records what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    script = bin_dir / "scontrol"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> {calls}
        case "$1" in
          show) echo "JobId=$3 JobName=x Restarts=$FAKE_RESTARTS BatchFlag=1" ;;
          requeue) exit "$FAKE_REQUEUE_RC" ;;
        esac
        """))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_REQUEUE_RC", "0")
    return calls


def test_requeue_within_the_bound_and_a_stop_exit_past_it(fake_scontrol, monkeypatch, capsys):
    log = open(fake_scontrol.with_name("job.log"), "w")
    monkeypatch.setenv("FAKE_RESTARTS", "2")
    assert requeue_after_stop("41", 3, log, "after step 7 (max_hours: ...)") == stop.EXIT_STOPPED  # requeued
    assert fake_scontrol.read_text().splitlines() == ["show job -o 41", "requeue 41"]
    err = capsys.readouterr().err
    assert "training stopped on request after step 7 (max_hours: ...); its checkpoint is complete" in err
    assert "requeued Slurm job 41 (requeue 3 of at most 3, train.max_requeues)" in err

    fake_scontrol.unlink()
    monkeypatch.setenv("FAKE_RESTARTS", "3")
    assert requeue_after_stop("41", 3, log) == stop.EXIT_STOPPED
    assert fake_scontrol.read_text().splitlines() == ["show job -o 41"]  # bound reached: no requeue
    assert "requeued 3 time(s), train.max_requeues is 3: not requeueing again" in capsys.readouterr().err

    monkeypatch.setenv("FAKE_RESTARTS", "0")
    monkeypatch.setenv("FAKE_REQUEUE_RC", "1")
    assert requeue_after_stop("41", 3, log) == stop.EXIT_STOPPED
    assert "scontrol requeue 41 failed (1" in capsys.readouterr().err
    assert requeue_after_stop(None, 3, log) == stop.EXIT_STOPPED
    assert "not in a Slurm job" in capsys.readouterr().err
