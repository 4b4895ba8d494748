"""Greedy decoding for JanusModel: the prompt (with its fused image + spatial embeddings) once, then
one token at a time with transformers' KV cache.

The prompt is embedded by the training code itself (`JanusModel.inputs_embeds`,
`position_ids`), so inference sees exactly what training saw. After the prompt, every
new (text) token's mRoPE position is the last position + 1 on all three axes, as in
Qwen2.5-VL's own generation. vlnflow's packed varlen attention has no KV cache, so the
LLM runs with transformers' sdpa while decoding (the same function).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from vlnflow.model.batching import EncodedSample
from vlnflow.model.chat import IGNORE_INDEX


def prompt_only(sample: EncodedSample) -> tuple[EncodedSample, list[int]]:
    """(the sample cut before its answer, the answer's token ids) from a training-encoded sample."""
    start = next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))
    prompt = EncodedSample(sample.sample_id, sample.input_ids[:start], [IGNORE_INDEX] * start,
                           sample.pixel_values, sample.image_grid_thw, [], sample.action)
    return prompt, sample.input_ids[start:]


@contextlib.contextmanager
def sdpa_llm(model):
    """Run the LLM with transformers' sdpa attention inside the block (KV cache support)."""
    text_config = model.qwen.config.text_config
    saved = text_config._attn_implementation
    text_config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        text_config._attn_implementation = saved


@torch.no_grad()
def greedy_decode(model, batch: dict, stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """Token ids generated greedily after the one prompt in `batch` (a Collator.pack of one sample), stop id excluded."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    language_model, lm_head = model.qwen.model.language_model, model.qwen.lm_head
    embed = model.qwen.get_input_embeddings()
    cache_arg = "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"
    with sdpa_llm(model):
        positions = model.position_ids(batch)  # [4, 1, T]
        out = language_model(inputs_embeds=model.inputs_embeds(batch), position_ids=positions, use_cache=True)
        cache, length, last = _cache_of(out), positions.shape[-1], positions[1:, :, -1:]
        generated: list[int] = []
        for step in range(max_new_tokens):
            token = int(lm_head(out.last_hidden_state[:, -1]).float().argmax(-1))
            if token in stop_ids:
                break
            generated.append(token)
            text = torch.full((1, 1, 1), length + step, dtype=positions.dtype, device=device)
            position = torch.cat([text, last + step + 1], dim=0)
            ids = torch.tensor([[token]], device=device)
            out = language_model(inputs_embeds=embed(ids), position_ids=position, use_cache=True, **{cache_arg: cache})
            cache = _cache_of(out)
    return generated


def _cache_of(out):
    """The KV cache of a model output (`cache` since transformers ~5.2x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
