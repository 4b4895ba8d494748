"""An episode as both input formats read it, and the sample rows it expands to.

Readers (episode directories, annotations JSON) produce `Episode`s; everything after
that, history sampling, prompt/answer text and sample ids, is shared, so the same
trajectory yields identical samples whichever format it came in.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlnflow.data.history import cached_history_indices
from vlnflow.data.prompts import Targets, build_answer, build_prompt, resolve_style

SAMPLE_COLUMNS = (
    "sample_id",
    "episode_id",
    "step",
    "frames",
    "instruction",
    "action",
    "prompt",
    "answer",
    "sub_instruction",
    "description_2d",
    "description_3d",
    "source_format",
)


@dataclass
class Episode:
    """One trajectory: its frames in step order (POSIX paths relative to dataset.root) and per-step targets."""

    episode_id: str
    instruction: str
    frames: list[str]
    targets: list[Targets]
    source_format: str
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.targets):
            raise ValueError(f"episode {self.episode_id}: {len(self.frames)} frames but {len(self.targets)} targets")


def sample_id(episode_id: str, step: int) -> str:
    """Stable key of a sample, used by the cache and training: '<episode_id>/<step:05d>'."""
    return f"{episode_id}/{step:05d}"


def append_samples(episode: Episode, columns: dict[str, list], max_frames: int, pad: str, prompt_style: str) -> int:
    """Append one row per step of `episode` to `columns` (lists keyed by SAMPLE_COLUMNS); return the count."""
    frames = episode.frames
    styles = []
    for step, targets in enumerate(episode.targets):  # validate all before appending anything
        try:
            styles.append(resolve_style(prompt_style, targets))
        except ValueError as exc:
            raise ValueError(f"sample {sample_id(episode.episode_id, step)}: {exc}") from None
    for step, (targets, style) in enumerate(zip(episode.targets, styles)):
        sampled = [frames[i] for i in cached_history_indices(step, max_frames, pad)]
        columns["sample_id"].append(sample_id(episode.episode_id, step))
        columns["episode_id"].append(episode.episode_id)
        columns["step"].append(step)
        columns["frames"].append(sampled)
        columns["instruction"].append(episode.instruction)
        columns["action"].append(targets.action)
        columns["prompt"].append(build_prompt(episode.instruction, len(sampled), style))
        columns["answer"].append(build_answer(targets, style))
        columns["sub_instruction"].append(targets.sub_instruction)
        columns["description_2d"].append(targets.description_2d)
        columns["description_3d"].append(targets.description_3d)
        columns["source_format"].append(episode.source_format)
    return len(episode.targets)


def empty_columns() -> dict[str, list]:
    return {name: [] for name in SAMPLE_COLUMNS}
