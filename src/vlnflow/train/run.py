"""Training entry point, one process per GPU: `python -m vlnflow.train.run --config C --run-dir D`.

`vlnflow launch` / the `train` rule start it under torchrun (and srun on several nodes).
Exit status 75 (vlnflow.train.stop.EXIT_STOPPED) when run alone and stopped on request: the
checkpoint is complete, run it again to resume; under `vlnflow launch` the launch reports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vlnflow.config import load_config
from vlnflow.errors import UserError
from vlnflow.train.stop import exit_code_after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlnflow.train.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--run-dir", required=True, help="results/train/<run>: metrics.jsonl, train.log, checkpoints/")
    parser.add_argument("--no-cache", action="store_true", help="ignore the feature cache: encode every sample live")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config key, e.g. train.deepspeed=\"zero3\"")
    args = parser.parse_args(argv)

    overrides: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(value)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == "0":
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    try:
        config = load_config(args.config, overrides)
        if rank == "0":  # the resolved settings, so `vlnflow export` rebuilds the same model without the yaml
            (run_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        from vlnflow.train.trainer import train

        summary = train(config, run_dir, use_cache=not args.no_cache, max_steps=args.max_steps)
    except UserError as exc:
        logging.getLogger("vlnflow.train").error("%s", exc)
        return 2
    if summary.get("stopped"):  # no summary.json: the run is not done (the workflow's output stays missing)
        return exit_code_after(summary)
    if rank == "0":
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
