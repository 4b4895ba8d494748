"""Rule validate_shard: check one feature file; a corrupt file is moved aside (logic: vlnflow.cache.validate)."""
import json
import sys
from pathlib import Path

from vlnflow.workflow.gpu_slots import claim_for_device
from vlnflow.workflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
# spot checks recompute samples live: this job's own GPU, claimed before CUDA initialises
claim_for_device(snakemake.config["spatial"]["device"], job=f"validate_shard {snakemake.wildcards.shard}")

from vlnflow.cache.validate import validate_shard  # noqa: E402
from vlnflow.data.shards import stored_fingerprint  # noqa: E402

expected = {
    "encoder_fingerprint": snakemake.params.encoder,
    "shard_fingerprint": stored_fingerprint(snakemake.input.shard),
    "dtype": snakemake.config["cache"]["dtype"],
}
report = validate_shard(snakemake.input.h5, snakemake.input.shard, expected, snakemake.config, quarantine_dir=snakemake.params.quarantine)
for problem in report["problems"]:
    log.error("%s: %s", report["shard"], problem)
if report.get("quarantined"):
    # Fail without a report, and withdraw the cache's earlier validation: with both missing, the next run
    # rebuilds this shard (Snakemake regenerates a missing intermediate file only for an output it must make).
    Path(snakemake.params.validated).unlink(missing_ok=True)
    sys.exit(f"{report['shard']}: unreadable or corrupt, moved to {report['quarantined']}; rerun to rebuild this shard")
with open(snakemake.output[0], "w") as fh:
    json.dump(report, fh, indent=2)
