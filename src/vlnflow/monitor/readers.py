"""Read training logs incrementally: our metrics.jsonl and Hugging Face / tqdm text logs.

A `LogFollower` keeps its byte offset, so each `poll()` reads only what was appended
since the last one. A line still being written (no terminator yet) waits for its
newline; a file that shrank or was replaced is read again from the start. Every parsed
line becomes an *update*: a dict using the metrics.jsonl key names (METRIC_KEYS), plus
a few keys only text logs give (TEXT_KEYS), so the statistics treat both formats alike.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from pathlib import Path
from typing import Any

Update = dict[str, Any]

# Keys the trainer writes to metrics.jsonl (missing keys mean "unknown").
INT_KEYS = ("step", "max_steps", "cached_samples", "live_samples", "rank", "world_size")
# The loss's parts (vlnflow.model.objective; the seed's own log has the same names).
LOSS_TERM_KEYS = ("loss_text_total", "loss_action_head", "action_head_weight",
                  "loss_subinstruction", "loss_2d", "loss_3d", "loss_action")
FLOAT_KEYS = ("time", "epoch", "s_per_it", "data_wait_s", "samples_per_s", "tokens_per_s", "loss", "lr") + LOSS_TERM_KEYS
METRIC_KEYS = INT_KEYS + FLOAT_KEYS + ("gpu_mem_gib",)
# A validation record (`"kind": "val"`) gives these instead: its step is the optimizer step it
# evaluated, kept apart (val_step) so it never counts as a training step.
VAL_INT_KEYS = ("val_samples",)
VAL_FLOAT_KEYS = ("val_loss", "val_action_accuracy", "val_action_head_accuracy")
VAL_KEYS = ("val_step",) + VAL_INT_KEYS + VAL_FLOAT_KEYS
# Keys only text logs give: tqdm's elapsed seconds, the cache status line, the number of
# "[ACCELERATION] Using cached features" lines, and the Trainer's end-of-training summary.
TEXT_KEYS = ("elapsed_s", "cache_manifest", "cached_batches", "finished")

# tqdm bar: `20/28710 [23:45<440:39:57, 55.29s/it]` (also `?it/s`, `4.95it/s`, postfix text).
_PROGRESS = re.compile(
    r"(?P<n>\d+)/(?P<total>\d+) \[(?P<elapsed>\d+(?::\d+)+)<(?:\d+(?::\d+)+|\?),\s*"
    r"(?P<rate>\d+(?:\.\d+)?|\?)\s*(?P<unit>s/it|it/s)[^\]]*\]"
)
# Trainer log dict, printed with Python repr: `{'loss': 2.31, 'learning_rate': 1e-05, ...}`
# (transformers 5 prints the values as strings: `{'loss': '1.885', ...}`).
_LOG_DICT = re.compile(r"\{'[^{}]*\}")
_CACHE_ENABLED = re.compile(r"VGGT feature cache enabled:\s*(?P<manifest>\S.*?)\s*$")
_CACHED_BATCH = re.compile(r"\[ACCELERATION\] Using cached features for batch")


def _clock_seconds(text: str) -> float:
    """tqdm's `[H:]MM:SS` (hours unbounded, e.g. 440:39:57) -> seconds."""
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return float(seconds)


def _number(value: Any, *, integer: bool) -> float | int | None:
    """A JSON number (not bool, finite) -> int/float; anything else -> None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if integer:
        return int(value) if float(value).is_integer() else None
    return float(value) if math.isfinite(value) else None


def parse_metrics_line(line: str) -> Update:
    """One metrics.jsonl line -> update. Raises ValueError saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if record.get("kind") == "val":
        update = _numbers(record, ("step",) + VAL_INT_KEYS, VAL_FLOAT_KEYS)
        if "step" in update:
            update["val_step"] = update.pop("step")
        return update
    update = _numbers(record, INT_KEYS, FLOAT_KEYS)
    mem = record.get("gpu_mem_gib")
    if mem is not None:
        values = [_number(v, integer=False) for v in mem] if isinstance(mem, list) else [None]
        if any(v is None for v in values):
            raise ValueError(f'"gpu_mem_gib" must be a list of numbers, got {mem!r}')
        update["gpu_mem_gib"] = values
    return update


def _numbers(record: dict, int_keys: tuple[str, ...], float_keys: tuple[str, ...]) -> Update:
    """The record's values of these keys, checked: integers where int_keys, finite numbers elsewhere."""
    update: Update = {}
    for key in int_keys + float_keys:
        value = record.get(key)
        if value is None:
            continue
        number = _number(value, integer=key in int_keys)
        if number is None:
            kind = "an integer" if key in int_keys else "a finite number"
            raise ValueError(f'"{key}" must be {kind}, got {value!r}')
        update[key] = number
    return update


