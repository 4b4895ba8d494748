# Data set -> sample index -> stable shards (logic: src/vlnflow/data).


rule index:
    output:
        samples=f"{RESULTS}/index/samples.parquet",
        episodes=f"{RESULTS}/index/episodes.parquet",
        skipped=f"{RESULTS}/index/skipped.csv",
    params:
        root=config["dataset"]["root"],
        settings=wf.index_settings_param(config),
        data_fingerprint=wf.dataset_fingerprint_param(config, workflow),
    threads: 8  # reader processes; capped by --cores
    log:
        f"{RESULTS}/logs/index/index.log",
    benchmark:
        f"{RESULTS}/benchmark/index/index.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/index.py"


checkpoint shard:
    input:
        samples=rules.index.output.samples,
        episodes=rules.index.output.episodes,
    output:
        f"{RESULTS}/shards/shards.json",
    params:
        settings=wf.shard_settings_param(config),
    log:
        f"{RESULTS}/logs/shards/shard.log",
    benchmark:
        f"{RESULTS}/benchmark/shards/shard.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/shard.py"
