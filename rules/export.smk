# The trained run as a model directory others load (logic: vlnflow.export): sharded safetensors,
# config.json, tokenizer and image processor; `vlnflow predict --model results/export/<run>` answers with it.


rule export:
    input:
        summary=rules.train.output.summary,
    output:
        directory(f"{RESULTS}/export/{TRAIN_RUN}"),
    params:
        run_dir=lambda wildcards, input: os.path.dirname(input.summary),
        layout=config["export"]["layout"],
        dtype=config["export"]["dtype"],
        step=config["export"]["step"],
        max_shard_size=config["export"]["max_shard_size"],
    log:
        f"{RESULTS}/logs/export/{TRAIN_RUN}.log",
    benchmark:
        f"{RESULTS}/benchmark/export/{TRAIN_RUN}.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/export.py"
