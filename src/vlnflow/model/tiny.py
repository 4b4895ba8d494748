"""Qwen2.5-VL stand-ins built by code: a tiny random model for the demo and tests, and the
7B's real shape for random-init GPU benchmarks.

No download is needed: the tokenizer is a byte-level BPE trained here on a few lines
(same pre-tokenizer and special tokens as Qwen2, wrapped as transformers'
`Qwen2Tokenizer`), the image processor is the torchvision-free
`Qwen2VLImageProcessorPil`, and `write_tiny_checkpoint` saves all three so
`from_pretrained(dir)` loads them like a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Qwen2.5-VL's chat/vision special tokens, in the real vocabulary's order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ChatML, the format Qwen2.5 was trained on; the tiny tokenizer carries it so
# apply_chat_template works the same way on tiny and real tokenizers.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the tiny BPE is trained on: enough to give the navigation vocabulary short tokens.
_TRAINING_LINES = (
    "You are a helpful assistant.",
    "You are a visual language navigation model. Follow the instruction to reach the goal.",
    "These are your historical observations: and this is your current observation:",
    "Walk forward past the table, turn left at the door and stop next to the red chair.",
    "Go up the stairs, turn right into the bedroom and wait by the window.",
    "SUBINSTRUCTION: 2D_DESCRIPTION: 3D_DESCRIPTION: ACTION:",
    "MOVE_FORWARD TURN_LEFT TURN_RIGHT STOP The next action is",
    "a sofa, a lamp and a painting on the wall, about two meters ahead on the left.",
    "0123456789 .,:;!?'\"-()[]{}",
)

# Defaults of the tiny model (config `model.tiny` overrides): small but the same wiring as
# the real one: GQA, 3-section mRoPE, windowed + full-attention vision blocks.
TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 512,
    "text_hidden": 64,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 128,
    "vision_depth": 2,
    "vision_hidden": 32,
    "vision_heads": 2,
    "vision_intermediate": 60,
    "vision_window": 56,
    "vision_fullatt_blocks": [1],
    "initializer_range": 0.02,
}


def build_tiny_tokenizer(vocab_size: int = TINY_DEFAULTS["vocab_size"]) -> Qwen2Tokenizer:
    """A deterministic byte-level BPE with Qwen2's pre-tokenizer and special tokens.

    `vocab_size` bounds the learned vocabulary; the special tokens come after it.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TRAINING_LINES, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = 1 << 20
    return tokenizer


def build_image_processor(size: int | tuple[int, int], base: Qwen2VLImageProcessorPil | None = None) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image processor pinned to `size` = (height, width) (an int: a square), min_pixels = max_pixels.

    vlnflow hands it exactly that size (vlnflow.spatial.geometry.qwen_hw), so it never resizes. `base` (e.g. a
    real checkpoint's processor) keeps its normalisation; only the size is pinned.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height % 28 or width % 28 or height <= 0 or width <= 0:
        raise ValueError(
            f"Qwen image size {height}x{width}: both sides must be positive multiples of 28 (patch 14 x merge 2)"
        )
    kwargs = base.to_dict() if base is not None else {}
    for key in ("size", "min_pixels", "max_pixels", "image_processor_type", "processor_class"):
        kwargs.pop(key, None)
    return Qwen2VLImageProcessorPil(**kwargs, min_pixels=height * width, max_pixels=height * width)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Config token ids (image/video/vision start/end, eos, pad) taken from a tokenizer."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id and t != tokenizer.unk_token]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen2.5-VL special tokens: {missing}")
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen2.5-VL's [16, 24, 24]."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_config(tokenizer, sizes: dict[str, Any] | None = None) -> Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL config whose special token ids match `tokenizer`."""
    s = {**TINY_DEFAULTS, **(sizes or {})}
    ids = special_token_ids(tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64
    head_dim = s["text_hidden"] // s["text_heads"]
    text = {
        "vocab_size": vocab,
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "num_hidden_layers": s["text_layers"],
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(head_dim)},
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
        "initializer_range": s["initializer_range"],
    }
    vision = {
        "depth": s["vision_depth"],
        "hidden_size": s["vision_hidden"],
        "intermediate_size": s["vision_intermediate"],
        "num_heads": s["vision_heads"],
        "out_hidden_size": s["text_hidden"],
        "window_size": s["vision_window"],
        "fullatt_block_indexes": list(s["vision_fullatt_blocks"]),
        "tokens_per_second": 2,
    }
    return _assemble(text, vision, ids)


def qwen7b_config(token_ids: dict[str, int] | None = None) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's architecture (values as in its config.json; docs/design.md), for random init.

    `token_ids` (from `special_token_ids`) replaces the real special ids, so a random 7B can be
    fed by the tiny tokenizer; the vocabulary stays 152064.
    """
    ids = {
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "pad_token_id": 151643,
    }
    ids.update(token_ids or {})
    text = {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    }
    return _assemble(text, vision, ids)


def _assemble(text: dict, vision: dict, ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """Qwen2_5_VLConfig from text/vision settings and the multimodal special-token ids (untied head)."""
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )


def random_qwen(config: Qwen2_5_VLConfig, seed: int, dtype: torch.dtype = torch.float32) -> Qwen2_5_VLForConditionalGeneration:
    """Seeded random-init Qwen2.5-VL (sdpa attention), same weights for the same seed and config."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")


def write_tiny_checkpoint(out_dir: str | Path, *, image_size: int, seed: int = 0, sizes: dict[str, Any] | None = None) -> Path:
    """Save a tiny random Qwen2.5-VL (safetensors), its tokenizer and image processor to `out_dir`.

    The directory then loads like a real checkpoint: Qwen2_5_VLForConditionalGeneration /
    AutoTokenizer / AutoImageProcessor `.from_pretrained(out_dir, local_files_only=True)`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = {**TINY_DEFAULTS, **(sizes or {})}
    tokenizer = build_tiny_tokenizer(s["vocab_size"])
    model = random_qwen(tiny_config(tokenizer, s), seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    build_image_processor(image_size).save_pretrained(out)
    return out
