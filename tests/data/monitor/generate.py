"""Regenerate the monitor's test logs (`python tests/data/monitor/generate.py`).

- hf_trainer_cpu.log: NOT generated here. A real recording of a Hugging Face Trainer
  run (transformers 5.24, tqdm 4.70, CPU, 40 steps of ~0.2 s, logging_steps=10),
  stdout+stderr of `PYTHONUNBUFFERED=1 python train.py > log 2>&1`.
- metrics.jsonl / metrics_truncated.jsonl: the trainer's metrics format, 30 steps with a
  known s/it pattern (2.1, 2.2, 2.3, 2.4, 2.0 repeating; step 25 a 9 s outlier) so the
  median, ETA and counts can be asserted; the truncated copy ends mid-line at step 13.
- seed_hf_tqdm.log: the seed's training output in its shape (checkpoint-shard bar,
  cache status line, `n/28710 [..<.., 55.29s/it]` bars separated by carriage returns,
  `[ACCELERATION]` lines, Trainer loss dicts, an evaluation bar), bars drawn by tqdm's
  own formatter; step k takes 60 - 0.25 k seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).parent
T0 = 1_764_250_000.0
METRICS_STEPS, METRICS_MAX = 30, 1000
SEED_STEPS, SEED_MAX = 20, 28710


def metrics_s_per_it(step: int) -> float:
    return 9.0 if step == 25 else 2.0 + 0.1 * (step % 5)


def metrics_lines() -> list[str]:
    lines, t = [], T0
    for step in range(1, METRICS_STEPS + 1):
        s = metrics_s_per_it(step)
        t += s
        live = step // 10
        record = {
            "time": round(t, 3), "step": step, "max_steps": METRICS_MAX, "epoch": round(step / METRICS_MAX, 4),
            "s_per_it": s, "data_wait_s": round(0.05 * s, 4), "samples_per_s": round(16 / s, 4),
            "tokens_per_s": round(16 * 900 / s, 1), "loss": round(3.0 - 0.02 * step, 4), "lr": 1e-5,
            "cached_samples": 16 * step - live, "live_samples": live, "gpu_mem_gib": [61.2, 61.4],
            "rank": 0, "world_size": 16,
        }
        lines.append(json.dumps(record) + "\n")
    return lines


def seed_s_per_it(step: int) -> float:
    return 60.0 - 0.25 * step


def bar(n: int, total: int, elapsed: float, s_per_it: float | None) -> str:
    return "\r" + tqdm.format_meter(n, total, elapsed, rate=None if s_per_it is None else 1 / s_per_it)


def seed_log() -> str:
    out = ["[INFO] Loading Qwen2.5-VL-7B-Instruct\n"]
    out += [bar(k, 5, 3.1 * k, 3.1 if k else None) for k in range(6)] + ["\n"]
    out.append("[INFO] VGGT feature cache enabled: /shared/vln/cache/manifest.json\n")
    out.append(bar(0, SEED_MAX, 0, None))
    elapsed = 0.0
    for step in range(1, SEED_STEPS + 1):
        elapsed += seed_s_per_it(step)
        out.append(f"[ACCELERATION] Using cached features for batch {step - 1}\n")
        out.append(bar(step, SEED_MAX, elapsed, seed_s_per_it(step)))
        if step % 10 == 0:
            out.append("\r" + " " * 60 + "\r")
            out.append(f"{{'loss': {2.5 - step / 100}, 'learning_rate': 1e-05, 'epoch': {step / 2000}}}\n")
            out.append(bar(step, SEED_MAX, elapsed, seed_s_per_it(step)))
        if step == 15:  # an evaluation bar must not be taken for training progress
            out += ["\n"] + [bar(k, 5, 5.0 * k, 5.0) for k in range(1, 3)] + ["\n"]
    return "".join(out)  # ends with the newest bar, unterminated, as tqdm leaves it


def main() -> None:
    lines = metrics_lines()
    (HERE / "metrics.jsonl").write_text("".join(lines))
    (HERE / "metrics_truncated.jsonl").write_text("".join(lines[:12]) + lines[12][:40])
    (HERE / "seed_hf_tqdm.log").write_text(seed_log())


if __name__ == "__main__":
    main()
