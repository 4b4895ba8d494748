"""Rule index: the data set's sources -> samples.parquet, episodes.parquet, skipped.csv (logic: vlnflow.data.index)."""

import logging
import sys

from vlnflow.data.index import IndexSettings, build_index
from vlnflow.errors import UserError
from vlnflow.workflow.logs import setup_logging

setup_logging(snakemake.log[0])
settings = snakemake.params.settings
try:
    build_index(
        IndexSettings(
            root=snakemake.params.root,
            format=settings["format"],
            annotations=settings["annotations"],
            max_frames=settings["max_frames"],
            pad=settings["pad"],
            prompt_style=settings["prompt_style"],
            on_error=settings["on_error"],
            shard_count=settings["shard_count"],
            vlnce_episodes=settings.get("vlnce_episodes"),
            sources=tuple(settings["sources"]) if settings.get("sources") else None,
            seed=settings.get("seed", 0),
        ),
        samples_path=snakemake.output.samples,
        episodes_path=snakemake.output.episodes,
        skipped_path=snakemake.output.skipped,
        processes=snakemake.threads,
    )
except UserError as exc:  # a bad data set or setting: one clear line in the log, no traceback
    logging.getLogger("vlnflow.index").error("%s", exc)
    sys.exit(1)
