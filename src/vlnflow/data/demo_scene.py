"""A tiny deterministic 'indoor walk' for the demo data set: plan, pose and rendered frames.

Each episode is a room with coloured landmarks (doors, boxes, plants, paintings)
on a floor plane; the agent moves 0.25 m per MOVE_FORWARD and turns 15 degrees per
TURN_LEFT/TURN_RIGHT, as VLN-CE does. Frames are perspective renderings of what
it sees, so they have real structure that changes with every action, and the
per-step descriptions are computed from the same geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

STEP_METRES = 0.25
TURN_DEGREES = 15.0
FOV_DEGREES = 90.0

KINDS = ("door", "box", "plant", "painting", "cabinet")
COLOURS = {
    "red": (200, 50, 45),
    "green": (60, 160, 70),
    "blue": (50, 90, 200),
    "yellow": (230, 200, 50),
    "purple": (140, 70, 170),
    "orange": (235, 140, 40),
    "white": (235, 235, 230),
    "brown": (130, 85, 50),
}
WALLS = ((205, 200, 185), (180, 195, 205), (210, 190, 170), (190, 205, 180))


@dataclass(frozen=True)
class Landmark:
    kind: str
    colour: str
    x: float  # metres, world frame (agent starts at 0,0 facing +y)
    y: float
    height: float
    width: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Pose:
    x: float
    y: float
    heading: float  # degrees, 0 = +y, positive = turned left


def plan_actions(rng: np.random.Generator, length: int) -> list[str]:
    """length actions ending in STOP, made of forward runs and turns (forward-biased like real paths)."""
    actions: list[str] = []
    while len(actions) < length - 1:
        roll = rng.random()
        if roll < 0.55:
            actions += ["MOVE_FORWARD"] * int(rng.integers(2, 7))
        else:
            actions += ["TURN_LEFT" if roll < 0.78 else "TURN_RIGHT"] * int(rng.integers(1, 5))
    return actions[: length - 1] + ["STOP"]


def poses(actions: list[str]) -> list[Pose]:
    """The pose at which each frame is taken (before its action is executed)."""
    pose, out = Pose(0.0, 0.0, 0.0), []
    for action in actions:
        out.append(pose)
        if action == "MOVE_FORWARD":
            rad = math.radians(pose.heading)
            pose = Pose(pose.x - STEP_METRES * math.sin(rad), pose.y + STEP_METRES * math.cos(rad), pose.heading)
        elif action == "TURN_LEFT":
            pose = Pose(pose.x, pose.y, pose.heading + TURN_DEGREES)
        elif action == "TURN_RIGHT":
            pose = Pose(pose.x, pose.y, pose.heading - TURN_DEGREES)
    return out


def place_landmarks(rng: np.random.Generator, count: int = 7) -> list[Landmark]:
    """Landmarks scattered around the start, mostly ahead, at 1.5-7 m."""
    names = list(COLOURS)
    out = []
    for _ in range(count):
        bearing = math.radians(rng.uniform(-60, 60) if rng.random() < 0.7 else rng.uniform(-170, 170))
        dist = rng.uniform(1.5, 7.0)
        kind = KINDS[int(rng.integers(len(KINDS)))]
        height = {"door": 2.0, "box": 0.6, "plant": 1.1, "painting": 0.8, "cabinet": 1.4}[kind]
        out.append(
            Landmark(
                kind,
                names[int(rng.integers(len(names)))],
                -dist * math.sin(bearing),
                dist * math.cos(bearing),
                height,
                float(rng.uniform(0.5, 1.1)),
            )
        )
    return out


def relative(pose: Pose, mark: Landmark) -> tuple[float, float]:
    """(distance in metres, bearing in degrees, positive = to the left) of a landmark seen from pose."""
    dx, dy = mark.x - pose.x, mark.y - pose.y
    dist = math.hypot(dx, dy)
    bearing = math.degrees(math.atan2(-dx, dy)) - pose.heading
    bearing = (bearing + 180.0) % 360.0 - 180.0
    return dist, bearing


def visible(pose: Pose, marks: list[Landmark]) -> list[tuple[float, float, Landmark]]:
    """Landmarks in the field of view, nearest first."""
    seen = []
    for mark in marks:
        dist, bearing = relative(pose, mark)
        if abs(bearing) < FOV_DEGREES / 2 and dist > 0.3:
            seen.append((dist, bearing, mark))
    return sorted(seen, key=lambda s: s[0])


def describe(pose: Pose, marks: list[Landmark], wall: str) -> tuple[str, str]:
    """(landmark_description, spatial_description) of the view, from the scene geometry."""
    seen = visible(pose, marks)
    if not seen:
        return (
            f"A plain {wall} wall fills the view; no landmark is in sight.",
            "Open floor ahead with the nearest wall about three metres away.",
        )
    names = [f"{'an' if m.colour[0] in 'aeiou' else 'a'} {m.name}" for _, _, m in seen[:3]]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
    landmark = f"{listed[0].upper()}{listed[1:]} {'is' if len(names) == 1 else 'are'} visible against the {wall} wall."
    dist, bearing, mark = seen[0]
    side = (
        "straight ahead"
        if abs(bearing) < 5
        else f"{abs(bearing):.0f} degrees to the {'left' if bearing > 0 else 'right'}"
    )
    spatial = f"The {mark.name} is about {dist:.1f} m away, {side}; it is {mark.height:.1f} m tall."
    return landmark, spatial


def render(
    pose: Pose, marks: list[Landmark], wall_rgb: tuple[int, int, int], size: tuple[int, int], label: str
) -> Image.Image:
    """Perspective view from pose: ceiling, floor with moving tiles, landmarks far to near, a caption."""
    w, h = size
    image = Image.new("RGB", size, wall_rgb)
    draw = ImageDraw.Draw(image)
    horizon = h // 2
    focal = (w / 2) / math.tan(math.radians(FOV_DEGREES / 2))
    eye = 1.5  # camera height in metres
    draw.rectangle([0, 0, w, horizon - h // 6], fill=tuple(int(c * 0.8) for c in wall_rgb))
    draw.rectangle([0, horizon, w, h], fill=(120, 110, 100))
    travelled = math.hypot(pose.x, pose.y)
    for k in range(1, 30):  # floor tile lines that slide towards the camera as the agent walks
        dist = k * 0.5 - (travelled % 0.5)
        if dist <= 0.2:
            continue
        y = horizon + focal * eye / dist
        if y < h:
            draw.line([0, y, w, y], fill=(95, 85, 80), width=max(1, w // 320))
    shift = ((pose.heading + 180.0) % 360.0 - 180.0) / 45.0 * w / 8  # rays swing as the agent turns
    for k in range(-8, 9):  # floor rays from the vanishing point, rotating with the heading
        x_far = w / 2 + k * w / 16 + shift
        draw.line([w / 2, horizon, x_far + k * w / 4, h], fill=(100, 92, 85), width=max(1, w // 320))
    for dist, bearing, mark in reversed(visible(pose, marks)):
        cx = w / 2 - math.tan(math.radians(bearing)) * focal
        scale = focal / max(dist, 0.3)
        half = mark.width * scale / 2
        top, bottom = horizon + (eye - mark.height) * scale, horizon + eye * scale
        rgb = COLOURS[mark.colour]
        draw.rectangle([cx - half, top, cx + half, bottom], fill=rgb, outline=(30, 30, 30), width=max(1, w // 320))
        if mark.kind == "door":
            draw.ellipse(
                [cx + half * 0.6, (top + bottom) / 2, cx + half * 0.75, (top + bottom) / 2 + half * 0.15],
                fill=(40, 40, 40),
            )
        elif mark.kind == "painting":
            draw.rectangle(
                [cx - half * 0.7, top + (bottom - top) * 0.15, cx + half * 0.7, top + (bottom - top) * 0.5],
                fill=(250, 250, 240),
            )
        elif mark.kind == "plant":
            draw.ellipse([cx - half * 1.3, top - half, cx + half * 1.3, top + half * 1.2], fill=(40, 130, 60))
        elif mark.kind == "box":
            draw.line([cx - half, top, cx + half, bottom], fill=(30, 30, 30), width=max(1, w // 320))
    draw.text((4, 4), label, fill=(20, 20, 20))
    return image
