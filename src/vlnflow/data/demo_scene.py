"""A tiny deterministic 'indoor walk' for the demo data set: the expert's plan, poses and rendered frames.

Each episode is a room with one coloured landmark (a door, box, plant, painting or cabinet) on a floor
plane, and the instruction names it: walk to it and stop next to it. The agent moves 0.25 m per
MOVE_FORWARD and turns 15 degrees per TURN_LEFT/TURN_RIGHT, as VLN-CE does; it starts with the landmark
0, 15 or 30 degrees off its heading, and now and then a forward step slips, ending 15 or 30 degrees
turned (`SLIP_PROBABILITY`). Every action is the expert's answer to the frame it is taken at
(`expert_action`): STOP once the landmark is within `STOP_RADIUS`, a turn towards it while it is more
than `TURN_DEGREES_THRESHOLD` off the view centre, else MOVE_FORWARD. So the action follows from where
the landmark is in the current frame, which the frames show and the text does not (the instruction is
the same for every step of an episode, and a slip can come at any step): a tiny model can learn it, and
a model that cannot see the frames cannot. Frames are perspective renderings of what the agent sees,
and the per-step descriptions are computed from the same geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

STEP_METRES = 0.25
TURN_DEGREES = 15.0
FOV_DEGREES = 90.0
STOP_RADIUS = 1.0  # metres: the expert stops once the landmark is closer than this
TURN_DEGREES_THRESHOLD = 8.0  # the expert turns while the landmark is further off the view centre (> 15 / 2: no dithering)
START_BEARINGS = (-30.0, -15.0, 0.0, 15.0, 30.0)  # where the landmark starts, off the heading: always in view
SLIP_PROBABILITY = 0.5  # chance that a forward step ends turned by one of SLIPS
SLIPS = (-30.0, -15.0, 15.0, 30.0)  # degrees; a multiple of the turn, so the expert can face the landmark again
MAX_START_METRES = 40.0  # far enough for R2R-CE-long walks (120 steps, --lengths r2r)

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
FOLIAGE = (40, 130, 60)  # a plant's leaves, drawn over its coloured pot
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


def expert_action(pose: Pose, target: Landmark) -> str:
    """What the expert does at `pose`: stop next to the target, turn towards it, or walk on."""
    dist, bearing = relative(pose, target)
    if dist < STOP_RADIUS:
        return "STOP"
    if abs(bearing) > TURN_DEGREES_THRESHOLD:
        return "TURN_LEFT" if bearing > 0 else "TURN_RIGHT"
    return "MOVE_FORWARD"


def advance(pose: Pose, action: str, slip: float = 0.0) -> Pose:
    """The pose after `action`; a forward step ends turned by `slip` degrees."""
    if action == "MOVE_FORWARD":
        rad = math.radians(pose.heading)
        return Pose(pose.x - STEP_METRES * math.sin(rad), pose.y + STEP_METRES * math.cos(rad), pose.heading + slip)
    if action == "TURN_LEFT":
        return Pose(pose.x, pose.y, pose.heading + TURN_DEGREES)
    if action == "TURN_RIGHT":
        return Pose(pose.x, pose.y, pose.heading - TURN_DEGREES)
    return pose


def walk(target: Landmark, slips: np.ndarray, max_steps: int) -> tuple[list[str], list[Pose]]:
    """The expert's actions from the start pose until STOP (or `max_steps`), and the pose of each frame;
    the k-th forward step slips by slips[k]."""
    pose, actions, poses_ = Pose(0.0, 0.0, 0.0), [], []
    forward = 0
    while len(actions) < max_steps:
        action = expert_action(pose, target)
        actions.append(action)
        poses_.append(pose)
        if action == "STOP":
            break
        slip = 0.0
        if action == "MOVE_FORWARD":
            slip, forward = float(slips[forward % len(slips)]), forward + 1
        pose = advance(pose, action, slip)
    return actions, poses_


def plan_episode(rng: np.random.Generator, length: int) -> tuple[Landmark, list[str], list[Pose]]:
    """A target landmark and the expert's `length` actions (the last one STOP) with the pose of each frame.

    The landmark's look, its start bearing and the slips are drawn; its distance is then the first one
    (scanned in 1 cm steps) at which the expert's walk takes exactly `length` steps.
    """
    if length < 1:
        raise ValueError(f"an episode needs at least one step, got {length}")
    for _ in range(100):
        look = _landmark_look(rng)
        rad = math.radians(START_BEARINGS[int(rng.integers(len(START_BEARINGS)))])
        slips = np.where(rng.random(length) < SLIP_PROBABILITY, rng.choice(SLIPS, size=length), 0.0)
        for dist in np.arange(0.3 if length == 1 else STOP_RADIUS, MAX_START_METRES, 0.01):
            target = Landmark(*look[:2], -dist * math.sin(rad), dist * math.cos(rad), *look[2:])
            actions, poses_ = walk(target, slips, length + 1)
            if len(actions) == length and actions[-1] == "STOP":
                return target, actions, poses_
            if len(actions) > length:
                break
    raise RuntimeError(f"no start distance gives an expert walk of {length} steps")


def _landmark_look(rng: np.random.Generator) -> tuple[str, str, float, float]:
    """(kind, colour, height, width) of a landmark."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    height = {"door": 2.0, "box": 1.0, "plant": 1.2, "painting": 1.1, "cabinet": 1.4}[kind]  # >= 1 m: in view at STOP_RADIUS
    return kind, colour, height, float(rng.uniform(0.7, 1.2))


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
            draw.ellipse([cx - half * 1.3, top - half, cx + half * 1.3, top + half * 1.2], fill=FOLIAGE)
        elif mark.kind == "box":
            draw.line([cx - half, top, cx + half, bottom], fill=(30, 30, 30), width=max(1, w // 320))
    draw.text((4, 4), label, fill=(20, 20, 20))
    return image
