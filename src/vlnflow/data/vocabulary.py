"""The JanusVLN action vocabulary and the episode file naming it is read from.

JanusVLN trains on four discrete actions; integer actions in VLN-CE annotations map
to them in the order STOP, MOVE_FORWARD, TURN_LEFT, TURN_RIGHT. Episode directories
name every frame `step_<idx>_<ACTION>.<ext>`, the action being the one taken at that
frame (STOP on the last frame).
"""

from __future__ import annotations

import re

ACTIONS: tuple[str, ...] = ("STOP", "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")
"""Canonical action names; the position is the VLN-CE integer action id."""

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

STEP_FILE = re.compile(r"^step_(\d+)_([A-Za-z_]+)\.(png|jpg|jpeg|json)$", re.IGNORECASE)


def canonical_action(value: object) -> str:
    """Return the canonical upper-case action for a name or VLN-CE integer id; ValueError if unknown."""
    if isinstance(value, bool):  # bool is an int subclass; never a valid action
        raise ValueError(f"unknown action {value!r} (expected one of {', '.join(ACTIONS)})")
    if isinstance(value, int):
        if 0 <= value < len(ACTIONS):
            return ACTIONS[value]
    elif isinstance(value, str):
        name = value.strip().upper()
        if name in ACTIONS:
            return name
    raise ValueError(f"unknown action {value!r} (expected one of {', '.join(ACTIONS)})")


def parse_step_filename(name: str) -> tuple[int, str, str] | None:
    """Split `step_<idx>_<ACTION>.<ext>` into (idx, raw action, lower-case ext); None for other names."""
    match = STEP_FILE.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2), match.group(3).lower()


def step_filename(idx: int, action: str, ext: str = "png") -> str:
    """The file name a frame of an episode directory gets (4-digit index, as JanusVLN data has it)."""
    return f"step_{idx:04d}_{action}.{ext}"
