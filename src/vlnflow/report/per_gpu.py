"""Report section "Precompute per GPU": which GPU ran which shard, its samples/s, and the node's aggregate.

Read from the precompute jobs' stats JSON (each records the GPU slot it claimed, its start and end
time and where its time went). The aggregate rate is all computed samples over the wall span from
the first job's start to the last job's end, per host: the number that says whether every GPU of a
node was busy, unlike a per-job rate. A second table gives each job's set-up split (imports,
weights, loader start, first batch with its compile), whether the host's compile cache was warm,
and the recompiles after warm-up with the steady-state rate (issue 21).
"""

from __future__ import annotations

import math

import pandas as pd

from vlnflow.report import sources

COLUMNS = ("shard", "host", "gpu", "gpu_name", "computed", "wall_s", "samples_per_s",
           "data_wait_s", "compute_s", "write_wait_s", "device_busy_pct", "started_at", "finished_at")  # fmt: skip


def _gpu_label(stats: dict) -> str:
    gpu = stats.get("gpu") or {}
    how = gpu.get("how")
    if how == "claimed":
        return f"{gpu['device']} (slot {gpu['slot']} of {gpu['slots']})"
    if how == "scheduler":
        return f"{gpu['device']} (scheduler)"
    if how:
        return f"{stats.get('device', '?')} ({how})"
    return stats.get("device", "unknown")


def per_gpu_table(stats_paths: list[str]) -> pd.DataFrame:
    """One row per precompute job, in start order; stats from before GPU slots give blanks, not errors."""
    rows = []
    for path in stats_paths:
        s = sources.read_json(path)
        split = s.get("time_split_s") or {}
        rows.append({
            "shard": s.get("shard"),
            "host": (s.get("gpu") or {}).get("host", ""),
            "gpu": _gpu_label(s),
            "gpu_name": s.get("gpu_name") or "",
            "computed": int(s.get("computed", 0)),
            "wall_s": float(s.get("wall_s", math.nan)),
            "samples_per_s": float(s.get("samples_per_s", math.nan)),
            "data_wait_s": float(split.get("data_wait", math.nan)),
            "compute_s": float(split.get("compute", math.nan)),
            "write_wait_s": float(split.get("write_wait", math.nan)),
            "device_busy_pct": 100 * float(split.get("device_busy", math.nan)) / float(s.get("loop_s") or math.nan),
            "started_at": float(s.get("started_at", math.nan)),
            "finished_at": float(s.get("finished_at", math.nan)),
        })  # fmt: skip
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values(["started_at", "shard"], na_position="last", ignore_index=True)


SETUP_COLUMNS = ("shard", "setup_s", "imports_s", "weights_s", "first_data_s", "first_batch_s", "later_warmup_s", "compile_cache",
                 "lock_wait_s", "recompiles_after_warmup", "steady_samples_per_s")  # fmt: skip


def _cache_state(stats: dict) -> str:
    compile_info = stats.get("compile")
    if not compile_info:
        return ""
    if not compile_info.get("enabled"):
        return "compile off"
    warm = {True: "warm", False: "cold", None: "no compile"}[compile_info.get("cache_warm")]
    return f"{warm} (first on host)" if compile_info.get("first_on_host") else warm


