# DeepSpeed training reading the feature cache; `vlnflow launch` starts torchrun on each node.
# Nodes and GPUs per node come from config.yaml's cluster section; Slurm specifics
# (partition, gres, exclusive) live in the slurm_h800 profile.

import os

TRAIN_RUN = config["train"]["run"]
NODES = config["cluster"]["nodes"]


rule train:
    input:
        samples=config["train"]["samples"],
        validated=wf.train_cache_inputs(config),
    output:
        metrics=f"results/train/{TRAIN_RUN}/metrics.jsonl",
        summary=f"results/train/{TRAIN_RUN}/summary.json",
    params:
        run_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        use_cache=config["train"]["cache"] is not None,
        max_steps=None,
        gpus_per_node=config["cluster"]["gpus_per_node"],
    resources:
        nodes=NODES,
        tasks=NODES,
        # With `mpi` set (also "" on one node) the Slurm plugin runs the script in the batch step, un-wrapped:
        # `vlnflow launch` then gives the ranks an srun step of their own, which the warning signal reaches.
        mpi="srun" if NODES > 1 else "",
        # GPUs of the whole run (`gpu=N` is a job total); none on the CPU demo (backend gloo)
        gpu=config["cluster"]["gpus_per_node"] * NODES if config["cluster"]["backend"] == "nccl" else 0,
    log:
        f"results/logs/train/{TRAIN_RUN}.log",
    benchmark:
        f"results/benchmark/train/{TRAIN_RUN}.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/train.py"


rule train_live:
    input:
        samples=config["train"]["samples"],
        vision=wf.vision_cache_inputs(config),  # VGGT live; the vision rows as in `train` (cache.vision)
    output:
        metrics=f"results/train/{TRAIN_RUN}_live/metrics.jsonl",
        summary=f"results/train/{TRAIN_RUN}_live/summary.json",
    params:
        run_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        use_cache=False,
        max_steps=config["benchmark"]["compare_live_steps"] or None,
        gpus_per_node=config["cluster"]["gpus_per_node"],
    resources:
        nodes=NODES,
        tasks=NODES,
        mpi="srun" if NODES > 1 else "",
        gpu=config["cluster"]["gpus_per_node"] * NODES if config["cluster"]["backend"] == "nccl" else 0,
    log:
        f"results/logs/train/{TRAIN_RUN}_live.log",
    benchmark:
        f"results/benchmark/train/{TRAIN_RUN}_live.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/train.py"
