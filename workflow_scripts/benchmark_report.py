"""Rule benchmark_report: collect the pipeline's benchmark files into report.md/.csv/timing.png (logic: vlnflow.report.report)."""
from vlnflow.report.inputs import snakemake_command
from vlnflow.report.report import ReportInputs, write_report
from vlnflow.workflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
write_report(
    ReportInputs.from_mapping(snakemake.input),
    snakemake.output.md,
    snakemake.output.csv,
    snakemake.output.png,
    command=snakemake_command(),
    run=snakemake.params.run,
    projected_samples=snakemake.params.projected_samples,
    gpus=snakemake.params.gpus,
    config=snakemake.config,
)
log.info("benchmark report: %s", snakemake.output.md)
