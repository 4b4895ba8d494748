"""Rule precompute_shard: compute one shard's VGGT features (logic: vlnflow.cache.precompute)."""
import json

from vlnflow.workflow.gpu_slots import claim_for_device
from vlnflow.workflow.logs import process_started_at, setup_logging

process_start = process_started_at()  # the stats split the whole job's set-up from here
setup_logging(snakemake.log[0])
# before anything initialises CUDA: this job's own GPU (a slot of the node's GPUs, or the scheduler's)
gpu = claim_for_device(snakemake.config["spatial"]["device"], job=f"precompute_shard {snakemake.wildcards.shard}")

from vlnflow.cache.precompute import precompute_shard  # noqa: E402
from vlnflow.data.shards import stored_fingerprint  # noqa: E402

stats = precompute_shard(
    snakemake.input.shard,
    stored_fingerprint(snakemake.input.shard),
    snakemake.output.h5,
    snakemake.params.partial,
    snakemake.config,
    process_start=process_start,
    gpu_wait_s=gpu.waited_s,
    jobs_per_node=gpu.slots if gpu.how == "claimed" else 1,  # GPU jobs sharing this node's cores
)
stats["gpu"] = gpu.record()
with open(snakemake.output.stats, "w") as fh:
    json.dump(stats, fh, indent=2)
