"""Reader for JanusVLN annotations: a JSON list (or JSON lines) of {id, conversations, images}.

JanusVLN's create_data step writes one entry per step with id '<episode>/<frame file>',
the history frames plus the current one in `images` (current last), a human turn
holding the instruction and a gpt turn holding the answer. The seed's variant may
instead carry instruction / subinstruction / 2D_description / 3D_description /
action fields. Entries are grouped back into episodes: the current frames of an
episode's entries, ordered by step, are its frames, so history sampling is redone
with this workflow's settings and matches the episode-directory format exactly.
Image paths are relative to dataset.root unless absolute.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from vlnflow.data.episode_dirs import load_json
from vlnflow.data.fingerprint import stats_digest
from vlnflow.data.prompts import Targets, parse_answer, parse_instruction
from vlnflow.data.records import Episode
from vlnflow.data.vocabulary import canonical_action, parse_step_filename
from vlnflow.errors import DatasetError


@dataclass
class Entry:
    """One annotation entry, with where it sits in the file for error messages."""

    position: int
    data: dict

    @property
    def label(self) -> str:
        return f"entry {self.position} (id {self.data.get('id')!r})"


def load_entries(path: str, data: list | None = None) -> list[Entry]:
    """All entries of an annotations .json (a list) or .jsonl file; DatasetError naming the file or line.
    `data`: the file's JSON list when the caller has read it already."""
    if data is not None:
        entries = [Entry(i, item) for i, item in enumerate(data)]
    elif not os.path.isfile(path):
        raise DatasetError(f"annotations file not found: {path} (dataset.annotations)", path=path)
    elif path.endswith(".jsonl"):
        entries = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entries.append(Entry(lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"unparseable JSON in {path} line {lineno}: {exc.msg}", path=path) from None
    else:
        data = load_json(path)
        if not isinstance(data, list):
            raise DatasetError(f"annotations file {path} must hold a JSON list of entries", path=path)
        entries = [Entry(i, item) for i, item in enumerate(data)]
    for entry in entries:
        if not isinstance(entry.data, dict) or not isinstance(entry.data.get("id"), str) or "/" not in entry.data["id"]:
            raise DatasetError(f"{path}: {entry.label} needs a string id '<episode_id>/<frame>'", path=path)
    return entries


def group_by_episode(entries: list[Entry]) -> dict[str, list[Entry]]:
    """Entries per episode id (the id up to its last '/'), in file order."""
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.data["id"].rsplit("/", 1)[0], []).append(entry)
    return groups


def _first(data: dict, keys: tuple[str, ...]):
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None


def _text(value) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    return str(value).strip() or None


def _images(entry: Entry, path: str, episode: str) -> list[str]:
    data = entry.data
    images = _first(data, ("images", "image"))
    if images is None and "current_image" in data:
        images = list(data.get("history_images") or []) + [data["current_image"]]
    if isinstance(images, str):
        images = [images]
    if not images or not all(isinstance(i, str) for i in images):
        raise DatasetError(f"{path}: {entry.label} of episode {episode} has no image list", episode=episode, path=path)
    return images


def _turns(entry: Entry) -> tuple[str | None, str | None]:
    human = gpt = None
    for turn in entry.data.get("conversations") or []:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role in ("human", "user") and human is None:
            human = value
        elif role in ("gpt", "assistant") and gpt is None:
            gpt = value
    return human, gpt


