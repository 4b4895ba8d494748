"""Rule spot_check_cache: recompute a few samples of every shard live with one VGGT load (logic: vlnflow.cache.spot_check)."""
import json

from vlnflow.workflow.gpu_slots import claim_for_device
from vlnflow.workflow.logs import process_started_at, setup_logging

process_start = process_started_at()
log = setup_logging(snakemake.log[0])
k = snakemake.config["cache"]["spot_check"]
# the live recomputes run on this job's own GPU, claimed before CUDA initialises (none needed for spot_check: 0)
device = snakemake.config["spatial"]["device"] if k > 0 else "cpu"
gpu = claim_for_device(device, job="spot_check_cache")

from vlnflow.cache.spot_check import spot_check_cache  # noqa: E402

report = spot_check_cache(
    list(zip(snakemake.input.h5, snakemake.input.shards)), snakemake.config, process_start=process_start, gpu_wait_s=gpu.waited_s
)
report["encoder_fingerprint"] = snakemake.params.encoder
report["timing"]["gpu"] = gpu.record()
for problem in report["problems"]:
    log.error("%s", problem)
with open(snakemake.output[0], "w") as fh:
    json.dump(report, fh, indent=2)
