"""The monitor's printed report: a few plain `key=value` lines, easy to read and to grep.

    [2026-11-27 14:40:05] results/train/demo/metrics.jsonl
      step=20/28710 s/it=55.29 steps/s=0.0181 eta=440:56:31 loss=2.3100 lr=1e-05 epoch=0.01 updated=12s_ago
      losses: text=1.9200 head=0.3900 (weight 1) subinstruction=1.2100 2d=2.4000 3d=2.0500 action=0.0800
      samples: cached=160 live=0 (100.0% cached) samples/s=2.89 tokens/s=5120 data_wait=3.1%
      val: step=20 loss=2.4120 action_acc=61.3% head_acc=70.2% samples=6125
      attempts: 2, restarts lost 0:02:58 in all
        #1 job 41: steps 1-120 (120 done), stop_request: SIGUSR1 on node gpu01
        #2 job 41: steps 121-140 so far, running (or killed); restart lost 0:02:58
      gpu0 NVIDIA H100 80GB HBM3: 61.2/79.6 GiB util=97%

Unknown values print as `?`. The attempts lines come from the run's attempts.jsonl
(vlnflow.train.attempts): what each Slurm job run (attempt) did and why it ended, and the
time each restart lost (previous attempt's end to this attempt's first step).
"""

from __future__ import annotations

import time
from pathlib import Path

from vlnflow.monitor.gpu import GpuReading
from vlnflow.monitor.stats import Summary, format_duration
from vlnflow.train.attempts import Attempt

MAX_ATTEMPT_LINES = 5  # the newest attempts shown one per line


def _num(value: float | None, fmt: str) -> str:
    return "?" if value is None else format(value, fmt)


def _progress_line(s: Summary, now: float) -> str:
    latest = s.latest
    parts = [
        f"step={s.step}/{s.max_steps if s.max_steps is not None else '?'}",
        f"s/it={_num(s.s_per_it, '.2f')}",
        f"steps/s={_num(s.steps_per_s, '.4f')}",
        f"eta={'?' if s.eta_s is None else format_duration(s.eta_s)}",
        f"loss={_num(latest.get('loss'), '.4f')}",
    ]
    if latest.get("lr") is not None:
        parts.append(f"lr={latest['lr']:.3g}")
    if latest.get("epoch") is not None:
        parts.append(f"epoch={latest['epoch']:.2f}")
    if latest.get("time") is not None:
        age = max(0.0, now - latest["time"])
        parts.append(f"updated={age:.0f}s_ago" if age < 120 else f"updated={format_duration(age)}_ago")
    if s.finished:
        parts.append("finished")
    return "  " + " ".join(parts)


def _samples_line(s: Summary) -> str | None:
    latest = s.latest
    cached, live = latest.get("cached_samples"), latest.get("live_samples")
    parts = []
    if cached is not None or live is not None:
        parts.append(f"cached={_num(cached, 'd')} live={_num(live, 'd')}")
        if cached is not None and live is not None and cached + live > 0:
            parts.append(f"({100.0 * cached / (cached + live):.1f}% cached)")
    if latest.get("cached_batches") is not None:
        parts.append(f"cached_batches={latest['cached_batches']}")
    if latest.get("samples_per_s") is not None:
        parts.append(f"samples/s={latest['samples_per_s']:.2f}")
    if latest.get("tokens_per_s") is not None:
        parts.append(f"tokens/s={latest['tokens_per_s']:.0f}")
    if s.data_wait_frac is not None:
        parts.append(f"data_wait={100.0 * s.data_wait_frac:.1f}%")
    if latest.get("cache_manifest"):
        parts.append(f"cache={latest['cache_manifest']}")
    return "  samples: " + " ".join(parts) if parts else None


def _losses_line(s: Summary) -> str | None:
    """The loss's parts: text, action head (with its weight now), each answer segment; None when none is logged."""
    latest = s.latest
    parts = []
    if latest.get("loss_text_total") is not None:
        parts.append(f"text={latest['loss_text_total']:.4f}")
    if latest.get("loss_action_head") is not None:
        weight = latest.get("action_head_weight")
        parts.append(f"head={latest['loss_action_head']:.4f}" + ("" if weight is None else f" (weight {weight:.3g})"))
    for name in ("subinstruction", "2d", "3d", "action"):
        if latest.get(f"loss_{name}") is not None:
            parts.append(f"{name}={latest[f'loss_{name}']:.4f}")
    return "  losses: " + " ".join(parts) if parts else None


