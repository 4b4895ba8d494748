"""Time `index` and `shard` on a synthetic R2R-CE-sized episode tree (python bench/bench_index.py DIR).

Lays out 10,819 episode directories holding 612,492 steps in total (the R2R-CE
training split's size): empty step_<idx>_<ACTION>.png files (the index never
decodes images), real step JSONs with landmark/spatial descriptions and a
milestones_result.json per episode. Then times, RUNS times each, the parse-time
data set fingerprint (the stat walk the Snakefile does), build_index with
`--processes` worker processes, write_shards with every shard file written, and
write_shards with nothing changed. With --snakemake it also times the workflow
itself on the tree (a copy of Snakefile, rules/, workflow_scripts/): a first
`snakemake -c 2 results/shards/shards.json` and a no-change `snakemake -n`. Prints
medians as a Markdown table; removes the tree afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from vlnflow.data.fingerprint import dataset_fingerprint
from vlnflow.data.index import IndexSettings, build_index
from vlnflow.data.shards import write_shards
from vlnflow.data.vocabulary import step_filename

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R2R_EPISODES = 10_819
R2R_SAMPLES = 612_492


def episode_lengths(n_episodes: int, n_samples: int, seed: int) -> list[int]:
    """Lengths between 10 and 120 summing exactly to n_samples."""
    rng = np.random.default_rng(seed)
    mean = n_samples / n_episodes
    lengths = np.clip(rng.normal(mean, mean / 3, n_episodes).round().astype(int), 10, 120)
    diff = n_samples - int(lengths.sum())
    i = 0
    while diff != 0:  # nudge lengths one step at a time until the total is exact
        step = 1 if diff > 0 else -1
        if 10 <= lengths[i % n_episodes] + step <= 120:
            lengths[i % n_episodes] += step
            diff -= step
        i += 1
    return lengths.tolist()


def lay_out_tree(root: str, n_episodes: int, n_samples: int, seed: int = 0) -> None:
    """Write the synthetic tree under root (empty frames, real JSONs)."""
    rng = np.random.default_rng(seed + 1)
    actions = np.array(["MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT"])
    for e, length in enumerate(episode_lengths(n_episodes, n_samples, seed)):
        episode_id = f"{e + 1:06d}"
        directory = os.path.join(root, episode_id)
        os.makedirs(directory)
        steps = list(actions[rng.choice(3, size=length - 1, p=[0.6, 0.2, 0.2])]) + ["STOP"]
        n_subs = int(rng.integers(2, 5))
        checkpoints = sorted(
            rng.choice(np.arange(1, length - 1), size=min(n_subs - 1, length - 2), replace=False).tolist()
        )
        milestones = {
            "instruction_text": f"Walk past the sofa in episode {episode_id}, turn left at the kitchen island, "
            "go down the hallway and stop in front of the second bedroom door.",
            "subinstructions": [
                f"Sub-goal {k} of episode {episode_id}: head towards landmark {k}." for k in range(n_subs)
            ],
            "completion_checkpoints": [
                {"subinstruction_index": k, "checkpoint_frame_index": c} for k, c in enumerate(checkpoints)
            ],
        }
        with open(os.path.join(directory, "milestones_result.json"), "w") as fh:
            json.dump(milestones, fh)
        for idx, action in enumerate(steps):
            stem = os.path.join(directory, step_filename(idx, action, "png")[:-4])
            open(stem + ".png", "wb").close()
            with open(stem + ".json", "w") as fh:
                json.dump(
                    {
                        "landmark_description": f"A wooden door on the left and a grey sofa ahead, frame {idx}.",
                        "spatial_description": f"The door is about {1 + idx % 7}.5 m away to the left; "
                        f"the sofa is {2 + idx % 5}.0 m ahead, slightly right.",
                    },
                    fh,
                )


def snakemake_in_copy(work: str, root: str, shards: int) -> None:
    """Copy the workflow files into work/workflow with dataset.root = root and shards.count = shards."""
    import yaml

    dest = os.path.join(work, "workflow")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for name in ("Snakefile", "config.yaml", "rules", "workflow_scripts", "envs"):
        src = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(dest, name))
    config_path = os.path.join(dest, "config.yaml")
    with open(config_path) as fh:
        config = yaml.safe_load(fh)
    config["dataset"]["root"] = root
    config["shards"]["count"] = shards
    with open(config_path, "w") as fh:
        yaml.safe_dump(config, fh)


def run_snakemake(work: str, *args: str) -> None:
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [os.path.join(bin_dir, "snakemake"), *args, "results/shards/shards.json"]
    proc = subprocess.run(cmd, cwd=os.path.join(work, "workflow"), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="work folder (default: a new temporary folder)")
    parser.add_argument("--episodes", type=int, default=R2R_EPISODES)
    parser.add_argument("--samples", type=int, default=R2R_SAMPLES)
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", action="store_true", help="keep the tree and outputs")
    parser.add_argument(
        "--snakemake", action="store_true", help="also time the workflow (first run, no-change dry run)"
    )
    parser.add_argument("--out", default=None, help="results JSON (default: $OUT/bench_index.json when OUT is set)")
    args = parser.parse_args(argv)
    out_json = args.out or (os.path.join(os.environ["OUT"], "bench_index.json") if os.environ.get("OUT") else None)

    work = args.dir or tempfile.mkdtemp(prefix="vlnflow-bench-")
    root, out = os.path.join(work, "episodes"), os.path.join(work, "results")
    os.makedirs(out, exist_ok=True)
    try:
        if not os.path.isdir(root):
            t = timed(lambda: lay_out_tree(root, args.episodes, args.samples))
            print(f"laid out {args.episodes} episodes / {args.samples} steps in {t:.1f} s", file=sys.stderr)
        settings = IndexSettings(root=root, shard_count=args.shards)
        samples, episodes = os.path.join(out, "samples.parquet"), os.path.join(out, "episodes.parquet")
        shard_dir = os.path.join(out, "shards")
        times: dict[str, list[float]] = {"fingerprint": [], "index": [], "shard_all": [], "shard_unchanged": []}
        for _ in range(args.runs):
            times["fingerprint"].append(timed(lambda: dataset_fingerprint(root)))
            times["index"].append(
                timed(
                    lambda: build_index(settings, samples, episodes, os.path.join(out, "skipped.csv"), args.processes)
                )
            )
            shutil.rmtree(shard_dir, ignore_errors=True)
            manifest = os.path.join(shard_dir, "shards.json")
            times["shard_all"].append(timed(lambda: write_shards(samples, episodes, shard_dir, manifest, args.shards)))
            times["shard_unchanged"].append(
                timed(lambda: write_shards(samples, episodes, shard_dir, manifest, args.shards))
            )
        if args.snakemake:
            snakemake_in_copy(work, root, args.shards)
            times["snakemake_first_run"] = [timed(lambda: run_snakemake(work, "-c", "2"))]
            times["snakemake_nochange_dry_run"] = [timed(lambda: run_snakemake(work, "-n")) for _ in range(args.runs)]
        print(f"| stage | median of {args.runs} (s) | runs (s) |")
        print("|---|---|---|")
        for name, values in times.items():
            print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
        print(
            f"\n{args.episodes} episodes, {args.samples} samples, {args.shards} shards, {args.processes} processes; "
            f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"samples.parquet {os.path.getsize(samples) / 1e6:.0f} MB"
        )
        if out_json:
            from vlnflow.provenance import provenance
            from vlnflow.timing import spread

            report = {"provenance": provenance({k: len(v) for k, v in times.items()},
                                               argv=sys.argv if argv is None else ["bench/bench_index.py", *argv]),
                      "machine": {"host": platform.node(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
                      "episodes": args.episodes, "samples": args.samples, "shards": args.shards, "processes": args.processes,
                      "samples_parquet_bytes": os.path.getsize(samples), "stages_s": {k: spread(v) for k, v in times.items()}}  # fmt: skip
            with open(out_json, "w") as fh:
                json.dump(report, fh, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(work if not args.dir else root, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(os.path.join(work, "workflow"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
