"""Rule precompute_vision_shard: one shard's per-frame Qwen vision rows (logic: vlnflow.cache.vision_precompute)."""
import json

from vlnflow.workflow.gpu_slots import claim_for_device
from vlnflow.workflow.logs import setup_logging

setup_logging(snakemake.log[0])
# before anything initialises CUDA: this job's own GPU (spatial.device: the precompute jobs' device setting)
gpu = claim_for_device(snakemake.config["spatial"]["device"], job=f"precompute_vision_shard {snakemake.wildcards.shard}")

from vlnflow.cache.vision_precompute import precompute_vision_shard  # noqa: E402
from vlnflow.data.shards import stored_fingerprint  # noqa: E402

stats = precompute_vision_shard(
    snakemake.input.shard,
    stored_fingerprint(snakemake.input.shard),
    snakemake.output.h5,
    snakemake.params.partial,
    snakemake.config,
    jobs_per_node=gpu.slots if gpu.how == "claimed" else 1,  # GPU jobs sharing this node's cores
)
stats["gpu"] = gpu.record()
with open(snakemake.output.stats, "w") as fh:
    json.dump(stats, fh, indent=2)
