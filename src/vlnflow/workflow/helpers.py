"""Input functions and parse-time values for rules/*.smk, kept here so they are testable.

Shard files are side files of the `shard` checkpoint (its one declared output is
results/shards/shards.json), so rules that read them ask the checkpoint for the
shard list first: `per_shard(checkpoints, "results/cache/{shard}.h5")` as an input,
or `shard_names(checkpoints)` inside an input function.
"""

from __future__ import annotations

from collections.abc import Callable

from vlnflow.data.index import INDEX_VERSION
from vlnflow.data.shards import SHARD_FORMAT_VERSION, read_shard_list
from vlnflow.data.sources import index_params, source_fingerprints, sources_from_config

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
    """Params function for the index rule: a stat-walk fingerprint of the data (dataset.root, or one per
    source with dataset.sources), so the index reruns when (and only when) a file of the data set is
    added, removed or modified.

    Computed once, lazily (a dry run of other targets never walks the data set), and only in the
    main Snakemake process: cluster job processes re-parse the Snakefile and must not walk 1M files.
    """
    cache: dict[str, object] = {}

    def fingerprint(wildcards):
        if not workflow.is_main_process:
            return NOT_MAIN_PROCESS
        if "value" not in cache:
            cache["value"] = source_fingerprints(sources_from_config(config))
        return cache["value"]

    return fingerprint


def index_settings_param(config: dict) -> dict:
    """The settings that decide the index content besides the files (a change reruns index)."""
    ds = config["dataset"]
    settings = {
        "index_version": INDEX_VERSION,
        "format": ds["format"],
        "annotations": ds["annotations"],
        "on_error": ds["on_error"],
        "prompt_style": ds["prompt_style"],
        "max_frames": config["history"]["max_frames"],
        "pad": config["history"]["pad"],
        "shard_count": config["shards"]["count"],
    }
    # keys that a single-root config without them never had stay out, so its params (and index) do not change
    if ds.get("vlnce_episodes"):
        settings["vlnce_episodes"] = ds["vlnce_episodes"]
    if ds.get("sources"):
        settings["sources"] = index_params(sources_from_config(config))
        settings["seed"] = ds["seed"]
    return settings


def shard_settings_param(config: dict) -> dict:
    settings = {"shard_version": SHARD_FORMAT_VERSION, "count": config["shards"]["count"]}
    if config["dataset"].get("sources"):  # source name -> its shard count
        settings["sources"] = {s.name: s.shards for s in sources_from_config(config)}
    return settings


def train_cache_inputs(config: dict) -> list[str]:
    """Training waits for a validated cache when one is configured (train.cache), else needs nothing."""
    return [] if config["train"]["cache"] is None else ["results/cache/validation.json"]
