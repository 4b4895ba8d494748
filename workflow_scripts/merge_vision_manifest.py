"""Rule merge_vision_manifest: per-shard vision files -> manifest.json + manifest.parquet (logic: vlnflow.cache.vision_validate)."""
from vlnflow.cache.vision_validate import merge_vision_manifest
from vlnflow.workflow.logs import setup_logging

setup_logging(snakemake.log[0])
merge_vision_manifest(list(snakemake.input.h5), snakemake.output.json, snakemake.output.parquet)
