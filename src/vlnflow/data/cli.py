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
    parser = subparsers.add_parser("demo-data", help="write the demo data set (episode dirs, annotations JSON, VLN-CE episodes file, a DAgger-layout set)")
    parser.add_argument("out", help="output folder (data/demo in the Makefile)")
    parser.add_argument("--episodes", type=int, default=DEMO_EPISODES, help=f"number of episodes (default {DEMO_EPISODES})")
    parser.add_argument("--size", type=_size, default=(640, 480), help="frame size WxH (default 640x480)")
    parser.add_argument("--lengths", default="demo", choices=["demo", "r2r"],
                        help="episode lengths: demo (3..40 steps) or r2r (R2R-CE-like, 10..120 around 57)")
    parser.add_argument("--texture", type=float, default=0.0,
                        help="per-pixel noise (grey levels) so frames weigh and decode like real ones (4: ~500 KB PNG at 640x480)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering episodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing demo in OUT")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vlnflow.data.demo import make_demo

    if args.episodes < 2:
        raise UserError("demo-data: --episodes must be at least 2")
    if args.texture < 0 or args.workers < 1:
        raise UserError("demo-data: --texture must be >= 0 and --workers >= 1")
    summary = make_demo(args.out, n_episodes=args.episodes, size=args.size, seed=args.seed, force=args.force,
                        lengths=args.lengths, texture=args.texture, workers=args.workers)  # fmt: skip
    print(
        f"demo data set: {summary['episodes']} episodes, {summary['samples']} samples, "
        f"plus {summary['dagger_trajectories']} DAgger-layout trajectories, {summary['bytes'] / 1e6:.1f} MB in {args.out}"
    )
    return 0
