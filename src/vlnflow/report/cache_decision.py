"""The report's "cache or live" section: the lines of `vlnflow cache estimate`, from the report's own numbers.

Rates are this report's measurements where it has them (the precompute stage's samples per job-second,
one GPU per job; the cached run and its `_live` twin, as a pair) and docs/benchmarks.md's otherwise;
the arithmetic and the labels are vlnflow.cache.decision's.
"""

from __future__ import annotations

import math

import pandas as pd

from vlnflow.cache.decision import Decision, Rate, docs_rates


def report_rates(table: pd.DataFrame, runs: dict[str, pd.DataFrame]) -> dict[str, Rate]:
    from vlnflow.report.report import train_summary

    rates = docs_rates()
    pre = table.set_index("stage").loc["precompute"]
    if not math.isnan(pre["samples_per_s"]) and pre["samples_per_s"] > 0:
        rates["precompute"] = Rate(float(pre["samples_per_s"]), f"measured: precompute stage above, {int(pre['jobs'])} jobs", "workspace")
    if {"cached features", "live VGGT"} <= set(runs):  # a like-for-like pair only
        for kind, label in (("cached", "cached features"), ("live", "live VGGT")):
            s = train_summary(runs[label])
            rates[kind] = Rate(s["samples_per_s"] / s["world_size"],
                               f"measured: {label} run above, {s['steps']} steps on {s['world_size']} GPU(s)", "workspace")  # fmt: skip
    return rates


def cache_decision_markdown(table: pd.DataFrame, runs: dict[str, pd.DataFrame], samples: int, gpus: int,
                            samples_source: str) -> str:
    """Markdown section: precompute GPU-hours, both epoch times, break-even epochs, for one epoch on `gpus` GPUs."""
    decision = Decision(samples, gpus, 1, 1, report_rates(table, runs))
    lines = ["", "## Cache or live VGGT (PROJECTION from the rates named on each line)", "",
             f"{samples:,} samples ({samples_source}), {gpus} GPUs, one epoch; `vlnflow cache estimate --epochs N "
             "--runs R --gpus G` answers for another plan.", "", "```"]  # fmt: skip
    return "\n".join(lines + decision.lines() + ["```", ""])