def setup_table(stats_paths: list[str]) -> pd.DataFrame:
    """One row per precompute job: its set-up split, compile-cache state and recompiles (blanks for old stats)."""
    rows = []
    for path in stats_paths:
        s = sources.read_json(path)
        split = s.get("setup_split_s") or {}
        has_split = bool(split)
        rows.append({
            "shard": s.get("shard"),
            "setup_s": float(s["setup_s"]) if has_split else math.nan,
            "imports_s": float(split.get("imports", math.nan)),
            "weights_s": float(split.get("weights", math.nan)),
            "first_data_s": float(split.get("first_data", math.nan)),
            "first_batch_s": float(split.get("first_batch", math.nan)),
            "later_warmup_s": float(split.get("later_warmup", math.nan)),
            "compile_cache": _cache_state(s),
            "lock_wait_s": float((s.get("compile") or {}).get("lock_wait_s", math.nan)),
            "recompiles_after_warmup": s.get("recompiles_after_warmup"),
            "steady_samples_per_s": float(s.get("steady_samples_per_s", math.nan)),
            "started_at": float(s.get("started_at", math.nan)),
        })  # fmt: skip
    table = pd.DataFrame(rows, columns=[*SETUP_COLUMNS, "started_at"])
    return table.sort_values(["started_at", "shard"], na_position="last", ignore_index=True)[list(SETUP_COLUMNS)]


def node_aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """Per host: jobs, distinct GPUs, computed samples, wall span (first start to last end), samples/s over it."""
    out = []
    for host, group in table.groupby("host", sort=True):
        span = group["finished_at"].max() - group["started_at"].min()
        samples = int(group["computed"].sum())
        out.append({"host": host, "jobs": len(group), "gpus": group["gpu"].nunique(), "samples": samples,
                    "span_s": span, "samples_per_s": samples / span if span > 0 else math.nan})  # fmt: skip
    return pd.DataFrame(out, columns=["host", "jobs", "gpus", "samples", "span_s", "samples_per_s"])


def _n(value, digits: str = ".3g") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, digits)


def per_gpu_markdown(stats_paths: list[str]) -> str:
    """The section's markdown (empty when no precompute job ran)."""
    if not stats_paths:
        return ""
    table = per_gpu_table(stats_paths)
    header = ["shard", "host", "GPU", "card", "samples", "wall s", "samples/s", "data wait s", "compute s", "write wait s",
              "device busy %"]  # fmt: skip
    lines = ["", "## Precompute per GPU", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for r in table.itertuples():
        cells = [str(r.shard), r.host, r.gpu, r.gpu_name, f"{r.computed:,}", _n(r.wall_s), _n(r.samples_per_s),
                 _n(r.data_wait_s), _n(r.compute_s), _n(r.write_wait_s), _n(r.device_busy_pct, ".0f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    agg = node_aggregate(table)
    lines += ["", "Node aggregate (all computed samples / wall span from the first job's start to the last one's end):", "",
              "| host | jobs | GPUs | samples | span s | samples/s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in agg.itertuples():
        lines.append(f"| {r.host} | {r.jobs} | {r.gpus} | {r.samples:,} | {_n(r.span_s)} | {_n(r.samples_per_s)} |")
    lines += ["", "Time split of each job's batch loop (main thread): data wait = waiting for decoded frames, compute = "
              "running (CPU) or launching (GPU) the encoder, write wait = blocked on the writer thread (on a GPU this "
              "includes waiting for the GPU); device busy = the batches' GPU time / loop time."]
    setup = setup_table(stats_paths)
    header = ["shard", "set-up s", "imports s", "weights s", "first data s", "first batch s", "later warm-up s", "compile cache", "lock wait s",
              "recompiles after warm-up", "steady samples/s"]  # fmt: skip
    lines += ["", "Set-up and compiles per job (set-up = imports + weights + loader start + first data + the first batch of "
              "each shape class, compiles included; compile cache warm = every graph came from the host's cache; "
              "recompiles after warm-up = batches that compiled after the first batch of their shape class):", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for r in setup.itertuples():
        recompiles = "" if r.recompiles_after_warmup is None or (isinstance(r.recompiles_after_warmup, float) and math.isnan(r.recompiles_after_warmup)) else str(int(r.recompiles_after_warmup))
        cells = [str(r.shard), _n(r.setup_s), _n(r.imports_s), _n(r.weights_s), _n(r.first_data_s), _n(r.first_batch_s),
                 _n(r.later_warmup_s), r.compile_cache, _n(r.lock_wait_s), recompiles, _n(r.steady_samples_per_s)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
