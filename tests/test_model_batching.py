"""Sample rows -> chat tokens with masked prompts -> one packed batch; Qwen's frames prepared like JanusVLN's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlnflow.errors import DatasetError
from vlnflow.model.batching import Collator
from vlnflow.data.prompts import build_prompt
from vlnflow.model.chat import IGNORE_INDEX, conversation, tokenize_conversation
from vlnflow.model.frames import load_qwen_frame, qwen_image
from vlnflow.model.tiny import build_image_processor, build_tiny_tokenizer
from vlnflow.spatial.geometry import FrameGeometry

GEOMETRY = FrameGeometry("pad", 56, (64, 48))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 200, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"f{i}.png")
    return tmp_path


def episode_row(sample_id, frames, **extra):
    row = dict(
        sample_id=sample_id, episode_id="ep1", step=len(frames) - 1, frames=frames, instruction="walk to the sofa",
        action="MOVE_FORWARD", prompt=None, answer=None, sub_instruction="walk forward",
        description_2d="a sofa ahead", description_3d="two meters ahead", source_format="episodes",
    )
    row.update(extra)
    return row


def annotation_row(sample_id, frames, prompt, answer):
    return dict(
        sample_id=sample_id, episode_id="ep2", step=0, frames=frames, instruction="go", action="STOP",
        prompt=prompt, answer=answer, sub_instruction=None, description_2d=None, description_3d=None,
        source_format="annotations",
    )


def test_rows_without_turns_get_them_from_the_data_prompt_builders():
    full = episode_row("s", ["a", "b"])
    prompt, answer = conversation(full, 2)
    assert prompt == build_prompt("walk to the sofa", 2, "descriptions")
    assert answer == "SUBINSTRUCTION: walk forward\n2D_DESCRIPTION: a sofa ahead\n3D_DESCRIPTION: two meters ahead\nACTION: MOVE_FORWARD"
    # a missing description falls back to JanusVLN's action-only answer
    assert conversation(episode_row("s", ["a"], description_3d=None), 1) == (
        build_prompt("walk to the sofa", 1, "action").replace("<image>\n", "<image>"), "MOVE_FORWARD"
    )
    with pytest.raises(DatasetError, match="sample 's'.*no prompt/answer"):
        conversation(episode_row("s", ["a"], action=None), 1)


def test_annotation_prompt_and_answer_are_used_as_upstreams_loader_reads_them():
    """Upstream data_qwen.py joins each <image> with the next line; the seed's structured prompts keep theirs."""
    row = annotation_row("ann-7", ["a", "b"], "History: <image>\nNow: <image>\nWhere next?", "The next action is TURN_LEFT.")
    assert conversation(row, 2) == ("History: <image>Now: <image>Where next?", "The next action is TURN_LEFT.")
    structured = "SUBINSTRUCTION: a\n2D_DESCRIPTION: b\n3D_DESCRIPTION: c\nACTION: STOP"
    assert conversation(annotation_row("seed", ["a"], "Now: <image>\nGo", structured), 1)[0] == "Now: <image>\nGo"
    upstream = build_prompt("go to the door", 3, "action")  # create_data.py's text
    assert "observation:<image><image> This is your current observation:<image> Your task is to go to the door\n" in (
        conversation(annotation_row("up", ["a", "b", "c"], upstream, "STOP"), 3)[0])
    with pytest.raises(DatasetError, match=r"sample 'ann-7'.*2 <image> placeholders.*3 frames"):
        conversation(row, 3)
    with pytest.raises(DatasetError, match="sample 'bad'.*reserved token"):
        conversation(annotation_row("bad", ["a"], "<image> <|im_end|>", "STOP"), 1)


def test_labels_cover_exactly_the_answer_and_its_end_token(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, "See <image> and <image>.", "ACTION: STOP", [4, 9])
    assert len(ids) == len(labels)
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert labels[first:] == ids[first:]
    assert tokenizer.decode(ids[first:]) == "ACTION: STOP<|im_end|>\n"
    assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[:first]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 13
    # same ids as tokenising the fully expanded prompt string
    expanded = tokenizer.decode(ids)
    assert tokenizer(expanded, add_special_tokens=False)["input_ids"] == ids


def test_pad_frames_follow_vggt_pad_mode():
    frame = Image.new("RGB", (640, 480), (10, 20, 30))
    square = np.asarray(qwen_image(frame, FrameGeometry("pad", 644, (640, 480))))
    assert square.shape == (644, 644, 3)
    content_rows = np.where((square != 255).any(axis=(1, 2)))[0]
    assert (content_rows.min(), content_rows.max()) == (77, 77 + 490 - 1)  # 644 x 490 content, 77 white rows each side
    portrait = np.asarray(qwen_image(Image.new("RGB", (480, 640), (0, 0, 0)), FrameGeometry("pad", 644, (480, 640))))
    assert np.where((portrait != 255).any(axis=(0, 2)))[0].min() == 77


