"""Per-step training metrics as JSON lines (read by `vlnflow monitor` and the benchmark report),
and optionally the same numbers as TensorBoard event files (`tensorboard --logdir results/train`)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from vlnflow.errors import UserError


def gpu_memory_gib() -> list[float]:
    """Peak allocated memory of each local GPU since the last reset, GiB; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]


# TensorBoard tag names HF users know (Trainer's "train/learning_rate", "eval/loss"); others keep their key.
TB_NAMES = {"lr": "learning_rate"}
TB_SKIP = ("step", "max_steps", "world_size", "rank", "time", "kind", "tokens", "label_tokens", "seq_tokens_sq", "images")


class MetricsLog:
    """Append-only metrics.jsonl; each line is flushed so a follower never waits on a buffer.

    A record with `kind: "val"` is a validation result; the others are optimizer steps. With
    `tensorboard_dir`, every numeric value also goes to a SummaryWriter there, at the record's
    step, as "train/<key>" or (validation, `val_` dropped) "eval/<key>".
    """

    def __init__(self, path: str | Path, enabled: bool = True, append: bool = False,
                 tensorboard_dir: str | Path | None = None, resumed_step: int = 0):
        """`append` continues a resumed run's log (restore_history put it back to `resumed_step` first);
        a fresh run starts a new file. TensorBoard hides the events an earlier attempt wrote after
        `resumed_step` (SummaryWriter's purge_step), so its curves have no repeated steps either."""
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if append else "w")
            if tensorboard_dir is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise UserError(
                        f"train.tensorboard is true but TensorBoard cannot be imported ({exc}): install the pinned "
                        f"tensorboard package (pyproject.toml) or set train.tensorboard: false"
                    ) from None
                self._tb = SummaryWriter(str(tensorboard_dir), flush_secs=10, purge_step=resumed_step + 1)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        val = record.get("kind") == "val"
        for key, value in record.items():
            if key in TB_SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = key.removeprefix("val_") if val else key
            self._tb.add_scalar(f"{'eval' if val else 'train'}/{TB_NAMES.get(name, name)}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


class PhaseTimer:
    """Seconds per step spent in forward / backward / optimizer step, for finding what limits a step.

    Off by default: timing a phase means synchronising the GPU at its edges, which costs a little.
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict:
        """{"forward_s": ..., ...} accumulated since the last call (empty when disabled)."""
        out = {f"{k}_s": v for k, v in self.totals.items()}
        self.totals = {}
        return out


# ---- metrics.jsonl across attempts -----------------------------------------------------------------------
# Snakemake deletes a job's outputs (metrics.jsonl among them) when the job fails and before it runs
# again, and a crashed attempt leaves lines for steps past its last checkpoint. So each checkpoint
# carries a copy of metrics.jsonl as it stood at that step (checkpoints.save(keep_files=...)), and a
# resumed run starts from that copy: every step appears once, whatever happened to the file between.

HISTORY_NAME = "metrics.jsonl"


def restore_history(metrics_path: str | Path, tag_dir: str | Path, step: int) -> Path | None:
    """Rank 0, on resume from the checkpoint in `tag_dir` (step `step`): put metrics.jsonl back to the
    lines of steps up to `step`, from the checkpoint's copy when it has one (older checkpoints do not:
    then the current file, if any, is cut after `step`). Returns the file it read, None if none."""
    metrics_path, copy = Path(metrics_path), Path(tag_dir) / HISTORY_NAME
    source = copy if copy.exists() else metrics_path
    if not source.exists():
        return None
    kept = []
    for line in source.read_text().splitlines():
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a line cut short by a crash
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line + "\n")
    tmp = metrics_path.with_name(f".{metrics_path.name}.restore")
    tmp.write_text("".join(kept))
    tmp.replace(metrics_path)
    return source
