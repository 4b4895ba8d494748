# vlnflow workflow: index -> shard -> precompute -> manifest -> validate -> train -> report.
# The map is docs/design.md (data flow, file formats, invariants); logic lives in src/vlnflow.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/dataset.smk"
include: "rules/precompute.smk"
include: "rules/vision_cache.smk"
include: "rules/train.smk"
include: "rules/export.smk"
include: "rules/benchmark.smk"


rule all:
    input:
        *wf.train_cache_inputs(config),  # no cache at all with train.cache: null (VGGT computed live)
        rules.train.output.metrics,
        rules.export.output,
        rules.benchmark_report.output,
    default_target: True
