"""`vlnflow demo-data OUT`: write the demo data set (both input formats)."""

from __future__ import annotations

import argparse

from vlnflow.data.demo import DEMO_EPISODES
from vlnflow.errors import UserError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 640x480, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"--size must be at least 16x16, got {text!r}")
    return w, h


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo-data", help="write the demo data set (episode dirs + annotations JSON)")
    parser.add_argument("out", help="output folder (data/demo in the Makefile)")
    parser.add_argument("--episodes", type=int, default=DEMO_EPISODES, help=f"number of episodes (default {DEMO_EPISODES})")
    parser.add_argument("--size", type=_size, default=(640, 480), help="frame size WxH (default 640x480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing demo in OUT")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vlnflow.data.demo import make_demo

    if args.episodes < 2:
        raise UserError("demo-data: --episodes must be at least 2")
    summary = make_demo(args.out, n_episodes=args.episodes, size=args.size, seed=args.seed, force=args.force)
    print(
        f"demo data set: {summary['episodes']} episodes, {summary['samples']} samples, "
        f"{summary['bytes'] / 1e6:.1f} MB in {args.out}"
    )
    return 0
