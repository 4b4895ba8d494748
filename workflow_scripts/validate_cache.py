"""Rule validate_cache: fail loudly unless the cache is complete, well-formed and faithful."""
import sys

from vlnflow.cache.validate import summary_text, validate_cache
from vlnflow.workflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
result = validate_cache(
    snakemake.input.manifest,
    list(snakemake.input.reports),
    snakemake.input.samples,
    snakemake.params.encoder,
    snakemake.output[0],
    spot_report=snakemake.input.spot_check,
)
log.info("\n%s", summary_text(result))
if not result["ok"]:
    sys.exit(1)
