"""`vlnflow demo-data`: a small, realistic data set in both JanusVLN input formats.

    OUT/episodes/<episode>/step_<idx>_<ACTION>.png|.json, milestones_result.json
    OUT/annotations.json     one {id, conversations, images} entry per step, images relative to OUT
    OUT/.complete            written last (the Makefile depends on it)

The annotations are made from the episode directories by the index's own reader
and prompt builders (history H=8, no padding, as JanusVLN's create_data does), so
indexing either format gives the same frames and targets.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from vlnflow.data import demo_scene as scene
from vlnflow.data.episode_dirs import MILESTONES, read_episode_dir
from vlnflow.data.history import history_indices
from vlnflow.data.prompts import build_answer, build_prompt, resolve_style
from vlnflow.data.vocabulary import step_filename
from vlnflow.errors import UserError

COMPLETE = ".complete"
EPISODES_DIR = "episodes"
ANNOTATIONS = "annotations.json"
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


def episode_lengths(n_episodes: int, rng: np.random.Generator) -> list[int]:
    """Lengths in 3..40 with both extremes present."""
    lengths = [int(x) for x in rng.integers(3, 41, size=n_episodes)]
    lengths[0], lengths[min(1, n_episodes - 1)] = 3, 40
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


def write_episode(directory: str, episode_id: str, length: int, seed: int, size: tuple[int, int]) -> None:
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
        image.save(stem + ".png", optimize=False, compress_level=6)
        landmark, spatial = scene.describe(pose, [target], wall_name)
        with open(stem + ".json", "w") as fh:
            json.dump({"landmark_description": landmark, "spatial_description": spatial}, fh, indent=1)
    with open(os.path.join(directory, MILESTONES), "w") as fh:
        json.dump({"episode_id": episode_id, **_milestones(actions, target.name, wording)}, fh, indent=1)


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


def make_demo(
    out: str, n_episodes: int = DEMO_EPISODES, size: tuple[int, int] = (640, 480), seed: int = 0, force: bool = False
) -> dict:
    """Write the demo data set into `out`; returns a summary (episodes, samples, bytes)."""
    if n_episodes < 2:
        raise UserError("demo-data: --episodes must be at least 2")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise UserError(f"demo-data: {out} exists and is not empty; pass --force to replace it")
        for name in (EPISODES_DIR, ANNOTATIONS, COMPLETE):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    root = os.path.join(out, EPISODES_DIR)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = episode_lengths(n_episodes, rng)
    ids = [f"ep{i:04d}" for i in range(n_episodes)]
    for i, (episode_id, length) in enumerate(zip(ids, lengths)):
        write_episode(os.path.join(root, episode_id), episode_id, length, seed * 100003 + i, size)
    entries = []
    for episode_id in ids:
        entries += annotation_entries(root, episode_id, f"{EPISODES_DIR}/")
    with open(os.path.join(out, ANNOTATIONS), "w") as fh:
        json.dump(entries, fh, indent=1)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    with open(os.path.join(out, COMPLETE), "w") as fh:
        fh.write("ok\n")
    return {"episodes": n_episodes, "samples": len(entries), "bytes": total}
