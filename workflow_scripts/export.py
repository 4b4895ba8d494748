"""Rule export: the run's newest complete checkpoint -> results/export/<run> (logic: vlnflow.export.export)."""
import logging

from vlnflow.export.export import export_run

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
export_run(
    snakemake.params.run_dir,
    snakemake.output[0],
    step=snakemake.params.step,
    layout=snakemake.params.layout,
    dtype=snakemake.params.dtype,
    config_path=snakemake.config,
    max_shard_size=snakemake.params.max_shard_size,
)