def _val_line(s: Summary) -> str | None:
    """The newest held-out evaluation (metrics.jsonl records of kind "val"), if the run has one."""
    latest = s.latest
    if latest.get("val_loss") is None:
        return None
    parts = [f"step={_num(latest.get('val_step'), 'd')}", f"loss={latest['val_loss']:.4f}"]
    if latest.get("val_action_accuracy") is not None:
        parts.append(f"action_acc={100.0 * latest['val_action_accuracy']:.1f}%")
    if latest.get("val_action_head_accuracy") is not None:
        parts.append(f"head_acc={100.0 * latest['val_action_head_accuracy']:.1f}%")
    if latest.get("val_samples") is not None:
        parts.append(f"samples={latest['val_samples']}")
    return "  val: " + " ".join(parts)


def attempt_lines(attempts: list[Attempt], current_step: int | None = None) -> list[str]:
    """One header line and one line per attempt (the newest MAX_ATTEMPT_LINES); none without attempts."""
    if not attempts:
        return []
    lost = [a.restart_lost_s for a in attempts if a.restart_lost_s is not None]
    header = f"  attempts: {len(attempts)}" + (f", restarts lost {format_duration(sum(lost))} in all" if lost else "")
    lines = [header]
    shown = attempts[-MAX_ATTEMPT_LINES:]
    if len(shown) < len(attempts):
        lines.append(f"    ({len(attempts) - len(shown)} earlier attempt(s) not shown)")
    for a in shown:
        is_last = a is attempts[-1]
        first = a.resumed_step + 1
        if a.reason is not None and a.last_step is not None:
            steps = f"steps {first}-{a.last_step} ({a.steps_done} done)"
        elif is_last and current_step is not None and current_step >= first:
            steps = f"steps {first}-{current_step} so far"
        elif a.last_step is not None:
            steps = f"steps {first}-? (checkpoint at {a.last_step})"
        else:
            steps = f"from step {first}"
        why = f": {a.why}" if a.why and a.reason != "done" else ""
        lost_s = f"; restart lost {format_duration(a.restart_lost_s)}" if a.restart_lost_s is not None else ""
        job = f" job {a.job_id}" if a.job_id else ""
        lines.append(f"    #{a.number}{job}: {steps}, {a.outcome(is_last)}{why}{lost_s}")
    return lines


def _gpu_lines(reading: GpuReading, summary: Summary) -> list[str]:
    lines = [f"  gpu: {reading.problem or 'no GPU visible'}"] if not reading.gpus else [
        f"  gpu{g.index} {g.name}: {g.used_gib:.1f}/{g.total_gib:.1f} GiB util={_num(g.util_percent, 'd')}%"
        for g in reading.gpus
    ]
    peak = summary.latest.get("gpu_mem_gib")
    if peak:
        lines.append("  train peak allocated (logging rank's GPUs): " + " ".join(f"{v:.1f}" for v in peak) + " GiB")
    return lines


def format_report(
    summary: Summary,
    gpus: GpuReading,
    *,
    log: Path,
    now: float,
    log_exists: bool = True,
    problems: list[str] | None = None,
    attempts: list[Attempt] | None = None,
) -> str:
    """One report block for one tick of the monitor."""
    lines = [f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}] {log}"]
    if not log_exists:
        lines.append(f"  waiting for {log} to appear")
    elif summary.step is None:
        lines.append("  waiting for first step")
    else:
        lines.append(_progress_line(summary, now))
    losses = _losses_line(summary)
    if losses:
        lines.append(losses)
    samples = _samples_line(summary)
    if samples:
        lines.append(samples)
    val = _val_line(summary)
    if val:
        lines.append(val)
    lines.extend(attempt_lines(attempts or [], summary.step))
    lines.extend(_gpu_lines(gpus, summary))
    lines.extend(f"  warning: {p}" for p in problems or ())
    return "\n".join(lines)
