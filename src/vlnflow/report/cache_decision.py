"""The report's "cache or live" section: the lines of `vlnflow cache estimate`, from the report's own numbers.

Rates are this report's measurements where they fit the config (the precompute stage's samples per
job-second, one GPU per job, when the cache holds the configured feature shape; the cached run and
its `_live` twin, as a pair, when both trained the configured model), and the committed results
under docs/results otherwise: the same checks `choose_rates` applies to `vlnflow cache estimate`.
The arithmetic and the labels are vlnflow.cache.decision's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from vlnflow.cache.decision import Decision, Rate, docs_rates, feature_shape_note, metrics_rate, run_pair_note


def report_rates(table: pd.DataFrame, runs: dict[str, pd.DataFrame], *, config: dict | None,
                 manifest_json: str | None = None, precompute_stats: list[str] = (), run_dirs: dict[str, Path] | None = None,
                 docs: dict[str, Rate] | None = None) -> tuple[dict[str, Rate], list[str]]:  # fmt: skip
    """(rates, notes): measured where they fit `config`, docs/results otherwise; notes say what was left out and why."""
    rates, notes = dict(docs if docs is not None else docs_rates()), []
    pre = table.set_index("stage").loc["precompute"]
    measured_pre = not math.isnan(pre["samples_per_s"]) and pre["samples_per_s"] > 0
    pair = {"cached features", "live VGGT"} <= set(runs)
    if config is None:
        if measured_pre or pair:
            notes.append("no config given: this report's measurements cannot be checked against it and are left out")
        return rates, notes
    if measured_pre:
        note = feature_shape_note(config, manifest_json, "the precompute stage above")
        if note:
            notes.append(note)
        else:
            stats = [json.loads(Path(p).read_text()) for p in precompute_stats]
            per_job = [s["computed"] / s["wall_s"] for s in stats if s.get("wall_s") and s.get("computed")]
            rates["precompute"] = Rate(float(pre["samples_per_s"]), f"measured: precompute stage above, {int(pre['jobs'])} jobs",
                                       "workspace", min(per_job, default=None), max(per_job, default=None))  # fmt: skip
    if pair:  # a like-for-like pair only
        note = run_pair_note(config, run_dirs or {})
        if note:
            notes.append(note)
        else:
            for kind, label in (("cached", "cached features"), ("live", "live VGGT")):
                rates[kind] = metrics_rate(runs[label], f"measured: {label} run above")
    return rates, notes


def cache_decision_markdown(table: pd.DataFrame, runs: dict[str, pd.DataFrame], samples: int, gpus: int,
                            samples_source: str, **rate_inputs) -> str:
    """Markdown section: precompute GPU-hours, both epoch times, break-even epochs (with its range), for one
    epoch on `gpus` GPUs; `rate_inputs` go to report_rates (config, manifest_json, precompute_stats, run_dirs, docs)."""
    rates, notes = report_rates(table, runs, **{"config": None, **rate_inputs})
    decision = Decision(samples, gpus, 1, 1, rates)
    lines = ["", "## Cache or live VGGT (PROJECTION from the rates named on each line)", "",
             f"{samples:,} samples ({samples_source}), {gpus} GPUs, one epoch; `vlnflow cache estimate --epochs N "
             "--runs R --gpus G` answers for another plan.", "", "```"]  # fmt: skip
    return "\n".join(lines + decision.lines() + [f"left out           {n}" for n in notes] + ["```", ""])
