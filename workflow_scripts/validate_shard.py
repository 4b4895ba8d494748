"""Rule validate_shard: check one feature file on the CPU; a corrupt file is moved aside (logic: vlnflow.cache.validate).
The live spot checks of every shard run in rule spot_check_cache (one GPU job)."""
import json
import sys
from pathlib import Path

from vlnflow.cache.validate import validate_shard
from vlnflow.data.shards import stored_fingerprint
from vlnflow.workflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
expected = {
    "encoder_fingerprint": snakemake.params.encoder,
    "shard_fingerprint": stored_fingerprint(snakemake.input.shard),
    "dtype": snakemake.config["cache"]["dtype"],
}
report = validate_shard(
    snakemake.input.h5, snakemake.input.shard, expected, snakemake.config, quarantine_dir=snakemake.params.quarantine, spot_check=0
)
for problem in report["problems"]:
    log.error("%s: %s", report["shard"], problem)
if report.get("quarantined"):
    # Fail without a report, and withdraw the cache's earlier validation: with both missing, the next run
    # rebuilds this shard (Snakemake regenerates a missing intermediate file only for an output it must make).
    Path(snakemake.params.validated).unlink(missing_ok=True)
    sys.exit(f"{report['shard']}: unreadable or corrupt, moved to {report['quarantined']}; rerun to rebuild this shard")
with open(snakemake.output[0], "w") as fh:
    json.dump(report, fh, indent=2)
