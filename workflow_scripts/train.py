"""Rule train / train_live: launch DeepSpeed training through `vlnflow launch` (logic: vlnflow.workflow.train_job)."""
import sys

from vlnflow.workflow.gpu_slots import claim_gpu
from vlnflow.workflow.train_job import run_train_job

if getattr(snakemake.resources, "gpu", 0):  # off the CPU demo: every GPU of this node, from the slots (or the scheduler's)
    job = f"{snakemake.rule} {snakemake.config['train']['run']}"
    gpus = claim_gpu(job=job, count=snakemake.config["cluster"]["gpus_per_node"])
    with open(snakemake.log[0], "a") as log:
        log.write(f"# {job}: {gpus.describe()}\n")
code = run_train_job(
    snakemake.config,
    snakemake.params.run_dir,
    snakemake.log[0],
    use_cache=snakemake.params.use_cache,
    max_steps=snakemake.params.max_steps,
)
sys.exit(code)
