"""Rule validate_shard: check one feature file; a corrupt file is moved aside (logic: vlnflow.cache.validate)."""
import json

from vlnflow.cache.validate import validate_shard
from vlnflow.data.shards import stored_fingerprint
from vlnflow.workflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
expected = {
    "encoder_fingerprint": snakemake.params.encoder,
    "shard_fingerprint": stored_fingerprint(snakemake.input.shard),
    "dtype": snakemake.config["cache"]["dtype"],
}
report = validate_shard(snakemake.input.h5, snakemake.input.shard, expected, snakemake.config, quarantine_dir=snakemake.params.quarantine)
for problem in report["problems"]:
    log.error("%s: %s", report["shard"], problem)
with open(snakemake.output[0], "w") as fh:
    json.dump(report, fh, indent=2)