def parse_progress(segment: str) -> Update | None:
    """The last complete tqdm bar in a text segment -> update with step/max_steps/s_per_it."""
    matches = list(_PROGRESS.finditer(segment))
    if not matches:
        return None
    m = matches[-1]
    update: Update = {
        "step": int(m["n"]),
        "max_steps": int(m["total"]),
        "elapsed_s": _clock_seconds(m["elapsed"]),
    }
    if m["rate"] != "?":
        rate = float(m["rate"])
        if m["unit"] == "s/it":
            update["s_per_it"] = rate
        elif rate > 0:
            update["s_per_it"] = 1.0 / rate
    return update


def parse_log_dict(segment: str) -> Update | None:
    """A Trainer log dict (`{'loss': ..., 'learning_rate': ..., 'epoch': ...}`, or the seed's per-segment
    `{'loss_subinstruction': ..., 'loss_action_head': ..., ...}`) -> update."""
    for m in _LOG_DICT.finditer(segment):
        try:
            record = ast.literal_eval(m.group(0))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(record, dict):
            continue
        update: Update = {}
        for source, key in (("loss", "loss"), ("learning_rate", "lr"), ("epoch", "epoch"), *((k, k) for k in LOSS_TERM_KEYS)):
            try:
                update[key] = float(record[source])
            except (KeyError, TypeError, ValueError):
                pass
        if "train_runtime" in record:
            update["finished"] = True
        if update:
            return update
    return None


class LogFollower:
    """Follow one log file: `poll()` returns the updates of the lines completed since the last poll.

    The format is detected from the first bytes: a file starting with `{"` (or named
    *.jsonl) is metrics.jsonl, split on newlines; anything else is a text log, split on
    newlines and carriage returns (tqdm rewrites its bar after each `\\r`). In a text log
    the newest bar is the unterminated tail, so a tail holding a complete bar is reported
    too (the same step reported twice replaces itself in the statistics). Several tqdm
    bars can share a log (loading shards, evaluation): only the one with the largest
    total counts as training progress.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.format: str | None = "metrics" if self.path.suffix == ".jsonl" else None
        self.bad_lines = 0
        self.first_bad: str | None = None  # "line N: reason" of the first unreadable line
        self.restarts = 0  # times the file shrank or was replaced and was read from the start
        self._reset()

    def _reset(self) -> None:
        self._inode: int | None = None
        self._offset = 0
        self._pending = b""
        self._line_no = 0
        self._main_total = 0
        self._cached_batches = 0

    def poll(self) -> list[Update]:
        """Read what was appended since the last call and return its updates (oldest first)."""
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if self._inode is not None and (st.st_ino != self._inode or st.st_size < self._offset):
                    self._reset()
                    self.restarts += 1
                    if self.path.suffix != ".jsonl":
                        self.format = None
                self._inode = st.st_ino
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        self._pending += data
        if self.format is None:
            head = self._pending.lstrip()
            if not head:
                return []
            self.format = "metrics" if head.startswith(b'{"') else "text"
        return self._parse_metrics() if self.format == "metrics" else self._parse_text()

    def _parse_metrics(self) -> list[Update]:
        *lines, self._pending = self._pending.split(b"\n")
        updates = []
        for raw in lines:
            self._line_no += 1
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                updates.append(parse_metrics_line(line))
            except ValueError as exc:
                self.bad_lines += 1
                if self.first_bad is None:
                    self.first_bad = f"line {self._line_no}: {exc}"
        return updates

    def _parse_text(self) -> list[Update]:
        *segments, self._pending = re.split(rb"[\r\n]", self._pending)
        updates = []
        for raw in segments:
            updates.extend(self._parse_segment(raw.decode("utf-8", errors="replace")))
        tail = self._pending.decode("utf-8", errors="replace")
        progress = parse_progress(tail)
        if progress is not None and self._is_main_bar(progress):
            updates.append(progress)
        return updates

    def _is_main_bar(self, progress: Update) -> bool:
        if progress["max_steps"] < self._main_total:
            return False
        self._main_total = progress["max_steps"]
        return True

    def _parse_segment(self, segment: str) -> list[Update]:
        updates: list[Update] = []
        progress = parse_progress(segment)
        if progress is not None and self._is_main_bar(progress):
            updates.append(progress)
        log_dict = parse_log_dict(segment)
        if log_dict is not None:
            updates.append(log_dict)
        cache = _CACHE_ENABLED.search(segment)
        if cache:
            updates.append({"cache_manifest": cache["manifest"]})
        if _CACHED_BATCH.search(segment):
            self._cached_batches += 1
            updates.append({"cached_batches": self._cached_batches})
        return updates
