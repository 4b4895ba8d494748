"""Rule merge_manifest: per-shard files -> manifest.json + manifest.parquet (logic: vlnflow.cache.manifest)."""
from vlnflow.cache.manifest import merge_manifest
from vlnflow.workflow.logs import setup_logging

setup_logging(snakemake.log[0])
merge_manifest(list(snakemake.input.h5), snakemake.output.json, snakemake.output.parquet)
