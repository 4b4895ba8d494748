"""`vlnflow demo-data`: a small, realistic data set in every input layout vlnflow reads.

    OUT/episodes/<episode>/step_<idx>_<ACTION>.png|.json, milestones_result.json
    OUT/annotations.json     one {id, conversations, images} entry per step, images relative to OUT
    OUT/vlnce_train.json.gz  VLN-CE episodes file for OUT/episodes: read with it, the episode
                             folders are an R2R-CE trajectory set (format vlnce)
    OUT/dagger/annotations.json, OUT/dagger/images/<video>/rgb/NNN.jpg
                             a small DAgger-layout trajectory set (format scalevln), other episodes
    OUT/.complete            written last (the Makefile depends on it)

The annotations are made from the episode directories by the index's own reader
and prompt builders (history H=8, no padding, as JanusVLN's create_data does), so
indexing either format gives the same frames and targets. configs/demo_sources.yaml
reads OUT/episodes (as vlnce) and OUT/dagger as two sources.

Episode lengths follow a profile: `demo` (3..40 steps, short for tests) or `r2r`
(R2R-CE-like, 10..120 steps around a mean of ~57: 612,492 training samples over
10,819 R2R-CE training episodes), so a benchmark shard has R2R-CE's mix of frame
counts and shared frames. `texture` adds fixed per-pixel noise to every frame so a
640x480 PNG weighs (~500 KB at 4) and decodes like a real rendered frame rather than
a flat drawing (~15 KB); `workers` renders episodes in parallel processes.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from vlnflow.data import demo_scene as scene
from vlnflow.data.episode_dirs import MILESTONES, read_episode_dir
from vlnflow.data.history import history_indices
from vlnflow.data.prompts import build_answer, build_prompt, resolve_style
from vlnflow.data.vocabulary import ACTIONS, step_filename
from vlnflow.errors import UserError

COMPLETE = ".complete"
EPISODES_DIR = "episodes"
ANNOTATIONS = "annotations.json"
VLNCE_EPISODES = "vlnce_train.json.gz"
DAGGER_DIR = "dagger"
DAGGER_EPISODES = 4
ANNOTATION_HISTORY = 8  # JanusVLN create_data's max_history_images
DEMO_EPISODES = 40  # enough for the demo's held-out episodes to show what training learnt (830 samples)

# How an instruction names its landmark; the episode's seed picks one, so the wording varies but never says
# where the landmark is: only the frames show that.
_INSTRUCTIONS = (
    "Walk to the {name} and stop next to it.",
    "Go over to the {name} and stop there.",
    "Find the {name} and stop when you reach it.",
    "Head for the {name} and wait next to it.",
)


LENGTH_PROFILES = {"demo": (3, 40), "r2r": (10, 120)}  # (shortest, longest) episode in steps
R2R_MEAN_STEPS, R2R_SD_STEPS = 57.0, 20.0


def episode_lengths(n_episodes: int, rng: np.random.Generator, profile: str = "demo") -> list[int]:
    """Episode lengths of a profile with both extremes present: demo uniform in 3..40; r2r normal around 57
    steps (sd 20) clipped to R2R-CE's 10..120."""
    if profile not in LENGTH_PROFILES:
        raise UserError(f"demo-data: --lengths must be one of {sorted(LENGTH_PROFILES)}, got {profile!r}")
    lo, hi = LENGTH_PROFILES[profile]
    if profile == "demo":
        lengths = [int(x) for x in rng.integers(lo, hi + 1, size=n_episodes)]
    else:
        lengths = [int(np.clip(round(x), lo, hi)) for x in rng.normal(R2R_MEAN_STEPS, R2R_SD_STEPS, size=n_episodes)]
    lengths[0], lengths[min(1, n_episodes - 1)] = lo, hi
    return lengths


