# Feature cache: one precompute job per shard, a manifest, and validation that fails loudly.
# precompute_all = every shard file + manifest + validation (CPU checks per shard, live spot checks of
# every shard in one GPU job).


rule precompute_shard:
    input:
        shard="results/shards/{shard}.parquet",
    output:
        h5="results/cache/{shard}.h5",
        stats="results/benchmark/precompute/{shard}.stats.json",
    params:
        encoder=ENCODER_FINGERPRINT,  # any encoder setting change makes every shard stale
        storage={"dtype": config["cache"]["dtype"], "compression": config["cache"]["compression"]},  # so does a storage change
        partial=lambda wildcards: f"results/cache/.partial/{wildcards.shard}.h5",
    resources:
        gpu=1,  # one GPU of its own: a slot under results/gpu_slots (node) or the profile's gres (Slurm)
    log:
        "results/logs/precompute/{shard}.log",
    benchmark:
        "results/benchmark/precompute/{shard}.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/precompute_shard.py"


rule validate_shard:
    input:
        h5="results/cache/{shard}.h5",
        shard="results/shards/{shard}.parquet",
    output:
        "results/cache/validation/{shard}.json",
    params:
        encoder=ENCODER_FINGERPRINT,
        quarantine="results/cache/corrupt",
        validated="results/cache/validation.json",  # removed when this shard is moved aside, so the next run rebuilds it
    log:
        "results/logs/validate/{shard}.log",
    benchmark:
        "results/benchmark/validate/{shard}.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/validate_shard.py"


rule spot_check_cache:
    input:
        h5=wf.per_shard(checkpoints, "results/cache/{shard}.h5"),
        shards=wf.per_shard(checkpoints, "results/shards/{shard}.parquet"),
        # after every shard's CPU checks: never read a file that validate_shard is moving aside
        reports=wf.per_shard(checkpoints, "results/cache/validation/{shard}.json"),
    output:
        "results/cache/validation/spot_check.json",
    params:
        encoder=ENCODER_FINGERPRINT,
    resources:
        gpu=1 if config["cache"]["spot_check"] > 0 else 0,  # VGGT loaded once for every shard's live recomputes
    log:
        "results/logs/validate/spot_check.log",
    benchmark:
        "results/benchmark/validate/spot_check.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/spot_check_cache.py"


rule merge_manifest:
    input:
        h5=wf.per_shard(checkpoints, "results/cache/{shard}.h5"),
        # after every shard's validation: never read a file that validate_shard is moving aside
        reports=wf.per_shard(checkpoints, "results/cache/validation/{shard}.json"),
    output:
        json="results/cache/manifest.json",
        parquet="results/cache/manifest.parquet",
    log:
        "results/logs/merge_manifest.log",
    benchmark:
        "results/benchmark/merge_manifest.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/merge_manifest.py"


rule validate_cache:
    input:
        manifest="results/cache/manifest.json",
        manifest_table="results/cache/manifest.parquet",
        reports=wf.per_shard(checkpoints, "results/cache/validation/{shard}.json"),
        spot_check="results/cache/validation/spot_check.json",
        samples="results/index/samples.parquet",
    output:
        "results/cache/validation.json",
    params:
        encoder=ENCODER_FINGERPRINT,
    log:
        "results/logs/validate_cache.log",
    benchmark:
        "results/benchmark/validate_cache.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/validate_cache.py"


rule precompute_all:
    input:
        "results/cache/validation.json",
        *wf.vision_cache_inputs(config),  # the per-frame vision cache too, with cache.vision (rules/vision_cache.smk)
