"""Both input formats: the same episode yields the same frames and targets; prompts match JanusVLN's wording."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from vlnflow.data.annotations import iter_annotation_episodes
from vlnflow.data.episode_dirs import read_episode_dir, sub_instruction_for_frame
from vlnflow.data.index import IndexSettings, build_index
from vlnflow.data.layout import detect_format
from vlnflow.data.prompts import Targets, build_answer, build_prompt, parse_answer, parse_instruction
from vlnflow.data.vocabulary import ACTIONS, canonical_action


def index_rows(root, tmp_path, **settings):
    out = tmp_path / f"index-{len(list(tmp_path.iterdir()))}"
    build_index(
        IndexSettings(root=str(root), **settings), str(out / "s.parquet"), str(out / "e.parquet"), str(out / "k.csv")
    )
    return pq.read_table(out / "s.parquet").to_pylist(), pq.read_table(out / "e.parquet").to_pylist()


def test_demo_formats_are_detected(demo_data):
    assert detect_format(str(demo_data / "episodes")) == ("episodes", None)
    assert detect_format(str(demo_data)) == ("annotations", str(demo_data / "annotations.json"))


@pytest.mark.parametrize("pad", ["none", "repeat_first"])
def test_same_episodes_in_both_formats_give_identical_samples(demo_data, tmp_path, pad):
    ep_rows, ep_episodes = index_rows(demo_data / "episodes", tmp_path, pad=pad)
    an_rows, an_episodes = index_rows(demo_data, tmp_path, pad=pad)
    assert len(ep_rows) == len(an_rows) == sum(e["n_samples"] for e in ep_episodes) > 200
    assert [e["episode_id"] for e in ep_episodes] == [e["episode_id"] for e in an_episodes]
    for a, b in zip(ep_rows, an_rows):
        # frames are relative to each format's root: compare the files they name
        assert [os.path.normpath(demo_data / "episodes" / f) for f in a.pop("frames")] == [
            os.path.normpath(demo_data / f) for f in b.pop("frames")
        ]
        assert (a.pop("source_format"), b.pop("source_format")) == ("episodes", "annotations")
        assert a == b


def test_sample_rows_follow_the_reference_semantics(demo_data, tmp_path):
    rows, episodes = index_rows(demo_data / "episodes", tmp_path)
    assert [(r["episode_id"], r["step"]) for r in rows] == sorted((r["episode_id"], r["step"]) for r in rows)
    long_episode = max(episodes, key=lambda e: e["n_steps"])
    row = next(r for r in rows if r["episode_id"] == long_episode["episode_id"] and r["step"] == 37)
    assert row["sample_id"] == f"{long_episode['episode_id']}/00037"
    assert [int(f.split("/")[1].split("_")[1]) for f in row["frames"]] == [0, 4, 9, 13, 18, 23, 27, 32, 37]
    assert row["frames"][-1].endswith(f"_{row['action']}.png")
    assert row["prompt"].count("<image>") == len(row["frames"]) == 9
    assert row["answer"].endswith(f"ACTION: {row['action']}")
    assert row["sub_instruction"] and row["description_2d"] and row["description_3d"]
    assert {r["action"] for r in rows} == set(ACTIONS)
    last_steps = [
        r for r in rows if r["step"] == next(e["n_steps"] for e in episodes if e["episode_id"] == r["episode_id"]) - 1
    ]
    assert {r["action"] for r in last_steps} == {"STOP"}


def test_repeat_first_pads_short_histories(demo_data, tmp_path):
    rows, _ = index_rows(demo_data / "episodes", tmp_path, pad="repeat_first")
    first = rows[0]
    assert first["step"] == 0 and len(first["frames"]) == 9 and len(set(first["frames"])) == 1
    assert all(len(r["frames"]) == 9 for r in rows)


def test_action_prompt_style_is_janusvln_create_data_wording(demo_data, tmp_path):
    rows, _ = index_rows(demo_data / "episodes", tmp_path, prompt_style="action")
    row = rows[2]
    assert row["answer"] == row["action"]
    assert row["prompt"] == (
        "You are a visual language navigation model, and your should go to the locations to complete the given task. "
        "Compare the observation and instruction to infer your current progress, and then select the correct direction "
        "from the candidates to go to the target location and finish the task.\n This is your historical observation:"
        "<image><image>\n This is your current observation:<image>\n Your task is to "
        f"{row['instruction']}\n You should take one of the following actions:\n MOVE_FORWARD\n TURN_LEFT\n TURN_RIGHT\n STOP."
    )


def test_prompts_round_trip_through_the_parsers():
    targets = Targets("TURN_LEFT", "Go to the door.", "A red door.", "The door is 2 m ahead.")
    for style in ("action", "descriptions"):
        prompt = build_prompt("Walk to the kitchen.\nThen stop.", 4, style)
        assert prompt.count("<image>") == 4
        assert parse_instruction(prompt) == "Walk to the kitchen.\nThen stop."
    assert parse_answer(build_answer(targets, "descriptions")) == (
        "TURN_LEFT",
        "Go to the door.",
        "A red door.",
        "The door is 2 m ahead.",
    )
    assert parse_answer(build_answer(targets, "action")) == ("TURN_LEFT", None, None, None)


def test_sub_instruction_follows_checkpoints():
    subs = ["a", "b", "c"]
    assert [sub_instruction_for_frame(f, subs, [2, 5]) for f in range(8)] == ["a", "a", "a", "b", "b", "b", "c", "c"]
    assert [sub_instruction_for_frame(f, subs, [1]) for f in range(4)] == ["a", "a", "b", "b"]
    assert sub_instruction_for_frame(3, [], [1]) is None


def test_actions_accept_vlnce_ids_and_lower_case():
    assert [canonical_action(i) for i in range(4)] == ["STOP", "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT"]
    assert canonical_action(" move_forward ") == "MOVE_FORWARD"
    for bad in ("JUMP", 4, True, None):
        with pytest.raises(ValueError, match="unknown action"):
            canonical_action(bad)


def test_create_data_style_annotations_with_absolute_paths_and_shuffled_entries(demo_data, tmp_path):
    """JanusVLN's create_data writes absolute image paths and lower-case actions in file names."""
    root = tmp_path / "r2r"
    src = demo_data / "episodes" / "ep0003"
    episode = read_episode_dir(str(demo_data / "episodes"), "ep0003")
    shutil.copytree(src, root / "frames" / "42")
    entries = []
    for j, targets in enumerate(episode.targets):
        history = [0, j] if j else [0]
        names = [os.path.basename(episode.frames[i]) for i in history]
        entries.append(
            {
                "id": f"42/{names[-1]}",
                "conversations": [
                    {"from": "human", "value": build_prompt(episode.instruction, len(names), "action")},
                    {"from": "gpt", "value": targets.action},
                ],
                "images": [str(root / "frames" / "42" / n) for n in names],
            }
        )
    entries.reverse()
    (root / "train_r2r.json").write_text(json.dumps(entries))
    [(episode_id, rebuilt)] = list(iter_annotation_episodes(str(root / "train_r2r.json"), str(root)))
    assert episode_id == "42"
    assert rebuilt.frames == [f"frames/42/{os.path.basename(f)}" for f in episode.frames]
    assert rebuilt.instruction == episode.instruction
    assert [t.action for t in rebuilt.targets] == [t.action for t in episode.targets]
    assert all(t.sub_instruction is None for t in rebuilt.targets)


