"""A sample row -> a ChatML conversation -> token ids with the prompt masked out of the labels.

The user turn is the row's `prompt` (one `<image>` per frame) and the assistant turn its
`answer`, verbatim: JanusVLN's action answer, or the seed's SUBINSTRUCTION / 2D / 3D /
ACTION lines for episodes that have the descriptions (built by vlnflow.data.prompts).

Like JanusVLN, the conversation is system ("You are a helpful assistant.") + user +
assistant in ChatML, and the loss covers the assistant's content and its
`<|im_end|>\\n`, not the `<|im_start|>assistant\\n` header.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from vlnflow.data.prompts import IMAGE_PLACEHOLDER, Targets, build_answer, build_prompt, parse_answer, resolve_style
from vlnflow.errors import DatasetError
from vlnflow.model.tiny import CHATML_TEMPLATE

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are a helpful assistant."
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
_RESERVED = ("<|im_start|>", "<|im_end|>", VISION_START, IMAGE_PAD, VISION_END, "<|video_pad|>")

TARGET_FIELDS = ("sub_instruction", "description_2d", "description_3d")


def _present(value: Any) -> bool:
    """False for None, NaN (a null read through pandas) and blank strings."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def conversation(row: Mapping[str, Any], n_frames: int) -> tuple[str, str]:
    """(user prompt with one `<image>` per frame, assistant answer) for one samples.parquet row.

    The index stores both turns (`prompt`, `answer`, built by vlnflow.data.prompts); a row
    without them gets them built here by the same code from its fields ("auto" style:
    the structured answer when all descriptions are present, else the action).

    A sample whose answer is not the seed's four-part structure is upstream JanusVLN's data, and
    upstream's loader (`data_qwen.py` _get_item) joins every `<image>` with the line after it
    (`"<image>\n"` -> `"<image>"`) before tokenising: so does this. The seed's loader keeps the
    newlines of its structured prompts.
    """
    sample = row.get("sample_id")
    if _present(row.get("prompt")) and _present(row.get("answer")):
        prompt, answer = str(row["prompt"]), str(row["answer"])
    else:
        if not _present(row.get("action")) or not _present(row.get("instruction")):
            raise DatasetError(
                f"sample {sample!r}: no prompt/answer text and no instruction/action to build them from",
                episode=row.get("episode_id"),
            )
        fields = {k: str(row[k]).strip() if _present(row.get(k)) else None for k in TARGET_FIELDS}
        targets = Targets(action=str(row["action"]).strip(), **fields)
        style = resolve_style("auto", targets)
        prompt = build_prompt(str(row["instruction"]).strip(), n_frames, style)
        answer = build_answer(targets, style)
    if parse_answer(answer)[1] is None:
        prompt = prompt.replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER)
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != n_frames:
        raise DatasetError(
            f"sample {sample!r}: prompt has {found} {IMAGE_PLACEHOLDER} placeholders but the sample has {n_frames} frames",
            episode=row.get("episode_id"),
        )
    for text in (prompt, answer):
        for token in _RESERVED:
            if token in text:
                raise DatasetError(
                    f"sample {sample!r}: text contains the reserved token {token}", episode=row.get("episode_id")
                )
    return prompt, answer


def tokenize_conversation(
    tokenizer, prompt: str, answer: str, image_token_counts: Sequence[int]
) -> tuple[list[int], list[int]]:
    """ChatML-tokenise; each `<image>` becomes vision_start + n x image_pad + vision_end.

    Returns (input_ids, labels) with labels = IGNORE_INDEX over the system/user turns
    and the assistant header.
    """
    user = prompt.replace(IMAGE_PLACEHOLDER, VISION_START + IMAGE_PAD + VISION_END)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    prompt_text = tokenizer.apply_chat_template(
        messages, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    prompt_ids = _expand_image_pads(
        tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        image_token_counts,
    )
    answer_ids = tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)


def _expand_image_pads(ids: list[int], pad_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the i-th single image_pad id by counts[i] copies (same ids as tokenising the long string)."""
    out: list[int] = []
    image = 0
    for token in ids:
        if token == pad_id:
            out.extend([pad_id] * counts[image])
            image += 1
        else:
            out.append(token)
    if image != len(counts):
        raise ValueError(f"prompt has {image} image placeholders for {len(counts)} images")
    return out
