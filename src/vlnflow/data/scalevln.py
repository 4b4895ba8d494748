"""Reader for ScaleVLN and DAgger trajectory sets, read as upstream's create_data.py reads them.

    <root>/annotations.json                   [{"id", "video", "instructions", "actions"}, ...]
    <root>/images/<video name>/rgb/*.jpg      one frame per step (DAgger writes 000.jpg, 001.jpg, ...)

`video` is "images/<video name>" (upstream takes video.split('/')[1]); `actions` holds integer ids into
STOP, MOVE_FORWARD, TURN_LEFT, TURN_RIGHT, one per frame, the first being the action that led to frame 0
(DAgger writes -1 there). Upstream's process_episode_scalevln: step i's answer is ACTIONS[actions[i + 1]],
the last step's is STOP, and the instruction is instructions[0] (not stripped). Frames are ordered by
the number in their names when every name has one (upstream sorts by name: the same order for
zero-padded names such as DAgger's), otherwise by name.

An entry whose frame folder is missing or empty, or with fewer actions than frames, is an error
under dataset.on_error: fail and a skipped episode under skip (upstream yields no samples for the
first and stops with an IndexError on the second). Two entries with one id are an error for that id.
"""

from __future__ import annotations

import json
import os
import re

from vlnflow.data.annotations import hash_text
from vlnflow.data.episode_dirs import load_json
from vlnflow.data.fingerprint import file_stats, stats_digest
from vlnflow.data.prompts import Targets
from vlnflow.data.records import Episode
from vlnflow.data.vocabulary import ACTIONS
from vlnflow.errors import DatasetError

FORMAT = "scalevln"
REQUIRED_KEYS = ("id", "video", "instructions", "actions")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def is_scalevln_entry(entry) -> bool:
    """Whether an annotations entry is a ScaleVLN/DAgger trajectory (and not create_data.py's per-step output)."""
    return isinstance(entry, dict) and "video" in entry and "actions" in entry and "conversations" not in entry


def load_scalevln_entries(path: str) -> list[dict]:
    data = load_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path} must hold a JSON list of trajectories ({', '.join(REQUIRED_KEYS)})", path=path)
    return data


def frame_order(names: list[str]) -> list[str]:
    """By the number that ends each name's stem when all have distinct ones, else by name."""
    numbers = [_TRAILING_NUMBER.search(os.path.splitext(n)[0]) for n in names]
    if all(numbers) and len({int(m.group(1)) for m in numbers}) == len(names):
        return [n for _, n in sorted(zip((int(m.group(1)) for m in numbers), names))]
    return sorted(names)


def _entry_problem(entry, position: int) -> str | None:
    if not isinstance(entry, dict):
        return f"entry {position} is not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        return f"entry {position} (id {entry.get('id')!r}) lacks {', '.join(missing)}"
    video = entry["video"]
    if not isinstance(video, str) or len(video.split("/")) < 2 or not video.split("/")[1]:
        return f"entry {position} (id {entry['id']!r}): video {video!r} is not 'images/<name>'"
    instructions = entry["instructions"]
    if not isinstance(instructions, list) or not instructions or not isinstance(instructions[0], str):
        return f"entry {position} (id {entry['id']!r}): instructions must be a non-empty list of strings"
    if not isinstance(entry["actions"], list):
        return f"entry {position} (id {entry['id']!r}): actions must be a list"
    return None


def read_scalevln_episode(root: str, entry: dict, path: str) -> Episode:
    """One trajectory entry -> an Episode with frames relative to root; DatasetError naming what is wrong."""
    episode_id = str(entry["id"])
    name = entry["video"].split("/")[1]
    rel_dir = f"images/{name}/rgb"
    directory = os.path.join(root, "images", name, "rgb")
    if not os.path.isdir(directory):
        raise DatasetError(f"episode {episode_id} ({path}): no frame folder {directory}", episode=episode_id, path=directory)
    stats = [s for s in file_stats(directory) if s[0].endswith(".jpg")]
    names = frame_order([s[0] for s in stats])
    if not names:
        raise DatasetError(f"episode {episode_id} has no frames: no *.jpg files in {directory}", episode=episode_id, path=directory)
    actions = entry["actions"]
    if len(actions) < len(names):
        raise DatasetError(
            f"episode {episode_id} ({path}): {len(names)} frames in {directory} but only {len(actions)} actions "
            "(step i's answer is actions[i + 1])",
            episode=episode_id,
            path=path,
        )
    targets = []
    for i in range(len(names) - 1):
        value = actions[i + 1]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(ACTIONS):
            raise DatasetError(
                f"episode {episode_id} ({path}): actions[{i + 1}] = {value!r} is no action id 0..3 "
                f"({', '.join(ACTIONS)})",
                episode=episode_id,
                path=path,
            )
        targets.append(Targets(ACTIONS[value]))
    targets.append(Targets("STOP"))
    instruction = entry["instructions"][0]
    if not instruction.strip():
        raise DatasetError(f"episode {episode_id} ({path}): instructions[0] is empty", episode=episode_id, path=path)
    content = json.dumps(entry, sort_keys=True)
    return Episode(
        episode_id=episode_id,
        instruction=instruction,
        frames=[f"{rel_dir}/{n}" for n in names],
        targets=targets,
        source_format=FORMAT,
        fingerprint=stats_digest([*stats, ("<entry>", len(content), hash_text(content))]),
    )


def read_scalevln_episode_safely(job: tuple) -> tuple[str, Episode | None, tuple[str, str] | None]:
    """(episode id, Episode or None, (path, why) or None) for a worker pool; job = scalevln_jobs' tuple."""
    root, episode_id, entry, problem, path = job
    if problem is not None:
        return episode_id, None, (path, problem)
    try:
        return episode_id, read_scalevln_episode(root, entry, path), None
    except DatasetError as exc:
        return episode_id, None, (exc.path or path, str(exc))
    except OSError as exc:
        where = exc.filename or root
        return episode_id, None, (where, f"episode {episode_id}: cannot read {where}: {exc.strerror or exc}")


def scalevln_jobs(root: str, path: str, data: list | None = None) -> list[tuple]:
    """(root, episode id, entry, problem, path) per trajectory id, sorted by id; a malformed or duplicated
    entry gets its problem instead, so that dataset.on_error decides about it like any other episode.
    `data`: the file's JSON list when the caller has read it already."""
    entries = load_scalevln_entries(path) if data is None else data
    by_id: dict[str, list[tuple[int, dict]]] = {}
    problems: dict[str, str] = {}
    for position, entry in enumerate(entries):
        problem = _entry_problem(entry, position)
        if problem is not None:
            key = str(entry["id"]) if isinstance(entry, dict) and "id" in entry else f"<entry {position}>"
            problems.setdefault(key, f"{path}: {problem}")
            continue
        by_id.setdefault(str(entry["id"]), []).append((position, entry))
    for episode_id, found in by_id.items():
        if len(found) > 1:
            where = ", ".join(str(p) for p, _ in found)
            problems.setdefault(episode_id, f"{path}: id {episode_id} is used by entries {where}")
    return [
        (root, e, None if e in problems else by_id[e][0][1], problems.get(e), path)
        for e in sorted(set(by_id) | set(problems))
    ]
