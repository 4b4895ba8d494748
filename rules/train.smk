# DeepSpeed training reading the feature cache; `vlnflow launch` starts torchrun on each node.
# Nodes and GPUs per node come from config.yaml's cluster section; Slurm specifics
# (partition, gres, exclusive) live in the slurm_h800 profile.

TRAIN_RUN = config["train"]["run"]
NODES = config["cluster"]["nodes"]


def train_cache_inputs(wildcards):
    """Training waits for a validated cache when one is configured."""
    if config["train"]["cache"] is None:
        return []
    return ["results/cache/validation.json"]


rule train:
    input:
        samples=config["train"]["samples"],
        validated=train_cache_inputs,
    output:
        metrics=f"results/train/{TRAIN_RUN}/metrics.jsonl",
        summary=f"results/train/{TRAIN_RUN}/summary.json",
    params:
        run_dir=f"results/train/{TRAIN_RUN}",
        use_cache=config["train"]["cache"] is not None,
        max_steps=None,
        gpus_per_node=config["cluster"]["gpus_per_node"],
    resources:
        nodes=NODES,
        tasks=NODES,
        mpi="srun" if NODES > 1 else "",  # the plugin runs a multi-node rule un-wrapped only with mpi set
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
    output:
        metrics=f"results/train/{TRAIN_RUN}_live/metrics.jsonl",
        summary=f"results/train/{TRAIN_RUN}_live/summary.json",
    params:
        run_dir=f"results/train/{TRAIN_RUN}_live",
        use_cache=False,
        max_steps=config["benchmark"]["compare_live_steps"] or None,
        gpus_per_node=config["cluster"]["gpus_per_node"],
    resources:
        nodes=NODES,
        tasks=NODES,
        mpi="srun" if NODES > 1 else "",
    log:
        f"results/logs/train/{TRAIN_RUN}_live.log",
    benchmark:
        f"results/benchmark/train/{TRAIN_RUN}_live.tsv"
    conda:
        "../envs/vlnflow.yaml"
    script:
        "../workflow_scripts/train.py"
