"""Rule train / train_live: launch DeepSpeed training through `vlnflow launch` (logic: vlnflow.workflow.train_job)."""
import sys

from vlnflow.workflow.train_job import run_train_job

code = run_train_job(
    snakemake.config,
    snakemake.params.run_dir,
    snakemake.log[0],
    use_cache=snakemake.params.use_cache,
    max_steps=snakemake.params.max_steps,
)
sys.exit(code)
