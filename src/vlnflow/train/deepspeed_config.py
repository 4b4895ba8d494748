"""DeepSpeed configs: the packaged ZeRO presets filled with the run's batch and precision settings."""

from __future__ import annotations

import json
from importlib import resources

PRESETS = ("zero2_offload", "zero2", "zero3")


def load_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"train.deepspeed '{name}' is not one of {PRESETS}")
    text = resources.files("vlnflow.train").joinpath("ds_configs", f"{name}.json").read_text()
    config = json.loads(text)
    config.pop("_comment", None)
    return config


def build_ds_config(train_cfg: dict, world_size: int, cpu: bool) -> dict:
    """Full DeepSpeed config for this run; on CPU (tests, demo) bf16 stays on and comm goes through gloo."""
    config = load_preset(train_cfg["deepspeed"])
    micro = train_cfg["per_device_batch"]
    accum = train_cfg["grad_accum"]
    config.update(
        {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world_size,
            "gradient_clipping": train_cfg["grad_clip"],
            "bf16": {"enabled": bool(train_cfg["bf16"])},
            "steps_per_print": 10**9,  # our own metrics log replaces DeepSpeed's prints
            "wall_clock_breakdown": False,
        }
    )
    bucket = train_cfg.get("zero_bucket_elements")
    if bucket:
        # Larger buckets: fewer, longer reduce-scatter calls overlapped with backward (overlap_comm), more memory.
        zero = config["zero_optimization"]
        for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
            if key in zero:
                zero[key] = int(bucket)
    if cpu:
        # DeepSpeed's CPU accelerator has no pinned memory; fp32 on CPU keeps the demo fast and exact.
        off = config["zero_optimization"].get("offload_optimizer")
        if off:
            off["pin_memory"] = False
    return config
