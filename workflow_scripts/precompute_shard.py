"""Rule precompute_shard: compute one shard's VGGT features (logic: vlnflow.cache.precompute)."""
import json

from vlnflow.cache.precompute import precompute_shard
from vlnflow.data.shards import stored_fingerprint
from vlnflow.workflow.logs import setup_logging

setup_logging(snakemake.log[0])
stats = precompute_shard(
    snakemake.input.shard,
    stored_fingerprint(snakemake.input.shard),
    snakemake.output.h5,
    snakemake.params.partial,
    snakemake.config,
)
with open(snakemake.output.stats, "w") as fh:
    json.dump(stats, fh, indent=2)
