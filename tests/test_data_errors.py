"""Broken data sets and bad settings fail with a message naming the setting, file or episode;
under dataset.on_error: skip the bad episode is listed in skipped.csv instead."""

import csv
import json
import shutil

import pyarrow.parquet as pq
import pytest

from vlnflow.data.index import IndexSettings, build_index
from vlnflow.errors import DatasetError, UserError


@pytest.fixture
def episodes_root(demo_data, tmp_path):
    root = tmp_path / "episodes"
    shutil.copytree(demo_data / "episodes", root)
    return root


@pytest.fixture
def annotations_root(demo_data, tmp_path):
    root = tmp_path / "ann"
    shutil.copytree(demo_data, root)
    return root


def run_index(root, tmp_path, **settings):
    out = tmp_path / "out"
    result = build_index(
        IndexSettings(root=str(root), **settings),
        str(out / "s.parquet"),
        str(out / "e.parquet"),
        str(out / "skipped.csv"),
    )
    return result, out


def first_frame(root, episode="ep0002"):
    return sorted((root / episode).glob("step_*.png"))[0]


def test_missing_root_names_the_setting(tmp_path):
    with pytest.raises(UserError, match=r"dataset.root: directory not found: .*nowhere"):
        run_index(tmp_path / "nowhere", tmp_path)


def test_unknown_format_names_the_setting(episodes_root, tmp_path):
    with pytest.raises(UserError, match=r"dataset.format: unknown format 'hdf5'"):
        run_index(episodes_root, tmp_path, format="hdf5")


def test_ambiguous_root_asks_for_the_format(episodes_root, tmp_path):
    (episodes_root / "annotations.json").write_text("[]")
    with pytest.raises(UserError, match="set dataset.format"):
        run_index(episodes_root, tmp_path)


def test_missing_image_in_episode_dir(episodes_root, tmp_path):
    frame = first_frame(episodes_root)
    frame.unlink()  # its step JSON still refers to it
    with pytest.raises(
        DatasetError, match=rf"episode ep0002: image referenced but missing: .*{frame.stem}.json"
    ) as info:
        run_index(episodes_root, tmp_path)
    assert info.value.episode == "ep0002"


def test_missing_image_in_annotations(annotations_root, tmp_path):
    frame = first_frame(annotations_root / "episodes", "ep0005")
    frame.unlink()
    with pytest.raises(
        DatasetError,
        match=rf"image referenced but missing: .*ep0005/{frame.name} \(episode ep0005, in .*annotations.json\)",
    ):
        run_index(annotations_root, tmp_path)


def test_unparseable_step_json(episodes_root, tmp_path):
    path = first_frame(episodes_root, "ep0004").with_suffix(".json")
    path.write_text('{"landmark_description": "a door", ')
    with pytest.raises(DatasetError, match=rf"unparseable JSON in .*{path.name}: .* line 1 .*\(episode ep0004\)"):
        run_index(episodes_root, tmp_path)


def test_unparseable_milestones(episodes_root, tmp_path):
    (episodes_root / "ep0001" / "milestones_result.json").write_text("{instruction_text: no quotes}")
    with pytest.raises(DatasetError, match=r"unparseable JSON in .*ep0001/milestones_result.json"):
        run_index(episodes_root, tmp_path)


def test_unparseable_annotations_file(annotations_root, tmp_path):
    (annotations_root / "annotations.json").write_text('[{"id": "a/b", ')
    with pytest.raises(DatasetError, match=r"unparseable JSON in .*annotations.json"):
        run_index(annotations_root, tmp_path)


def test_unknown_action_in_frame_name(episodes_root, tmp_path):
    frame = first_frame(episodes_root, "ep0006")
    frame.rename(frame.with_name(frame.name.split("_")[0] + "_" + frame.name.split("_")[1] + "_JUMP.png"))
    frame.with_suffix(".json").unlink()
    with pytest.raises(DatasetError, match=r"episode ep0006: unknown action 'JUMP' in frame file .*_JUMP.png"):
        run_index(episodes_root, tmp_path)


def test_unknown_action_in_annotations(annotations_root, tmp_path):
    path = annotations_root / "annotations.json"
    entries = json.loads(path.read_text())
    entries[3]["conversations"][1]["value"] = entries[3]["conversations"][1]["value"].replace(
        "ACTION: ", "ACTION: FLY_"
    )
    path.write_text(json.dumps(entries))
    with pytest.raises(
        DatasetError,
        match=rf"entry 3 \(id '{entries[3]['id']}'\) of episode {entries[3]['id'].split('/')[0]}: unknown action 'FLY_",
    ):
        run_index(annotations_root, tmp_path)


def test_episode_without_frames(episodes_root, tmp_path):
    for frame in (episodes_root / "ep0007").glob("step_*"):
        frame.unlink()
    with pytest.raises(DatasetError, match=r"episode ep0007 has no frames: no step_<idx>_<ACTION>"):
        run_index(episodes_root, tmp_path)


def test_descriptions_style_without_descriptions(episodes_root, tmp_path):
    first_frame(episodes_root, "ep0008").with_suffix(".json").unlink()
    with pytest.raises(DatasetError, match=r"sample ep0008/00000: dataset.prompt_style is 'descriptions'"):
        run_index(episodes_root, tmp_path, prompt_style="descriptions")


def test_skip_lists_every_bad_episode_and_keeps_the_rest(episodes_root, tmp_path):
    for frame in (episodes_root / "ep0007").glob("step_*"):
        frame.unlink()
    (episodes_root / "ep0001" / "milestones_result.json").write_text("not json")
    n_good = sum(1 for d in episodes_root.iterdir()) - 2
    result, out = run_index(episodes_root, tmp_path, on_error="skip")
    assert (result.n_episodes, result.n_skipped) == (n_good, 2)
    with open(out / "skipped.csv") as fh:
        skipped = list(csv.DictReader(fh))
    assert [s["episode_id"] for s in skipped] == ["ep0001", "ep0007"]
    assert "unparseable JSON" in skipped[0]["reason"] and "no frames" in skipped[1]["reason"]
    episodes = pq.read_table(out / "e.parquet").column("episode_id").to_pylist()
    assert "ep0001" not in episodes and "ep0007" not in episodes and len(episodes) == n_good


def test_skipped_csv_is_written_when_nothing_is_skipped(episodes_root, tmp_path):
    result, out = run_index(episodes_root, tmp_path, on_error="skip")
    assert result.n_skipped == 0
    assert (out / "skipped.csv").read_text().splitlines() == ["episode_id,path,reason"]
