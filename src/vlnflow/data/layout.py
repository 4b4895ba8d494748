"""Which input format a source's root holds, and where its annotations JSON (or VLN-CE episodes file) is.

`format: auto` looks at the top level of the root only: episode directories
(sub-directories with milestones_result.json) mean the episode format, a JSON file
means annotations; both at once is ambiguous and must be settled in config.yaml.
A VLN-CE episodes file (`vlnce_episodes`) means the vlnce format. Whether an
annotations JSON is create_data.py's per-step output or a ScaleVLN/DAgger
trajectory list is decided by its first entry when the index reads it.
"""

from __future__ import annotations

import os

from vlnflow.data.episode_dirs import MILESTONES
from vlnflow.errors import UserError

FORMATS = ("auto", "episodes", "annotations", "vlnce", "scalevln")
DEFAULT_ANNOTATIONS = "annotations.json"


def check_root(root: str) -> None:
    """UserError naming dataset.root when it is missing or not a directory."""
    if not os.path.exists(root):
        raise UserError(f"dataset.root: directory not found: {root}")
    if not os.path.isdir(root):
        raise UserError(f"dataset.root: not a directory: {root}")


def _top_level(root: str) -> tuple[list[str], list[str]]:
    jsons, dirs = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.name.endswith((".json", ".jsonl")) and entry.is_file():
                jsons.append(entry.name)
    return sorted(jsons), sorted(dirs)


def _annotations_in(root: str, jsons: list[str]) -> str:
    if DEFAULT_ANNOTATIONS in jsons:
        return os.path.join(root, DEFAULT_ANNOTATIONS)
    if len(jsons) == 1:
        return os.path.join(root, jsons[0])
    if not jsons:
        raise UserError(
            f"dataset.format is 'annotations' but {root} holds no annotations JSON; set dataset.annotations"
        )
    raise UserError(f"dataset.root {root} holds several JSON files ({', '.join(jsons)}); set dataset.annotations")


def detect_format(
    root: str, fmt: str = "auto", annotations: str | None = None, vlnce_episodes: str | None = None
) -> tuple[str, str | None]:
    """Return ('episodes', None), ('annotations' or 'scalevln', path of the JSON) or ('vlnce', path of the
    VLN-CE episodes file); UserError naming the setting otherwise ('annotations' may still turn out to be
    a ScaleVLN/DAgger list when read)."""
    check_root(root)
    if fmt not in FORMATS:
        raise UserError(f"dataset.format: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if vlnce_episodes or fmt == "vlnce":
        if fmt not in ("auto", "vlnce"):
            raise UserError(f"dataset.vlnce_episodes is set but dataset.format is {fmt!r}; set one or the other")
        if not vlnce_episodes:
            raise UserError("dataset.format is 'vlnce' but dataset.vlnce_episodes (VLN-CE's train.json.gz) is not set")
        if not os.path.isfile(vlnce_episodes):
            raise UserError(f"dataset.vlnce_episodes: file not found: {vlnce_episodes}")
        return "vlnce", vlnce_episodes
    if annotations:
        if fmt == "episodes":
            raise UserError("dataset.annotations is set but dataset.format is 'episodes'; set one or the other")
        path = annotations if os.path.isabs(annotations) else os.path.join(root, annotations)
        if not os.path.isfile(path):
            raise UserError(f"dataset.annotations: file not found: {path}")
        return ("scalevln" if fmt == "scalevln" else "annotations"), path
    if fmt == "episodes":
        return "episodes", None
    jsons, dirs = _top_level(root)
    if fmt in ("annotations", "scalevln"):
        return fmt, _annotations_in(root, jsons)
    has_episodes = any(os.path.isfile(os.path.join(root, d, MILESTONES)) for d in dirs)
    if jsons and has_episodes:
        raise UserError(
            f"dataset.root {root} holds both episode directories and {', '.join(jsons)}; "
            "set dataset.format to 'episodes' or 'annotations'"
        )
    if jsons:
        return "annotations", _annotations_in(root, jsons)
    if dirs:
        return "episodes", None
    raise UserError(f"dataset.root {root} holds neither episode directories nor an annotations JSON")