def test_crop_frames_are_the_vggt_image_cut_to_whole_merge_blocks():
    """Upstream process_image_unified_vggt: 640x480 -> VGGT 490x644 -> Qwen gets its top 476 rows."""
    rng = np.random.default_rng(5)
    frame = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    geometry = FrameGeometry("crop", 644, (640, 480))
    qwen = np.asarray(qwen_image(frame, geometry))
    assert qwen.shape == (476, 644, 3) and geometry.qwen_hw == (476, 644)
    vggt = np.asarray(frame.resize((644, 490), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(qwen, vggt[:476])


def test_qwen_frame_equals_the_vggt_input_frame(tmp_path):
    """JanusVLN feeds Qwen the same image as VGGT (cut to whole merge blocks): Qwen's pixels are VGGT's x 255."""
    from vlnflow.spatial.preprocess import load_frame

    rng = np.random.default_rng(3)
    for mode in ("pad", "crop"):
        for i, (w, h) in enumerate([(640, 480), (300, 500), (56, 56)]):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            geometry = FrameGeometry(mode, 644, (w, h))
            ours = np.asarray(load_qwen_frame(tmp_path / f"{i}.png", geometry), dtype=np.float32) / np.float32(255.0)
            theirs = load_frame(tmp_path / f"{i}.png", geometry=geometry).permute(1, 2, 0).numpy()
            qh, qw = geometry.qwen_hw
            np.testing.assert_array_equal(ours, theirs[:qh, :qw])


def test_rgba_frames_are_composited_on_white(tmp_path):
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert np.asarray(load_qwen_frame(tmp_path / "t.png", FrameGeometry("pad", 28, (28, 28)))).min() == 255
    with pytest.raises(DatasetError, match="missing.png"):
        load_qwen_frame(tmp_path / "missing.png", FrameGeometry("pad", 28, (28, 28)))


def test_a_frame_of_another_size_is_an_error_naming_it(tmp_path):
    Image.new("RGB", (1280, 720)).save(tmp_path / "wide.png")
    with pytest.raises(DatasetError, match=r"wide.png gives a 364x644 crop image.*spatial.frame_size 640x480 gives 490x644"):
        load_qwen_frame(tmp_path / "wide.png", FrameGeometry("crop", 644, (640, 480)))


def test_collate_packs_samples_without_padding(tokenizer, root):
    collator = Collator(tokenizer, build_image_processor(56), GEOMETRY, dataset_root=root)
    rows = [
        episode_row("a", ["f0.png", "f1.png"]),
        annotation_row("b", ["f2.png", "f3.png", "f4.png"], "<image><image> then <image>: go?", "TURN_LEFT"),
        episode_row("c", ["f5.png"], description_3d=None),
    ]
    features = [torch.full((16, 8), float(i)) for i in range(3)]
    batch = collator(rows, features)
    singles = [collator.encode(row) for row in rows]
    lengths = [len(s.input_ids) for s in singles]
    assert batch["input_ids"].shape == batch["labels"].shape == (1, sum(lengths))
    assert batch["cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["max_seqlen"] == max(lengths)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 6
    assert batch["image_sample_index"].tolist() == [0, 0, 1, 1, 1, 2]
    assert batch["pixel_values"].shape == (6 * 16, 1176)
    assert int(batch["mm_token_type_ids"].sum()) == 6 * 4
    assert torch.equal(batch["spatial_features"][:, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert batch["sample_ids"] == ["a", "b", "c"]
    # every supervised position is a label of its own sample, never a sample's first token
    positions = batch["label_positions"]
    labels = batch["labels"][0]
    assert (labels[positions] != IGNORE_INDEX).all()
    assert int((labels != IGNORE_INDEX).sum()) == len(positions)
    assert not set(batch["cu_seqlens"][:-1].tolist()) & set(positions.tolist())
    # each sample's slice equals that sample encoded alone
    for single, start in zip(singles, batch["cu_seqlens"][:-1].tolist()):
        assert batch["input_ids"][0, start : start + len(single.input_ids)].tolist() == single.input_ids
        assert batch["labels"][0, start : start + len(single.labels)].tolist() == single.labels


def test_collate_names_the_sample_with_a_bad_feature_map(tokenizer, root):
    collator = Collator(tokenizer, build_image_processor(56), GEOMETRY, dataset_root=root)
    rows = [episode_row("a", ["f0.png"]), episode_row("odd", ["f1.png"])]
    with pytest.raises(DatasetError, match="sample 'odd'"):
        collator(rows, [torch.zeros(16, 8), torch.zeros(9, 8)])
    with pytest.raises(DatasetError, match="sample 'none' has no frames"):
        collator.encode(episode_row("none", []))
