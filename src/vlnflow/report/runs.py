"""Summaries of the training runs' metrics the report shows (shared by the stage table and the cache decision)."""

from __future__ import annotations

import pandas as pd


def train_summary(metrics: pd.DataFrame) -> dict[str, float]:
    """Median s/it and samples/s over logged steps; data wait as a share of all step time."""
    world = metrics["world_size"].median() if "world_size" in metrics else 1
    return {
        "steps": len(metrics),
        "s_per_it_median": float(metrics["s_per_it"].median()),
        "samples_per_s": float(metrics["samples_per_s"].median()),
        "data_wait_pct": float(100 * metrics["data_wait_s"].sum() / metrics["s_per_it"].sum()),
        "world_size": int(world),
    }
