"""Issue 12: held-out validation and TensorBoard in a real (tiny, CPU) DeepSpeed run.

One 3-step run with dataset.val_fraction 0.02 (one demo episode held out), eval_every 2 and
TensorBoard on: val records at steps 2 and 3 (the end) in metrics.jsonl, the held-out episode
never trained on, event files under <run>/tb with train and eval scalars, and `vlnflow monitor`
showing the validation line. The split and accuracy helpers are checked on the same data.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import pytest

from train_helpers import build_cache, run_trainer
from vlnflow.spatial.geometry import FrameGeometry
from vlnflow.data.split import split_by_episode

DRIVER = "import sys\nfrom vlnflow.train.run import main\nsys.exit(main(sys.argv[1:]))\n"
VAL_FRACTION = 0.02  # holds out exactly one of the 14 demo episodes (asserted below)


def base_config(demo: Path, work: Path) -> dict:
    return {
        "dataset": {"root": str(demo / "episodes"), "val_fraction": VAL_FRACTION},
        "train": {
            "samples": str(work / "index" / "samples.parquet"),
            "cache": str(work / "cache" / "manifest.json"),
            "max_steps": 3,
            "per_device_batch": 2,
            "grad_accum": 2,
            "save_every": 10,
            "eval_every": 2,
            "tensorboard": True,
            "lr": {"llm": 1e-3, "merger": 1e-2},
            "loader": {"workers": 1},
        },
    }


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("train_validation")
    config = build_cache(base_config(demo_data, work), work)
    result = run_trainer(work, "val", base_config(demo_data, work), DRIVER)
    return result, config


@pytest.mark.slow
def test_val_records_every_eval_every_steps_and_at_the_end(run):
    result, config = run
    samples = pd.read_parquet(config["train"]["samples"])
    train_rows, val_rows = split_by_episode(samples, VAL_FRACTION)
    assert val_rows.episode_id.nunique() == 1 and len(val_rows) > 0
    assert [m["step"] for m in result.metrics] == [1, 2, 3]  # step records only (helpers split them off)
    assert [v["step"] for v in result.val] == [2, 3]  # every 2 steps, and the last one once
    for v in result.val:
        assert v["kind"] == "val" and v["val_samples"] == len(val_rows)
        assert math.isfinite(v["val_loss"]) and 0 < v["val_loss"] < 20
        assert 0.0 <= v["val_action_accuracy"] <= 1.0 and v["val_tokens"] > v["val_samples"]
        assert v["val_live_samples"] == 0  # the held-out samples are in the cache
    assert result.val[0]["val_loss"] != result.val[1]["val_loss"]  # the model moved between the evaluations
    assert "validation at step 2: loss" in result.log
    held_out = f"{len(val_rows)} samples of 1 episode(s) held out"
    assert held_out in result.log, result.log[-3000:]
    # training read only the other episodes: 3 steps x 4 samples, all cached, none of the held-out ones
    assert result.metrics[-1]["cached_samples"] == 12 and len(train_rows) + len(val_rows) == len(samples)


@pytest.mark.slow
def test_tensorboard_event_files_hold_train_and_eval_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = run
    events = sorted((result.dir / "tb").glob("events.out.tfevents.*"))
    assert events, f"no event files under {result.dir / 'tb'}"
    acc = EventAccumulator(str(result.dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/action_accuracy"} <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([m["loss"] for m in result.metrics])
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [
        (v["step"], pytest.approx(v["val_loss"])) for v in result.val
    ]


@pytest.mark.slow
def test_monitor_shows_the_validation_loss(run):
    from vlnflow.monitor.cli import monitor
    from vlnflow.monitor.gpu import GpuReading

    result, _ = run
    out = io.StringIO()
    assert monitor(str(result.dir), once=True, out=out, read_gpus=lambda: GpuReading([], "none")) == 0
    text = out.getvalue()
    last = result.val[-1]
    assert f"val: step=3 loss={last['val_loss']:.4f}" in text, text
    assert f"action_acc={100 * last['val_action_accuracy']:.1f}%" in text
    assert "step=3/3" in text  # the val record did not disturb the step statistics


def test_action_positions_cover_the_action_tokens_of_both_answer_styles():
    from vlnflow.model.chat import tokenize_conversation
    from vlnflow.model.tiny import build_tiny_tokenizer
    from vlnflow.train.evaluate import action_positions

    tokenizer = build_tiny_tokenizer()
    for answer, action in (("TURN_LEFT", "TURN_LEFT"),
                           ("SUBINSTRUCTION: go\n2D_DESCRIPTION: a door\n3D_DESCRIPTION: 2 m\nACTION: MOVE_FORWARD", "MOVE_FORWARD")):
        ids, labels = tokenize_conversation(tokenizer, "Your task is to go <image>", answer, [4])
        positions = action_positions(tokenizer, "s", labels)
        text = tokenizer.decode([labels[p] for p in positions])
        assert text.strip().endswith(action) and action in text
        assert len(text.strip()) <= len(action) + 2  # the action (plus at most a merged ": ")
        assert positions == list(range(positions[0], positions[-1] + 1))
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert labels[positions[-1] + 1] == end  # the action ends the answer


def test_rank_shares_cover_every_sample_once_with_equal_batch_counts():
    from vlnflow.train.evaluate import rank_share

    for n, world, per in ((27, 4, 2), (3, 8, 1), (10, 2, 4)):
        shares = [rank_share(n, world, r, per) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # same number of forwards on every rank (ZeRO-3)
        real = sorted(i for s in shares for b in s for i, w in b if w == 1.0)
        assert real == list(range(n))
        assert all(w in (0.0, 1.0) for s in shares for b in s for _, w in b)


def test_batch_sums_count_a_sample_right_only_when_every_action_token_is():
    """_batch_sums on a packed batch of three samples with a stand-in model that predicts chosen tokens:
    exact label loss sum, token count and accuracy; padding samples (weight 0) count for nothing."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from vlnflow.model.batching import Collator, EncodedSample
    from vlnflow.model.chat import tokenize_conversation
    from vlnflow.model.tiny import build_image_processor, build_tiny_tokenizer
    from vlnflow.train.data import TrainItem
    from vlnflow.train.evaluate import _batch_sums, action_positions

    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    answers = ["TURN_LEFT", "SUBINSTRUCTION: go\n2D_DESCRIPTION: a door\n3D_DESCRIPTION: 2 m\nACTION: STOP", "MOVE_FORWARD"]
    items = []
    for i, answer in enumerate(answers):
        ids, labels = tokenize_conversation(tokenizer, "Your task is to go <image>", answer, [4])
        encoded = EncodedSample(f"s{i}", ids, labels, torch.zeros(16, 1176), torch.tensor([[1, 4, 4]]))
        items.append(TrainItem(encoded, torch.zeros(16, 8), None))
    collator = Collator(tokenizer, build_image_processor(56), FrameGeometry("pad", 56, (640, 480)), dataset_root=".")
    starts = [0]
    for item in items:
        starts.append(starts[-1] + len(item.encoded.input_ids))
    # wrong predictions: sample 0 at one of its action tokens, sample 1 at a token before its action
    act0 = action_positions(tokenizer, "s0", items[0].encoded.labels)
    act1 = action_positions(tokenizer, "s1", items[1].encoded.labels)
    wrong = {starts[0] + act0[0], starts[1] + act1[0] - 3}

    class StandIn:
        """hidden_states = one-hot of the token each position must predict (off by one where `wrong`)."""

        def hidden_states(self, batch):
            ids = batch["input_ids"][0]
            target = torch.roll(ids, -1)
            for p in wrong:
                target[p - 1] = (ids[p] + 1) % vocab
            self.seen = F.one_hot(target, vocab).float()[None] * 5.0
            return self.seen

        qwen = SimpleNamespace(lm_head=lambda h: h)

    run = SimpleNamespace(device=torch.device("cpu"), source=None, collator=collator)
    module = StandIn()
    weights = torch.tensor([1.0, 1.0, 0.0])  # the third is padding
    loss, tokens, correct, samples, live, head_correct = _batch_sums(run, module, items, weights).tolist()
    assert (correct, samples, live, head_correct) == (1.0, 2.0, 0.0, 0.0)  # no action head: nothing counted  # sample 1's miss is outside its action: still right
    supervised = [starts[i] + p for i in range(2) for p, t in enumerate(items[i].encoded.labels) if t != -100 and p > 0]
    assert tokens == len(supervised)
    logits = module.seen[0, torch.tensor(supervised) - 1]
    targets = torch.cat([torch.tensor(it.encoded.input_ids) for it in items])[torch.tensor(supervised)]
    assert loss == pytest.approx(F.cross_entropy(logits, targets, reduction="sum").item(), rel=1e-6)
    wrong.clear()
    assert _batch_sums(run, module, items, torch.ones(3)).tolist()[2] == 3.0  # all right without misses
