"""Rule validate_vision_shard: check one vision cache file; a corrupt one is moved aside (logic: vlnflow.cache.vision_validate)."""
import json
import sys
from pathlib import Path

from vlnflow.workflow.gpu_slots import claim_for_device
from vlnflow.workflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
claim_for_device(snakemake.config["spatial"]["device"], job=f"validate_vision_shard {snakemake.wildcards.shard}")

from vlnflow.cache.vision_validate import validate_vision_shard  # noqa: E402
from vlnflow.data.shards import stored_fingerprint  # noqa: E402

expected = {
    "encoder_fingerprint": snakemake.params.fingerprint,
    "shard_fingerprint": stored_fingerprint(snakemake.input.shard),
    "dtype": snakemake.config["cache"]["vision_dtype"],
}
report = validate_vision_shard(snakemake.input.h5, snakemake.input.shard, expected, snakemake.config,
                               quarantine_dir=snakemake.params.quarantine)
for problem in report["problems"]:
    log.error("%s: %s", report["shard"], problem)
if report.get("quarantined"):
    Path(snakemake.params.validated).unlink(missing_ok=True)  # with both missing, the next run rebuilds this shard
    sys.exit(f"{report['shard']}: unreadable or corrupt, moved to {report['quarantined']}; rerun to rebuild this shard")
with open(snakemake.output[0], "w") as fh:
    json.dump(report, fh, indent=2)
