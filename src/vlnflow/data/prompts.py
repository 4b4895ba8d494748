"""The human and assistant turns of a JanusVLN sample, built and parsed in one place.

Two wordings exist in the reference code and both are reproduced exactly:
- "action": JanusVLN's create_data step (the published recipe); the answer is the
  bare action name.
- "descriptions": the seed's episode loader; the answer is four lines
  SUBINSTRUCTION / 2D_DESCRIPTION / 3D_DESCRIPTION / ACTION.
Both have one `<image>` placeholder per frame: len(frames)-1 history images, then
the current one. The index stores the built turns so that the model code can make
chat prompts from them, and the annotations reader parses them back, which is why
building and parsing live together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
PROMPT_STYLES = ("auto", "action", "descriptions")

_PREAMBLE = (
    "You are a visual language navigation model, and your should go to the locations to complete the given task. "
    "Compare the observation and instruction to infer your current progress, and then select the correct direction "
    "from the candidates to go to the target location and finish the task."
)

_ACTION_TEMPLATE = (
    _PREAMBLE
    + "\n This is your historical observation:{history}\n This is your current observation:"
    + IMAGE_PLACEHOLDER
    + "\n Your task is to {instruction}\n You should take one of the following actions:\n MOVE_FORWARD\n TURN_LEFT\n"
    " TURN_RIGHT\n STOP."
)

_DESCRIPTIONS_TEMPLATE = (
    _PREAMBLE
    + "\nThis is your historical observation:{history}\nThis is your current observation:"
    + IMAGE_PLACEHOLDER
    + "\nYour task is to {instruction}\nFirst, predict the subinstruction for the current view. Then describe the view"
    " in 2D and 3D. Finally, choose one of the following actions:\nMOVE_FORWARD\nTURN_LEFT\nTURN_RIGHT\nSTOP.\n"
    "Respond in the following format:\nSUBINSTRUCTION: ...\n2D_DESCRIPTION: ...\n3D_DESCRIPTION: ...\nACTION: ..."
)

_INSTRUCTION = re.compile(r"Your task is to (.*?)\n ?(?:You should take one|First, predict)", re.DOTALL)
_STRUCTURED_ANSWER = re.compile(
    r"^SUBINSTRUCTION: (.*)\n2D_DESCRIPTION: (.*)\n3D_DESCRIPTION: (.*)\nACTION: (.*)$", re.DOTALL
)


@dataclass(frozen=True)
class Targets:
    """What a sample teaches: the action, plus the seed's optional per-frame descriptions."""

    action: str
    sub_instruction: str | None = None
    description_2d: str | None = None
    description_3d: str | None = None

    @property
    def has_descriptions(self) -> bool:
        return bool(self.sub_instruction and self.description_2d and self.description_3d)


def resolve_style(style: str, targets: Targets) -> str:
    """'auto' picks 'descriptions' when the sample has all three descriptions, else 'action'."""
    if style == "auto":
        return "descriptions" if targets.has_descriptions else "action"
    if style == "descriptions" and not targets.has_descriptions:
        raise ValueError(
            "dataset.prompt_style is 'descriptions' but the sample lacks a sub-instruction or 2D/3D description"
        )
    if style not in PROMPT_STYLES:
        raise ValueError(f"dataset.prompt_style must be one of {PROMPT_STYLES}, got {style!r}")
    return style


def build_prompt(instruction: str, n_frames: int, style: str) -> str:
    """The human turn for a sample with n_frames images (the last one is the current view)."""
    if n_frames < 1:
        raise ValueError("a sample needs at least one frame")
    template = _ACTION_TEMPLATE if style == "action" else _DESCRIPTIONS_TEMPLATE
    return template.format(history=IMAGE_PLACEHOLDER * (n_frames - 1), instruction=instruction)


def build_answer(targets: Targets, style: str) -> str:
    """The assistant turn: the action, or the seed's four-line structured answer."""
    if style == "action":
        return targets.action
    return (
        f"SUBINSTRUCTION: {targets.sub_instruction}\n2D_DESCRIPTION: {targets.description_2d}\n"
        f"3D_DESCRIPTION: {targets.description_3d}\nACTION: {targets.action}"
    )


def parse_instruction(prompt: str) -> str | None:
    """The instruction inside a human turn of either wording, or None when absent."""
    match = _INSTRUCTION.search(prompt)
    return match.group(1).strip() if match else None


def parse_answer(answer: str) -> tuple[str, str | None, str | None, str | None]:
    """(raw action, sub-instruction, 2D description, 3D description) from an assistant turn."""
    match = _STRUCTURED_ANSWER.match(answer.strip())
    if match is None:
        return answer.strip(), None, None, None
    sub, d2, d3, action = (part.strip() for part in match.groups())
    return action, sub, d2, d3


def structured_answer_spans(answer: str) -> list[int] | None:
    """Where the four markers of a structured answer start (character offsets into `answer`, in the order
    SUBINSTRUCTION, 2D_DESCRIPTION, 3D_DESCRIPTION, ACTION); None for any other answer.

    The same match as parse_answer: the markers are the starts of the answer's four lines, so text inside a
    line that looks like a marker ("... ACTION: ...") does not start a segment.
    """
    lead = len(answer) - len(answer.lstrip())
    match = _STRUCTURED_ANSWER.match(answer.strip())
    if match is None:
        return None
    markers = ("SUBINSTRUCTION: ", "2D_DESCRIPTION: ", "3D_DESCRIPTION: ", "ACTION: ")
    return [lead + match.start(i + 1) - len(marker) for i, marker in enumerate(markers)]
