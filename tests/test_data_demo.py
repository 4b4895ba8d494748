"""The demo data set: real, structured frames in both formats, deterministic, small."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vlnflow.cli import main
from vlnflow.data import demo_scene as scene
from vlnflow.data.demo import DEMO_EPISODES, make_demo, write_episode
from vlnflow.data.fingerprint import dataset_fingerprint
from vlnflow.data.vocabulary import ACTIONS, parse_step_filename


def test_demo_layout_and_content(demo_data):
    episodes = sorted(p for p in (demo_data / "episodes").iterdir())
    assert len(episodes) == 14 and (demo_data / ".complete").exists()
    lengths, actions = [], set()
    for episode in episodes:
        frames = sorted(episode.glob("step_*.png"))
        lengths.append(len(frames))
        actions |= {parse_step_filename(f.name)[1] for f in frames}
        assert parse_step_filename(frames[-1].name)[1] == "STOP"
        for frame in frames:
            desc = json.loads(frame.with_suffix(".json").read_text())
            assert desc["landmark_description"] and desc["spatial_description"]
        milestones = json.loads((episode / "milestones_result.json").read_text())
        assert milestones["instruction_text"] and milestones["subinstructions"]
        assert all(0 <= c["checkpoint_frame_index"] < len(frames) for c in milestones["completion_checkpoints"])
    assert min(lengths) == 3 and max(lengths) == 40
    assert actions == set(ACTIONS)
    entries = json.loads((demo_data / "annotations.json").read_text())
    assert len(entries) == sum(lengths)
    assert set(entries[0]) == {"id", "conversations", "images"}
    assert all((demo_data / image).is_file() for entry in entries for image in entry["images"])


def test_frames_have_structure_and_change_with_actions(tmp_path):
    write_episode(str(tmp_path / "ep"), "ep", 6, seed=3, size=(640, 480))
    frames = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "ep").glob("step_*.png"))]
    assert frames[0].shape == (480, 640, 3)
    for frame in frames:
        assert frame.std() > 10  # never a constant image
        assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 5
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, frames[1:]))


def test_demo_is_deterministic(tmp_path):
    make_demo(str(tmp_path / "a"), n_episodes=3, size=(48, 32), seed=5)
    make_demo(str(tmp_path / "b"), n_episodes=3, size=(48, 32), seed=5)
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert len(a) > 10
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a)


def test_full_size_demo_stays_small(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "demo")]) == 0
    total = sum(p.stat().st_size for p in (tmp_path / "demo").rglob("*") if p.is_file())
    assert total < 12e6
    assert f"{DEMO_EPISODES} episodes" in capsys.readouterr().out
    # an existing demo is not silently replaced
    assert main(["demo-data", str(tmp_path / "demo")]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_cli_rejects_a_bad_size(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo-data", str(tmp_path / "x"), "--size", "big"])


def test_dataset_fingerprint_tracks_files(demo_data, tmp_path):
    import shutil

    root = tmp_path / "episodes"
    shutil.copytree(demo_data / "episodes", root)
    first = dataset_fingerprint(str(root))
    assert dataset_fingerprint(str(root)) == first
    step_json = next((root / "ep0003").glob("step_*.json"))
    step_json.write_text(step_json.read_text().replace("m away", "metres away"))
    edited = dataset_fingerprint(str(root))
    assert edited != first
    (root / "ep0003" / ".swp").write_text("editor noise")  # hidden files are ignored
    assert dataset_fingerprint(str(root)) == edited
    os.remove(next((root / "ep0005").glob("step_*.png")))
    assert dataset_fingerprint(str(root)) != edited
    assert dataset_fingerprint(str(tmp_path / "missing")) == "missing-root"


def test_r2r_length_profile_textured_frames_and_parallel_rendering(tmp_path):
    """Issue 21: episodes with R2R-CE's length range, frames that weigh like real ones, same files from N processes."""
    from vlnflow.data.demo import episode_lengths

    lengths = episode_lengths(400, np.random.default_rng(0), "r2r")
    assert min(lengths) == 10 and max(lengths) == 120 and 50 < np.mean(lengths) < 64
    assert episode_lengths(14, np.random.default_rng(0)) == episode_lengths(14, np.random.default_rng(0), "demo")

    kw = dict(size=(160, 120), seed=2, lengths=[3, 2], episode_ids=["r2r_a", "r2r_b"])
    one = make_demo(str(tmp_path / "one"), texture=4.0, **kw)
    two = make_demo(str(tmp_path / "two"), texture=4.0, workers=2, **kw)
    flat = make_demo(str(tmp_path / "flat"), **kw)
    assert one["samples"] == 5 and one["lengths"] == [3, 2] and sorted(os.listdir(tmp_path / "one" / "episodes")) == ["r2r_a", "r2r_b"]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 5 and all((tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes() for p in files)
    png_bytes = lambda name: sum(p.stat().st_size for p in (tmp_path / name / "episodes").rglob("*.png"))  # noqa: E731
    assert png_bytes("one") > 3 * png_bytes("flat"), "noise makes PNGs as heavy as real frames"
    with pytest.raises(Exception, match="at least 2 steps"):
        make_demo(str(tmp_path / "bad"), lengths=[1], size=(48, 32))


@pytest.mark.parametrize("length", [1, 3, 17, 40])
def test_every_action_is_the_experts_answer_to_its_frame(length):
    """The demo's task: STOP within STOP_RADIUS of the landmark, a turn towards it while it is off centre, else
    forward; each plan has the asked length and the poses follow from the actions (and the slips)."""
    target, actions, poses = scene.plan_episode(np.random.default_rng(length), length)
    assert len(actions) == len(poses) == length and actions[-1] == "STOP" and "STOP" not in actions[:-1]
    assert [scene.expert_action(p, target) for p in poses] == actions
    for before, action, after in zip(poses, actions, poses[1:]):
        turned = (after.heading - before.heading + 180) % 360 - 180
        if action == "MOVE_FORWARD":
            assert np.hypot(after.x - before.x, after.y - before.y) == pytest.approx(scene.STEP_METRES)
            assert turned in (0.0, *scene.SLIPS)
        else:
            assert (after.x, after.y) == (before.x, before.y)
            assert turned == (scene.TURN_DEGREES if action == "TURN_LEFT" else -scene.TURN_DEGREES)


def test_actions_follow_from_the_frames_not_the_text(demo_data):
    """Where the landmark is drawn decides the action: its pixels' centre is left of the view centre in every
    TURN_LEFT frame, right in every TURN_RIGHT frame, within a few pixels of it in every MOVE_FORWARD frame; the
    instruction is one per episode, and no action is so common that always answering it is a good model."""
    counts = {a: 0 for a in ACTIONS}
    for episode in sorted((demo_data / "episodes").iterdir()):
        milestones = json.loads((episode / "milestones_result.json").read_text())
        assert "left" not in milestones["instruction_text"] and "right" not in milestones["instruction_text"]
        for frame in sorted(episode.glob("step_*.png")):
            action = parse_step_filename(frame.name)[1]
            counts[action] += 1
            if action == "STOP":
                continue
            pixels = np.asarray(Image.open(frame)).astype(int)
            drawn = np.zeros(pixels.shape[:2], dtype=bool)
            for colour in _landmark_colours(milestones["instruction_text"]):
                drawn |= np.abs(pixels - colour).sum(-1) < 30
            columns = np.nonzero(drawn.any(0))[0]
            assert len(columns), frame
            offset = (columns.min() + columns.max() + 1) / 2 - pixels.shape[1] / 2  # > 0: right of centre
            if action == "TURN_LEFT":
                assert offset < -DEMO_SIZE_SLACK, (frame, offset)
            elif action == "TURN_RIGHT":
                assert offset > DEMO_SIZE_SLACK, (frame, offset)
            else:
                assert abs(offset) <= DEMO_SIZE_SLACK, (frame, offset)
    total = sum(counts.values())
    assert max(counts.values()) / total < 0.65, counts  # the majority baseline stays well below a learnt model
    assert min(counts["TURN_LEFT"], counts["TURN_RIGHT"]) / total > 0.1, counts


DEMO_SIZE_SLACK = 2  # pixels of the 96-wide test frames: a landmark straight ahead is drawn about the centre


def _landmark_colours(instruction: str) -> list[np.ndarray]:
    """The RGB the landmark an instruction names ("Walk to the red box ...") is drawn in (a plant's foliage too)."""
    colour = next(c for c in scene.COLOURS if f" {c} " in f" {instruction} ")
    return [np.array(scene.COLOURS[colour])] + ([np.array(scene.FOLIAGE)] if " plant " in instruction else [])
