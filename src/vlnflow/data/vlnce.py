"""Reader for JanusVLN's R2R-CE / RxR-CE trajectory folders, read as upstream's create_data.py reads them.

    <root>/<episode_id>/<prefix>_<idx>_<action>.png   one frame per step, e.g. step_12_move_forward.png
    <vlnce_episodes>                                  VLN-CE's train.json.gz (R2R) or train_guide.json.gz
                                                      (RxR): {"episodes": [{"episode_id", "instruction":
                                                      {"instruction_text"}}, ...]}

Upstream's process_episode_vlnce: the episodes come from the VLN-CE file, the frames of an episode are
every *.png in its folder, step i's answer is the action in frame i's name (the name's last `_` part, or
its last two when the name has more than three parts, upper-cased), and the instruction is
instruction_text stripped. One difference, on purpose: upstream orders the frames by file name
(sorted(glob)), which puts step_10 before step_2 when the step numbers are not zero-padded; vlnflow
orders them by the parsed step number, the time order upstream meant. With zero-padded names both
orders agree.

An episode of the VLN-CE file without a frame folder (or with an empty one) is an error under
dataset.on_error: fail and a skipped episode under skip; upstream yields no samples for it silently.
Folders that the VLN-CE file does not list are not read (upstream ignores them too).
"""

from __future__ import annotations

import gzip
import json
import os

from vlnflow.data.annotations import hash_text
from vlnflow.data.fingerprint import file_stats, stats_digest
from vlnflow.data.prompts import Targets
from vlnflow.data.records import Episode
from vlnflow.data.vocabulary import canonical_action
from vlnflow.errors import DatasetError

FORMAT = "vlnce"


def load_vlnce_episodes(path: str) -> dict[str, str]:
    """episode id (as a string, as upstream's folder names) -> stripped instruction text."""
    if not os.path.isfile(path):
        raise DatasetError(f"VLN-CE episodes file not found: {path} (vlnce_episodes)", path=path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read VLN-CE episodes file {path}: {exc}", path=path) from None
    episodes = data.get("episodes") if isinstance(data, dict) else None
    if not isinstance(episodes, list):
        raise DatasetError(f"{path}: expected a JSON object with an 'episodes' list (VLN-CE format)", path=path)
    out: dict[str, str] = {}
    for i, ep in enumerate(episodes):
        try:
            episode_id = str(ep["episode_id"])
            text = ep["instruction"]["instruction_text"]
        except (KeyError, TypeError):
            raise DatasetError(f"{path}: episodes[{i}] lacks episode_id or instruction.instruction_text", path=path) from None
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{path}: episode {episode_id} has an empty instruction_text", episode=episode_id, path=path)
        if episode_id in out:
            raise DatasetError(f"{path}: episode_id {episode_id} appears twice", episode=episode_id, path=path)
        out[episode_id] = text.strip()
    return out


def parse_frame_name(name: str) -> tuple[int, str] | None:
    """(step number, raw action) of a frame file name by create_data.py's rule; None when it has no step number.

    The action is the stem's last `_` part, or its last two joined by `_` when the stem has more than
    three parts; the step number is the part just before the action."""
    parts = os.path.splitext(name)[0].split("_")
    n_action = 2 if len(parts) > 3 else 1
    if len(parts) < n_action + 1 or not parts[-n_action - 1].isdigit():
        return None
    return int(parts[-n_action - 1]), "_".join(parts[-n_action:]).upper()


def read_vlnce_episode(root: str, episode_id: str, instruction: str) -> Episode:
    """One episode folder <root>/<episode_id>; frames relative to root; DatasetError naming what is wrong."""
    directory = os.path.join(root, episode_id)
    if not os.path.isdir(directory):
        raise DatasetError(f"episode {episode_id}: no frame folder {directory}", episode=episode_id, path=directory)
    stats = [s for s in file_stats(directory) if s[0].endswith(".png")]
    steps: dict[int, tuple[str, str]] = {}
    for fname, _, _ in stats:
        path = os.path.join(directory, fname)
        parsed = parse_frame_name(fname)
        if parsed is None:
            raise DatasetError(
                f"episode {episode_id}: frame file {path} is not named <prefix>_<step>_<action>.png", episode=episode_id, path=path
            )
        idx, raw_action = parsed
        try:
            action = canonical_action(raw_action)
        except ValueError:
            raise DatasetError(
                f"episode {episode_id}: unknown action {raw_action!r} in frame file {path} "
                "(expected MOVE_FORWARD, TURN_LEFT, TURN_RIGHT or STOP)",
                episode=episode_id,
                path=path,
            ) from None
        if idx in steps:
            raise DatasetError(
                f"episode {episode_id}: two frames with step number {idx}: {steps[idx][0]} and {fname}",
                episode=episode_id,
                path=directory,
            )
        steps[idx] = (fname, action)
    if not steps:
        raise DatasetError(f"episode {episode_id} has no frames: no *.png files in {directory}", episode=episode_id, path=directory)
    order = sorted(steps)
    return Episode(
        episode_id=episode_id,
        instruction=instruction,
        frames=[f"{episode_id}/{steps[i][0]}" for i in order],
        targets=[Targets(steps[i][1]) for i in order],
        source_format=FORMAT,
        fingerprint=stats_digest([*stats, ("<instruction>", len(instruction), hash_text(instruction))]),
    )


def read_vlnce_episode_safely(job: tuple[str, str, str]) -> tuple[str, Episode | None, tuple[str, str] | None]:
    """(episode id, Episode or None, (path, why) or None) for a worker pool."""
    root, episode_id, instruction = job
    try:
        return episode_id, read_vlnce_episode(root, episode_id, instruction), None
    except DatasetError as exc:
        return episode_id, None, (exc.path or os.path.join(root, episode_id), str(exc))
    except OSError as exc:
        path = exc.filename or os.path.join(root, episode_id)
        return episode_id, None, (path, f"episode {episode_id}: cannot read {path}: {exc.strerror or exc}")


def vlnce_jobs(root: str, episodes_file: str) -> list[tuple[str, str, str]]:
    """One (root, episode id, instruction) per episode of the VLN-CE file, sorted by id."""
    instructions = load_vlnce_episodes(episodes_file)
    return [(root, e, instructions[e]) for e in sorted(instructions)]