def _milestones(actions: list[str], target: str, wording: int) -> dict:
    """instruction_text, subinstructions and completion_checkpoints: a first sub-instruction for the turns the
    walk starts with (if any), then the approach; the checkpoint is the last frame of those turns."""
    instruction = _INSTRUCTIONS[wording].format(name=target)
    approach = f"Walk up to the {target} and stop next to it."
    turns = next((i for i, a in enumerate(actions) if a not in ("TURN_LEFT", "TURN_RIGHT")), len(actions))
    if turns == 0:
        return {"instruction_text": instruction, "subinstructions": [approach], "completion_checkpoints": []}
    side = "left" if actions[0] == "TURN_LEFT" else "right"
    return {
        "instruction_text": instruction,
        "subinstructions": [f"Turn {side} to face the {target}.", approach],
        "completion_checkpoints": [{"subinstruction_index": 0, "checkpoint_frame_index": turns - 1}],
    }


def textured(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    """`image` plus fixed Gaussian noise of `sigma` grey levels (0: unchanged): the entropy of a real frame."""
    if sigma <= 0:
        return image
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def write_episode(directory: str, episode_id: str, length: int, seed: int, size: tuple[int, int], texture: float = 0.0) -> None:
    """One episode directory: rendered frames, their description JSONs and milestones_result.json."""
    rng = np.random.default_rng(seed)
    target, actions, poses = scene.plan_episode(rng, length)
    wall_index = int(rng.integers(len(scene.WALLS)))
    wall_name = ("beige", "pale blue", "sand", "sage")[wall_index]
    wording = int(rng.integers(len(_INSTRUCTIONS)))
    os.makedirs(directory, exist_ok=True)
    for idx, (action, pose) in enumerate(zip(actions, poses)):
        stem = os.path.join(directory, step_filename(idx, action, "png")[: -len(".png")])
        image = scene.render(pose, [target], scene.WALLS[wall_index], size, f"{episode_id} step {idx}")
        image = textured(image, texture, seed * 1009 + idx)
        image.save(stem + ".png", optimize=False, compress_level=6)
        landmark, spatial = scene.describe(pose, [target], wall_name)
        with open(stem + ".json", "w") as fh:
            json.dump({"landmark_description": landmark, "spatial_description": spatial}, fh, indent=1)
    with open(os.path.join(directory, MILESTONES), "w") as fh:
        json.dump({"episode_id": episode_id, **_milestones(actions, target.name, wording)}, fh, indent=1)


def write_dagger_trajectory(root: str, trajectory_id: int, length: int, seed: int, size: tuple[int, int]) -> dict:
    """Frames of one DAgger-layout trajectory under root/images/<video>/rgb/NNN.jpg; returns its annotations entry.

    As upstream's dagger.py writes them: actions[0] = -1, actions[k] = the action taken at frame k - 1
    (an index into STOP, MOVE_FORWARD, TURN_LEFT, TURN_RIGHT), one action per frame."""
    rng = np.random.default_rng(seed)
    target, actions, poses = scene.plan_episode(rng, length)
    wall_index = int(rng.integers(len(scene.WALLS)))
    wording = int(rng.integers(len(_INSTRUCTIONS)))
    video = f"demo_scene_R2R_{trajectory_id:06d}"
    frames_dir = os.path.join(root, "images", video, "rgb")
    os.makedirs(frames_dir, exist_ok=True)
    for idx, pose in enumerate(poses):
        image = scene.render(pose, [target], scene.WALLS[wall_index], size, f"dagger {trajectory_id} step {idx}")
        image.save(os.path.join(frames_dir, f"{idx:03d}.jpg"), quality=85)
    return {
        "id": trajectory_id,
        "video": f"images/{video}",
        "instructions": [_INSTRUCTIONS[wording].format(name=target.name)],
        "actions": [-1] + [ACTIONS.index(a) for a in actions[:-1]],
    }


def write_dagger_demo(root: str, n_trajectories: int, size: tuple[int, int], seed: int) -> list[dict]:
    """A DAgger-layout trajectory set (annotations.json + images/) of n short trajectories."""
    rng = np.random.default_rng(seed + 7919)
    entries = [
        write_dagger_trajectory(root, 100 + i, int(rng.integers(3, 13)), seed * 100003 + 50000 + i, size)
        for i in range(n_trajectories)
    ]
    with open(os.path.join(root, ANNOTATIONS), "w") as fh:
        json.dump(entries, fh, indent=1)
    return entries


def write_vlnce_episodes(path: str, episodes_root: str, episode_ids: list[str]) -> None:
    """A VLN-CE episodes file ({"episodes": [{episode_id, instruction: {instruction_text}}]}) for the
    episode folders, with their milestones' instructions; gzip without a timestamp (deterministic bytes)."""
    episodes = []
    for episode_id in episode_ids:
        with open(os.path.join(episodes_root, episode_id, MILESTONES)) as fh:
            text = json.load(fh)["instruction_text"]
        episodes.append({"episode_id": episode_id, "trajectory_id": len(episodes), "instruction": {"instruction_text": text}})
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(json.dumps({"episodes": episodes}).encode())


def annotation_entries(episodes_root: str, episode_id: str, prefix: str) -> list[dict]:
    """JanusVLN annotation entries for one episode directory, built with the index's reader and builders."""
    episode = read_episode_dir(episodes_root, episode_id)
    entries = []
    for j, targets in enumerate(episode.targets):
        frames = [episode.frames[i] for i in history_indices(j, ANNOTATION_HISTORY, "none")]
        style = resolve_style("auto", targets)
        entries.append(
            {
                "id": f"{episode_id}/{os.path.basename(episode.frames[j])}",
                "conversations": [
                    {"from": "human", "value": build_prompt(episode.instruction, len(frames), style)},
                    {"from": "gpt", "value": build_answer(targets, style)},
                ],
                "images": [f"{prefix}{f}" for f in frames],
            }
        )
    return entries


def _write_one(args: tuple) -> None:
    write_episode(*args)


def make_demo(
    out: str,
    n_episodes: int = DEMO_EPISODES,
    size: tuple[int, int] = (640, 480),
    seed: int = 0,
    force: bool = False,
    *,
    lengths: list[int] | str = "demo",
    episode_ids: list[str] | None = None,
    texture: float = 0.0,
    workers: int = 1,
) -> dict:
    """Write the demo data set into `out`; returns a summary (episodes, samples, bytes).

    `lengths`: a profile name (demo | r2r) or one length per episode (>= 2 steps each); `episode_ids`
    (default ep0000, ep0001, ...) lets a caller place episodes in chosen shards (shards go by episode id).
    """
    if isinstance(lengths, str):
        if n_episodes < 2:
            raise UserError("demo-data: --episodes must be at least 2")
    else:
        n_episodes = len(lengths)
        if n_episodes < 1 or min(lengths) < 2:
            raise UserError(f"demo-data: episode lengths must be at least 2 steps, got {lengths}")
    ids = list(episode_ids) if episode_ids is not None else [f"ep{i:04d}" for i in range(n_episodes)]
    if len(ids) != n_episodes or len(set(ids)) != n_episodes:
        raise UserError(f"demo-data: need {n_episodes} distinct episode ids, got {len(ids)} ({len(set(ids))} distinct)")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise UserError(f"demo-data: {out} exists and is not empty; pass --force to replace it")
        for name in (EPISODES_DIR, ANNOTATIONS, COMPLETE, VLNCE_EPISODES, DAGGER_DIR):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    root = os.path.join(out, EPISODES_DIR)
    os.makedirs(root, exist_ok=True)
    if isinstance(lengths, str):
        lengths = episode_lengths(n_episodes, np.random.default_rng(seed), lengths)
    jobs = [(os.path.join(root, episode_id), episode_id, length, seed * 100003 + i, size, texture)
            for i, (episode_id, length) in enumerate(zip(ids, lengths))]  # fmt: skip
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_one, jobs))
    else:
        for job in jobs:
            _write_one(job)
    entries = []
    for episode_id in ids:
        entries += annotation_entries(root, episode_id, f"{EPISODES_DIR}/")
    with open(os.path.join(out, ANNOTATIONS), "w") as fh:
        json.dump(entries, fh, indent=1)
    write_vlnce_episodes(os.path.join(out, VLNCE_EPISODES), root, ids)
    dagger = write_dagger_demo(os.path.join(out, DAGGER_DIR), DAGGER_EPISODES, size, seed)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    with open(os.path.join(out, COMPLETE), "w") as fh:
        fh.write("ok\n")
    return {"episodes": n_episodes, "samples": len(entries), "dagger_trajectories": len(dagger), "bytes": total,
            "lengths": list(lengths)}
