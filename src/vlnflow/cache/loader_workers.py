"""How many DataLoader workers a precompute job decodes frames with (`cache.loader_workers`).

`auto` gives each GPU job its share of the node's cores: cores / GPU jobs on the node, minus one core for
the job's own main thread (which launches the GPU work and feeds the writer thread), at least 1 and at
most `MAX_AUTO`. Cores are the ones this process may run on (`os.sched_getaffinity`): inside a Slurm
job that is the job's allocation (then the job is alone in it: jobs per node = 1); on a node without a
scheduler it is the whole machine, shared by one job per GPU slot (vlnflow.workflow.gpu_slots).

Why that is enough: one worker decodes and prepares 640x480 PNG frames several times faster than one
GPU encodes the unique frames of its samples (bench/bench_decode.py; docs/benchmarks.md), and more
workers than needed only hold more pinned batches in memory (each in-flight batch is ~40 frames x 5 MB).
"""

from __future__ import annotations

import os

from vlnflow.errors import UserError

MAX_AUTO = 4


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_workers(cores: int, jobs_per_node: int) -> int:
    """cores // jobs - 1 (one core for the job's main thread), clamped to 1..MAX_AUTO."""
    share = max(1, cores // max(1, jobs_per_node))
    return max(1, min(MAX_AUTO, share - 1))


def loader_workers(setting: int | str, jobs_per_node: int = 1, cores: int | None = None) -> int:
    """The worker count for `cache.loader_workers` (an integer is used as given)."""
    if setting == "auto":
        return auto_workers(available_cores() if cores is None else cores, jobs_per_node)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise UserError(f"cache.loader_workers must be 'auto' or an integer >= 0, got {setting!r}")
    return setting
