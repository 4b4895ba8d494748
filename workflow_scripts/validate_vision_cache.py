"""Rule validate_vision_cache: fail loudly unless the vision cache holds every indexed frame, well-formed and faithful."""
import sys

from vlnflow.cache.vision_validate import summary_text, validate_vision_cache
from vlnflow.workflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
result = validate_vision_cache(
    snakemake.input.manifest, list(snakemake.input.reports), snakemake.input.samples, snakemake.params.fingerprint, snakemake.output[0]
)
log.info("\n%s", summary_text(result))
if not result["ok"]:
    sys.exit(1)
