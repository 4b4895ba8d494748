"""Readers for the files the pipeline's jobs already wrote: Snakemake benchmark TSVs, precompute stats,
the cache manifest, training metrics.jsonl and the sample index. Nothing here measures anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from vlnflow.errors import UserError

# Columns of a Snakemake benchmark TSV that the report uses (max_rss is in MB, cpu_time in s).
BENCHMARK_COLUMNS = ("s", "max_rss", "cpu_time")


def read_benchmark(path: str | Path) -> dict[str, float]:
    """One job's benchmark TSV -> {s, max_rss, cpu_time}. A `repeat()` benchmark has one row per
    repetition: s and cpu_time are their mean, max_rss their max. "NA" (job shorter than one
    sampling interval) becomes NaN, shown as missing rather than as zero."""
    table = pd.read_csv(path, sep="\t", na_values=["NA"])
    missing = [c for c in BENCHMARK_COLUMNS if c not in table.columns]
    if missing or table.empty:
        raise UserError(f"{path} is not a Snakemake benchmark file (missing {missing or 'rows'})")
    return {
        "s": float(table["s"].mean()),
        "max_rss": float(table["max_rss"].max()),
        "cpu_time": float(table["cpu_time"].mean()),
    }


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _records(path: str | Path) -> list[dict]:
    """The JSON lines of a metrics.jsonl (blank lines ignored, bad lines named)."""
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
    return records


def read_metrics(path: str | Path) -> pd.DataFrame:
    """metrics.jsonl -> one row per logged optimizer step (validation records left out)."""
    records = [r for r in _records(path) if r.get("kind") != "val"]
    if not records:
        raise UserError(f"{path} holds no training steps")
    table = pd.DataFrame.from_records(records)
    for key in ("s_per_it", "data_wait_s", "samples_per_s"):
        if key not in table.columns:
            raise UserError(f"{path}: training metrics lack '{key}'")
    return table


def read_val_metrics(path: str | Path) -> pd.DataFrame:
    """The validation records of a metrics.jsonl (kind "val": step, val_loss, ...); empty without any."""
    records = [r for r in _records(path) if r.get("kind") == "val"]
    return pd.DataFrame.from_records(records, columns=None if records else ["step", "val_loss"])


def count_samples(path: str | Path) -> int:
    """Rows of the sample index (the data set size), from the Parquet footer."""
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def newest_mtime(paths: list[str]) -> float:
    return max((Path(p).stat().st_mtime for p in paths), default=math.nan)
