"""`vlnflow export RUN_DIR OUT [--step N] [--layout hf|janusvln] [--dtype bfloat16|float32]`."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="consolidate a run's ZeRO checkpoint into a loadable model directory",
        description="Consolidate RUN_DIR's newest complete checkpoint (or --step N) into OUT: sharded safetensors, "
        "config.json, tokenizer and image processor. --layout hf loads with transformers' "
        "Qwen2_5_VLForConditionalGeneration; --layout janusvln with JanusVLN's own model class.",
    )
    p.add_argument("run_dir", help="results/train/<run> (holds checkpoints/ and run_config.json)")
    p.add_argument("out", help="output directory (written as OUT.partial, renamed when complete)")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the newest complete one)")
    p.add_argument("--layout", choices=["hf", "janusvln"], default="hf")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--config", help="the run's config.yaml, when RUN_DIR has no run_config.json")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from vlnflow.export.export import export_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export_run(args.run_dir, args.out, step=args.step, layout=args.layout, dtype=args.dtype,
                     config_path=args.config, max_shard_size=_size(args.max_shard_size))
    print(out)
    return 0


def _size(text: str) -> int | str:
    return int(text) if text.isdigit() else text
