"""Which part of the seed's four-part answer each label token belongs to, and which action a sample teaches.

The seed pipeline (data/vln_data.py) splits the assistant's answer

    SUBINSTRUCTION: ...\\n2D_DESCRIPTION: ...\\n3D_DESCRIPTION: ...\\nACTION: ...

into segments 1-4. A segment runs from its marker's first token up to the next marker, so the
newline that ends a line belongs to that line's segment, and the last segment (ACTION) runs to
the end of the labels. The seed weights each segment's text by `subinstruction_weight`,
`desc2d_weight`, `desc3d_weight`, `action_weight` and gives the label tokens after the answer
text (`<|im_end|>\\n`) its fallback weight 1.0 while logging them with ACTION. Here those closing
tokens get segment id CLOSING (0): weight 1.0, counted in `loss_action` (vlnflow.model.objective).

Where the seed finds a marker by searching the label tokens for the marker's tokens after the
previous marker (so a description holding the text "ACTION:" would start the ACTION segment
inside it), the markers here are the line starts of the four-line answer, the places
vlnflow.data.prompts builds them: every answer gets the segments its lines give it. On answers
without marker-like text inside the lines both give the same ids (tests/test_objective.py runs
the seed's search). An answer that is not the four-line structure (upstream JanusVLN's action
word) is one segment, ACTION.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlnflow.data.prompts import parse_answer, structured_answer_spans
from vlnflow.data.vocabulary import ACTIONS, canonical_action
from vlnflow.errors import DatasetError

SEGMENTS = ("subinstruction", "2d", "3d", "action")  # ids 1-4; the seed's log keys are loss_<name>
CLOSING = 0  # label tokens after the answer text: weight 1.0, logged with the last segment (ACTION)
ACTION_SEGMENT = SEGMENTS.index("action") + 1
CHAT_END = "<|im_end|>\n"  # what follows the answer in the labels (vlnflow.model.chat)


def answer_segments(tokenizer, answer: str, label_ids: Sequence[int]) -> list[int]:
    """The segment id (CLOSING or 1-4) of each label token of `answer`.

    `label_ids` are the sample's label tokens in order: the answer followed by `<|im_end|>\\n`,
    tokenised together (vlnflow.model.chat.tokenize_conversation). Each token belongs to the
    segment its first character falls in.
    """
    text = answer + CHAT_END
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(label_ids):
        raise ValueError("the answer's label tokens differ from the answer tokenised again: cannot place its segments")
    starts = structured_answer_spans(answer)
    out = []
    for begin, _ in encoded["offset_mapping"]:
        if begin >= len(answer):
            out.append(CLOSING)
        elif starts is None:  # not the four-part answer: one segment, the action
            out.append(ACTION_SEGMENT)
        else:  # the last marker at or before the token (leading blanks go with the first line)
            out.append(max(1, sum(1 for s in starts if s <= begin)))
    return out


def action_id(row: Mapping[str, Any], answer: str) -> int:
    """The sample's action as the seed's head label: STOP 0, MOVE_FORWARD 1, TURN_LEFT 2, TURN_RIGHT 3.

    From the row's `action` (the index writes it canonical), else the answer's ACTION; a sample
    with neither is an error naming it.
    """
    for value in (row.get("action"), parse_answer(answer)[0]):
        if isinstance(value, (str, int)):
            try:
                return ACTIONS.index(canonical_action(value))
            except ValueError:
                continue
    raise DatasetError(
        f"sample {row.get('sample_id')!r}: action {row.get('action')!r} is not one of {', '.join(ACTIONS)} "
        f"(nor is the answer's ACTION): the action head has no label for it", episode=row.get("episode_id"),
    )