def test_seed_style_annotations_with_explicit_fields(demo_data, tmp_path):
    """The seed's JSON variant carries instruction/subinstruction/2D/3D/action fields instead of turns."""
    entries = json.loads((demo_data / "annotations.json").read_text())
    rows_conv = list(iter_annotation_episodes(str(demo_data / "annotations.json"), str(demo_data)))
    explicit = []
    for entry, targets in zip(entries, [t for _, ep in rows_conv for t in ep.targets]):
        episode = next(ep for eid, ep in rows_conv if entry["id"].startswith(eid + "/"))
        explicit.append(
            {
                "id": entry["id"],
                "images": entry["images"],
                "instruction": episode.instruction,
                "subinstruction": targets.sub_instruction,
                "2D_description": targets.description_2d,
                "3D_description": targets.description_3d,
                "action": targets.action,
            }
        )
    path = tmp_path / "explicit.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in explicit))
    rebuilt = list(iter_annotation_episodes(str(path), str(demo_data)))
    assert [(eid, ep.frames, ep.targets, ep.instruction) for eid, ep in rebuilt] == [
        (eid, ep.frames, ep.targets, ep.instruction) for eid, ep in rows_conv
    ]


def test_settings_come_from_the_validated_config(tmp_path):
    from vlnflow.config import load_config

    config = load_config("config.yaml", {"history": {"pad": "repeat_first"}, "shards": {"count": 256}})
    settings = IndexSettings.from_config(config)
    assert (settings.root, settings.format, settings.pad, settings.max_frames) == (
        "data/demo/episodes",
        "auto",
        "repeat_first",
        8,
    )
    assert (settings.prompt_style, settings.on_error, settings.shard_count) == ("action", "fail", 256)


def test_worker_processes_give_the_same_index(demo_data, tmp_path, monkeypatch):
    import vlnflow.data.index as index_module

    monkeypatch.setattr(index_module, "POOL_MIN_EPISODES", 1)
    root = str(demo_data / "episodes")
    outputs = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        build_index(
            IndexSettings(root=root), str(out / "s.parquet"), str(out / "e.parquet"), str(out / "k.csv"), processes
        )
        outputs.append((pq.read_table(out / "s.parquet"), pq.read_table(out / "e.parquet")))
    assert outputs[0][0].equals(outputs[1][0]) and outputs[0][1].equals(outputs[1][1])
