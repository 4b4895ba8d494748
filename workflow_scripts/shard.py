"""Checkpoint shard: index -> shards.json + the changed shard files beside it (logic: vlnflow.data.shards)."""

import os

from vlnflow.data.shards import write_shards
from vlnflow.workflow.logs import setup_logging

setup_logging(snakemake.log[0])
manifest = snakemake.output[0]
settings = snakemake.params.settings
write_shards(
    samples_path=snakemake.input.samples,
    episodes_path=snakemake.input.episodes,
    out_dir=os.path.dirname(manifest),
    manifest_path=manifest,
    count=settings["count"],
    source_counts=settings.get("sources"),  # per-source shard counts with dataset.sources
)
