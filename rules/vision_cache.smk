# Per-frame vision cache (cache.vision): every frame's Qwen2.5-VL vision tower output before visual.merger,
# one file per data shard beside the VGGT cache, its own manifest and validation (vlnflow.cache.vision_*).
# vision_cache_all = every shard's file + manifest + validation; precompute_all and train include it when
# cache.vision is true.
from vlnflow.cache.vision_fingerprint import LazyFingerprint

# Qwen weights, vision config, image processor, frame geometry, model.dtype: computed when a vision job is
# scheduled (it reads the Qwen checkpoint's visual.* tensors once, then remembers their digest by file stat).
VISION_FINGERPRINT = LazyFingerprint(config)


rule precompute_vision_shard:
    input:
        shard="results/shards/{shard}.parquet",
    output:
        h5="results/cache/vision/{shard}.h5",
        stats="results/benchmark/precompute_vision/{shard}.stats.json",
    params:
        fingerprint=VISION_FINGERPRINT,  # any Qwen vision setting change makes every vision shard stale
        storage={"dtype": config["cache"]["vision_dtype"], "compression": config["cache"]["compression"]},
        partial=lambda wildcards: f"results/cache/vision/.partial/{wildcards.shard}.h5",
    resources:
        gpu=1,  # one GPU of its own, as precompute_shard
    log:
        "results/logs/precompute_vision/{shard}.log",
    benchmark:
        "results/benchmark/precompute_vision/{shard}.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/precompute_vision_shard.py"


rule validate_vision_shard:
    input:
        h5="results/cache/vision/{shard}.h5",
        shard="results/shards/{shard}.parquet",
    output:
        "results/cache/vision/validation/{shard}.json",
    params:
        fingerprint=VISION_FINGERPRINT,
        quarantine="results/cache/vision/corrupt",
        validated="results/cache/vision/validation.json",  # removed when this shard is moved aside
    resources:
        gpu=1,  # spot checks recompute frames with the tower
    log:
        "results/logs/validate_vision/{shard}.log",
    benchmark:
        "results/benchmark/validate_vision/{shard}.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/validate_vision_shard.py"


rule merge_vision_manifest:
    input:
        h5=wf.per_shard(checkpoints, "results/cache/vision/{shard}.h5"),
        reports=wf.per_shard(checkpoints, "results/cache/vision/validation/{shard}.json"),
    output:
        json="results/cache/vision/manifest.json",
        parquet="results/cache/vision/manifest.parquet",
    log:
        "results/logs/merge_vision_manifest.log",
    benchmark:
        "results/benchmark/merge_vision_manifest.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/merge_vision_manifest.py"


rule validate_vision_cache:
    input:
        manifest="results/cache/vision/manifest.json",
        manifest_table="results/cache/vision/manifest.parquet",
        reports=wf.per_shard(checkpoints, "results/cache/vision/validation/{shard}.json"),
        samples="results/index/samples.parquet",
    output:
        "results/cache/vision/validation.json",
    params:
        fingerprint=VISION_FINGERPRINT,
    log:
        "results/logs/validate_vision_cache.log",
    benchmark:
        "results/benchmark/validate_vision_cache.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/validate_vision_cache.py"


rule vision_cache_all:
    input:
        "results/cache/vision/validation.json",
