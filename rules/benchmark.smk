# Per-stage timing report collected from the files the pipeline's jobs wrote (logic: src/vlnflow/report).
# `snakemake --report report.html` embeds the table and the plot (category "Benchmark").
from vlnflow.report.inputs import report_inputs


report: "../report/workflow.rst"


rule benchmark_report:
    input:
        unpack(report_inputs(rules, checkpoints, workflow, config)),
    output:
        md=report(f"{RESULTS}/benchmark/report.md", caption="../report/summary.rst", category="Benchmark"),
        csv=report(f"{RESULTS}/benchmark/report.csv", caption="../report/table.rst", category="Benchmark"),
        png=report(f"{RESULTS}/benchmark/timing.png", caption="../report/timing.rst", category="Benchmark"),
    params:
        run=config.get("train", {}).get("run"),
        projected_samples=config["benchmark"]["projected_samples"],
        gpus=config["benchmark"]["gpus_for_projection"],
    localrule: True
    log:
        f"{RESULTS}/logs/benchmark_report.log",
    benchmark:
        f"{RESULTS}/benchmark/benchmark_report.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/benchmark_report.py"
