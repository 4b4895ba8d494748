"""Greedy decoding with the KV cache (vlnflow.infer.generate) equals re-running the training forward
on the growing sequence, token for token (tiny random model, CPU)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from vlnflow.config import load_config
from vlnflow.infer.generate import greedy_decode, prompt_only
from vlnflow.infer.predict import answer_action
from vlnflow.model.batching import Collator
from vlnflow.model.chat import IGNORE_INDEX

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    from vlnflow.data.index import IndexSettings, build_index
    from vlnflow.model.loading import build_model, frame_geometry, load_processors, resolve_model_config
    from vlnflow.spatial.fingerprint import spatial_output

    work = tmp_path_factory.mktemp("generate")
    config = load_config(REPO / "config.yaml", {"dataset": {"root": str(demo_data / "episodes")}})
    build_index(IndexSettings.from_config(config), str(work / "samples.parquet"), str(work / "episodes.parquet"), str(work / "skipped.csv"))
    model_cfg = resolve_model_config(config)
    grid, channels = spatial_output(config["spatial"])
    model = build_model(model_cfg, channels, grid).eval()
    geometry = frame_geometry(config)
    tokenizer, processor = load_processors(model_cfg, geometry)
    collator = Collator(tokenizer, processor, geometry, dataset_root=config["dataset"]["root"])
    row = pd.read_parquet(work / "samples.parquet").to_dict("records")[0]
    features = torch.randn(grid[0] * grid[1], channels, generator=torch.Generator().manual_seed(0))
    return model, collator, row, features


def test_prompt_only_cuts_the_sample_before_its_answer(setup):
    _, collator, row, _ = setup
    encoded = collator.encode(row)
    prompt, answer = prompt_only(encoded)
    assert prompt.input_ids + answer == encoded.input_ids
    assert all(label == IGNORE_INDEX for label in prompt.labels)
    assert answer == [t for t in encoded.labels if t != IGNORE_INDEX]
    assert collator.tokenizer.decode(answer).startswith(str(row["answer"]))


def test_cached_greedy_decode_equals_recomputing_the_training_forward(setup):
    model, collator, row, features = setup
    prompt, _ = prompt_only(collator.encode(row))
    n = 6
    got = greedy_decode(model, collator.pack([prompt], [features]), stop_ids=set(), max_new_tokens=n)
    want, ids = [], list(prompt.input_ids)
    with torch.no_grad():
        for _ in range(n):
            grown = type(prompt)(prompt.sample_id, ids, [IGNORE_INDEX] * len(ids), prompt.pixel_values, prompt.image_grid_thw)
            hidden = model.hidden_states(collator.pack([grown], [features]))  # varlen packed attention, no cache
            token = int(model.qwen.lm_head(hidden[0, -1]).argmax())
            want.append(token)
            ids.append(token)
    assert got == want and len(got) == n
    first = got[0]
    assert greedy_decode(model, collator.pack([prompt], [features]), stop_ids={first}, max_new_tokens=n) == []


@pytest.mark.parametrize(("text", "action"), [
    ("TURN_LEFT", "TURN_LEFT"),
    ("SUBINSTRUCTION: go\n2D_DESCRIPTION: a\n3D_DESCRIPTION: b\nACTION: stop", "STOP"),
    ("SUBINSTRUCTION: go\n2D_DESCRIPTION: a\n3D_DESCRIPTION: b\nACTION: jump", None),
    ("D stair the", None),
])
def test_answer_action_reads_the_bare_action_or_the_action_line(text, action):
    assert answer_action(text) == action
