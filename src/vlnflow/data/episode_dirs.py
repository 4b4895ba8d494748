"""Reader for the episode-directory format (the seed's training data layout).

    <root>/<episode>/milestones_result.json        instruction_text, subinstructions, completion_checkpoints
    <root>/<episode>/step_<idx>_<ACTION>.png       one frame per step, named by the action taken there
    <root>/<episode>/step_<idx>_<ACTION>.json      landmark_description (2D), spatial_description (3D)

Frames are ordered by <idx>. Sub-instruction k covers the frames after checkpoint
k-1 up to and including checkpoint k; frames past the last checkpoint keep the last
sub-instruction. A step JSON is optional; a missing one leaves that step without
descriptions.
"""

from __future__ import annotations

import json
import os

from vlnflow.data.fingerprint import file_stats, stats_digest
from vlnflow.data.prompts import Targets
from vlnflow.data.records import Episode
from vlnflow.data.vocabulary import canonical_action, parse_step_filename
from vlnflow.errors import DatasetError

MILESTONES = "milestones_result.json"


def list_episode_dirs(root: str) -> list[str]:
    """Names of the visible sub-directories of root, sorted: one episode each."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def load_json(path: str, episode: str | None = None):
    """json.load with an error naming the file (and the episode) instead of a bare JSONDecodeError."""
    try:
        with open(path, "rb") as fh:  # bytes: json decodes UTF-8 itself, faster than a text wrapper
            return json.loads(fh.read())
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"unparseable JSON in {path}: {exc.msg} at line {exc.lineno} column {exc.colno}"
            + (f" (episode {episode})" if episode else ""),
            episode=episode,
            path=path,
        ) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"unparseable JSON in {path}: not UTF-8 ({exc.reason})", episode=episode, path=path
        ) from None


def sub_instruction_for_frame(frame: int, subinstructions: list[str], checkpoints: list[int]) -> str | None:
    """The sub-instruction active at `frame`: index = number of checkpoints strictly before it (clipped)."""
    if not subinstructions:
        return None
    k = sum(1 for c in checkpoints if c < frame)
    return subinstructions[min(k, len(subinstructions) - 1)]


def _text_or_none(value) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _instruction(milestones: dict, path: str, episode: str) -> str:
    value = milestones.get("instruction_text", milestones.get("instruction"))
    if isinstance(value, dict):  # VLN-CE style {"instruction_text": ...}
        value = value.get("instruction_text")
    if value is None and milestones.get("instructions"):
        value = milestones["instructions"]
    text = _text_or_none(value)
    if not text:
        raise DatasetError(f"episode {episode}: {path} has no instruction_text", episode=episode, path=path)
    return text


def _checkpoint_frames(milestones: dict, path: str, episode: str) -> list[int]:
    frames = []
    for i, checkpoint in enumerate(milestones.get("completion_checkpoints") or []):
        try:
            frames.append(int(checkpoint["checkpoint_frame_index"]))
        except (KeyError, TypeError, ValueError):
            raise DatasetError(
                f"episode {episode}: completion_checkpoints[{i}] in {path} has no integer checkpoint_frame_index",
                episode=episode,
                path=path,
            ) from None
    return sorted(frames)


def read_episode_dir(root: str, name: str) -> Episode:
    """Read one episode directory into an Episode (frames relative to root); DatasetError naming what is wrong."""
    directory = os.path.join(root, name)
    images: dict[int, tuple[str, str]] = {}  # idx -> (file name, action)
    step_jsons: dict[str, str] = {}  # stem -> file name
    stats = file_stats(directory)  # one directory scan gives the fingerprint and the file names
    for fname, _, _ in stats:
        parsed = parse_step_filename(fname)
        if parsed is None:
            continue
        idx, raw_action, ext = parsed
        if ext == "json":
            step_jsons[fname[: -len(".json")]] = fname
            continue
        try:
            action = canonical_action(raw_action)
        except ValueError:
            path = os.path.join(directory, fname)
            raise DatasetError(
                f"episode {name}: unknown action {raw_action!r} in frame file {path} "
                "(expected MOVE_FORWARD, TURN_LEFT, TURN_RIGHT or STOP)",
                episode=name,
                path=path,
            ) from None
        if idx in images:
            raise DatasetError(
                f"episode {name}: two frames with step index {idx}: {images[idx][0]} and {fname}",
                episode=name,
                path=directory,
            )
        images[idx] = (fname, action)

    image_stems = {os.path.splitext(fname)[0] for fname, _ in images.values()}
    for stem, json_name in sorted(step_jsons.items()):
        if stem not in image_stems:
            path = os.path.join(directory, json_name)
            raise DatasetError(
                f"episode {name}: image referenced but missing: {path} describes frame {stem}.png|jpg, "
                "which does not exist",
                episode=name,
                path=path,
            )
    if not images:
        raise DatasetError(
            f"episode {name} has no frames: no step_<idx>_<ACTION>.png|jpg files in {directory}",
            episode=name,
            path=directory,
        )
    milestones_path = os.path.join(directory, MILESTONES)
    if not os.path.isfile(milestones_path):
        raise DatasetError(f"episode {name}: {milestones_path} is missing", episode=name, path=milestones_path)
    milestones = load_json(milestones_path, name)
    if not isinstance(milestones, dict):
        raise DatasetError(
            f"episode {name}: {milestones_path} is not a JSON object", episode=name, path=milestones_path
        )
    instruction = _instruction(milestones, milestones_path, name)
    subinstructions = [s for s in (_text_or_none(v) for v in milestones.get("subinstructions") or []) if s]
    checkpoints = _checkpoint_frames(milestones, milestones_path, name)

    frames, targets = [], []
    for idx in sorted(images):
        fname, action = images[idx]
        stem = os.path.splitext(fname)[0]
        d2 = d3 = None
        json_name = step_jsons.get(stem)
        if json_name is not None:
            json_path = os.path.join(directory, json_name)
            desc = load_json(json_path, name)
            if not isinstance(desc, dict):
                raise DatasetError(f"episode {name}: {json_path} is not a JSON object", episode=name, path=json_path)
            d2 = _text_or_none(desc.get("landmark_description"))
            d3 = _text_or_none(desc.get("spatial_description"))
        frames.append(f"{name}/{fname}")
        targets.append(Targets(action, sub_instruction_for_frame(idx, subinstructions, checkpoints), d2, d3))
    return Episode(
        episode_id=name,
        instruction=instruction,
        frames=frames,
        targets=targets,
        source_format="episodes",
        fingerprint=stats_digest(stats),
    )