def _entry_fields(entry: Entry, path: str, episode: str) -> tuple[str, Targets]:
    """(instruction, targets) of an entry, from explicit fields or parsed from its conversation."""
    data = entry.data
    human, gpt = _turns(entry)
    instruction = _text(_first(data, ("instruction", "instruction_text", "full_instruction")))
    if instruction is None and isinstance(human, str):
        instruction = parse_instruction(human)
    if not instruction:
        raise DatasetError(f"{path}: {entry.label} of episode {episode} has no instruction", episode=episode, path=path)
    raw_action = _first(data, ("action", "action_label"))
    sub = _text(_first(data, ("subinstruction", "sub_instruction", "sub_instruction_text")))
    d2 = _text(_first(data, ("2D_description", "2d_description", "description_2d")))
    d3 = _text(_first(data, ("3D_description", "3d_description", "description_3d")))
    if raw_action is None:
        if not isinstance(gpt, str):
            raise DatasetError(
                f"{path}: {entry.label} of episode {episode} has no answer turn", episode=episode, path=path
            )
        raw_action, p_sub, p_d2, p_d3 = parse_answer(gpt)
        sub, d2, d3 = sub or p_sub, d2 or p_d2, d3 or p_d3
    try:
        action = canonical_action(raw_action)
    except ValueError as exc:
        raise DatasetError(f"{path}: {entry.label} of episode {episode}: {exc}", episode=episode, path=path) from None
    return instruction, Targets(action, sub, d2, d3)


def _relative(image: str, root: str) -> str:
    rel = os.path.relpath(image, root) if os.path.isabs(image) else os.path.normpath(image)
    return rel.replace(os.sep, "/")


class _Step(NamedTuple):
    order: int | None  # step index parsed from the current frame's name, if it has one
    entry: Entry
    frame: str
    instruction: str
    targets: Targets


def read_annotation_episode(episode: str, entries: list[Entry], root: str, path: str) -> Episode:
    """Rebuild one episode from its entries; checks that every referenced image exists."""
    steps: list[_Step] = []
    referenced: set[str] = set()
    for entry in entries:
        images = [_relative(i, root) for i in _images(entry, path, episode)]
        referenced.update(images)
        instruction, targets = _entry_fields(entry, path, episode)
        parsed = parse_step_filename(os.path.basename(images[-1]))
        steps.append(_Step(parsed[0] if parsed else None, entry, images[-1], instruction, targets))
    if all(s.order is not None for s in steps):  # else keep file order
        steps.sort(key=lambda s: s.order)
        orders = [s.order for s in steps]
        if len(set(orders)) != len(orders):
            dup = next(k for k in orders if orders.count(k) > 1)
            raise DatasetError(f"{path}: episode {episode} has two entries for step {dup}", episode=episode, path=path)
    frames = [s.frame for s in steps]
    frame_set = set(frames)
    if len(frame_set) != len(frames):
        raise DatasetError(
            f"{path}: episode {episode} has two entries with the same current image", episode=episode, path=path
        )
    stray = sorted(referenced - frame_set)
    if stray:
        raise DatasetError(
            f"{path}: episode {episode} references {stray[0]} as history, but no entry of the episode has it as its "
            "current image (steps missing from the annotations?)",
            episode=episode,
            path=path,
        )
    if len({s.instruction for s in steps}) > 1:
        raise DatasetError(
            f"{path}: entries of episode {episode} disagree on the instruction", episode=episode, path=path
        )
    stats = []
    for frame in frames:
        full = os.path.join(root, frame)
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise DatasetError(
                f"image referenced but missing: {full} (episode {episode}, in {path})", episode=episode, path=full
            ) from None
        stats.append((frame, st.st_size, st.st_mtime_ns))
    content = json.dumps([s.entry.data for s in steps], sort_keys=True)
    stats.append(("<entries>", len(content), hash_text(content)))
    return Episode(
        episode_id=episode,
        instruction=steps[0].instruction,
        frames=frames,
        targets=[s.targets for s in steps],
        source_format="annotations",
        fingerprint=stats_digest(stats),
    )


def hash_text(text: str) -> int:
    """A stable 64-bit integer digest of text (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def iter_annotation_episodes(path: str, root: str) -> Iterator[tuple[str, Episode | DatasetError]]:
    """(episode id, Episode or DatasetError) per episode, sorted by id; bad episodes do not stop the others."""
    groups = group_by_episode(load_entries(path))
    for episode in sorted(groups):
        yield episode, read_annotation_episode_safely(episode, groups[episode], root, path)


def read_annotation_episode_safely(episode: str, entries: list[Entry], root: str, path: str) -> Episode | DatasetError:
    try:
        return read_annotation_episode(episode, entries, root, path)
    except DatasetError as exc:
        return exc
