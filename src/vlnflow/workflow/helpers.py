"""Input functions and parse-time values for rules/*.smk, kept here so they are testable.

Shard files are side files of the `shard` checkpoint (its one declared output is
results/shards/shards.json), so rules that read them ask the checkpoint for the
shard list first: `per_shard(checkpoints, "results/cache/{shard}.h5")` as an input,
or `shard_names(checkpoints)` inside an input function.
"""

from __future__ import annotations

from collections.abc import Callable

from vlnflow.data.fingerprint import dataset_fingerprint
from vlnflow.data.index import INDEX_VERSION
from vlnflow.data.shards import SHARD_FORMAT_VERSION, read_shard_list

NOT_MAIN_PROCESS = "computed-by-the-main-snakemake-process"


def shard_names(checkpoints) -> list[str]:
    """Names of the non-empty shards (shard_00000, ...).

    Before the shard job has run this raises Snakemake's incomplete-checkpoint signal, which
    makes Snakemake schedule the checkpoint first and call the input function again after it.
    """
    manifest = checkpoints.shard.get().output[0]
    return [entry["name"] for entry in read_shard_list(manifest)]


def per_shard(checkpoints, pattern: str) -> Callable:
    """Input function: `pattern` (with a {shard} wildcard) filled in for every shard."""

    def inputs(wildcards) -> list[str]:
        return [pattern.format(shard=name) for name in shard_names(checkpoints)]

    return inputs


def dataset_fingerprint_param(config: dict, workflow) -> Callable:
    """Params function for the index rule: a stat-walk fingerprint of dataset.root, so the index reruns
    when (and only when) a file under the root is added, removed or modified.

    Computed once, lazily (a dry run of other targets never walks the data set), and only in the
    main Snakemake process: cluster job processes re-parse the Snakefile and must not walk 1M files.
    """
    cache: dict[str, str] = {}

    def fingerprint(wildcards) -> str:
        if not workflow.is_main_process:
            return NOT_MAIN_PROCESS
        if "value" not in cache:
            cache["value"] = dataset_fingerprint(config["dataset"]["root"])
        return cache["value"]

    return fingerprint


def index_settings_param(config: dict) -> dict:
    """The settings that decide the index content besides the files (a change reruns index)."""
    ds = config["dataset"]
    return {
        "index_version": INDEX_VERSION,
        "format": ds["format"],
        "annotations": ds["annotations"],
        "on_error": ds["on_error"],
        "prompt_style": ds["prompt_style"],
        "max_frames": config["history"]["max_frames"],
        "pad": config["history"]["pad"],
        "shard_count": config["shards"]["count"],
    }


def shard_settings_param(config: dict) -> dict:
    return {"shard_version": SHARD_FORMAT_VERSION, "count": config["shards"]["count"]}


def train_cache_inputs(config: dict) -> list[str]:
    """Training waits for a validated cache when one is configured (train.cache), else needs nothing."""
    return [] if config["train"]["cache"] is None else ["results/cache/validation.json"]
