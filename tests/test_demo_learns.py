"""Issue 24: the demo learns, and it learns from the spatial features (tiny models, CPU, DeepSpeed zero2).

The demo's task (vlnflow.data.demo_scene): walk to the named landmark, turning towards it while it is off the view
centre; the action follows from the current frame only. Held out: the episodes dataset.val_fraction picks
(9 of the 40 here).

* `shipped`: config.yaml as shipped (only paths, steps and loader workers changed), trained for STEPS steps: the
  training loss falls by more than LOSS_FACTOR and the held-out loss too; the held-out action accuracy beats the
  majority baseline by ACCURACY_MARGIN; `vlnflow predict --held-out` on its export prints its accuracy next to the
  baseline on the same samples.
* `spatial` and `spatial_off`: a spatial-only variant. Qwen's image path gets blank frames (the driver's TEST-ONLY
  swap of the Collator's frame loader), so only the VGGT features, through the merger, show where the landmark is;
  `spatial_off` disconnects the merger (model.lam 0). The connected model must beat the disconnected one on the
  held-out samples by ACCURACY_MARGIN, and its merger must have moved: the guard for a change that stops gradients
  from reaching the spatial merger while everything still runs.

Measured on the 2-core CPU machine (seeded runs, one thread: repeatable), 178 held-out samples, majority 0.545:
shipped 0.770 (training loss 6.75 -> 0.099, held-out loss 0.220 -> 0.172), spatial 0.781, spatial_off 0.517 (lam 0:
the text alone); merger weights moved by 17% (relative L2) in both connected runs. Data, cache and the three runs
take about 100 s.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from train_helpers import KEEP_ENGINE, build_cache, run_trainer
from vlnflow.cli import main as cli
from vlnflow.data.split import split_by_episode

EPISODES, SIZE = 40, (96, 72)  # the full demo's 40 episodes, small frames (the geometry is that of 640x480)
STEPS = 200
LOSS_FACTOR = 10  # the last 20 steps' mean training loss is below the first step's / LOSS_FACTOR
ACCURACY_MARGIN = 0.15  # held-out action accuracy: above the baseline it is compared with by at least this

# Runs vlnflow.train.run. --blank-qwen: TEST-ONLY, Qwen's image of every frame is a grey image of the right size
# (the Collator's default frame loader swapped), so its vision tower shows nothing. Writes <run-dir>/merger.json:
# the relative change of the VGGT merger's weights (L2 norm of final - initial over initial) during training.
DRIVER = """
import json, sys
from pathlib import Path
if sys.argv[1] == "--blank-qwen":
    sys.argv.pop(1)
    from PIL import Image
    from vlnflow.model.batching import Collator
    def blank(path, geometry):
        height, width = geometry.qwen_hw
        return Image.new("RGB", (width, height), (128, 128, 128))
    Collator.__init__.__kwdefaults__["load_frame"] = blank
initial = {}
def on_engine(engine):
    initial.update({n: p.detach().clone() for n, p in engine.module.merger.named_parameters()})
""" + KEEP_ENGINE + """
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
final = dict(engines[0].module.merger.named_parameters())
change = sum((final[n].detach() - p).pow(2).sum() for n, p in initial.items()).sqrt() / sum(p.pow(2).sum() for p in initial.values()).sqrt()
(Path(args["--run-dir"]) / "merger.json").write_text(json.dumps({"relative_change": float(change)}))
"""


def overrides(demo, work, **model) -> dict:
    return {
        "dataset": {"root": str(demo / "episodes")},
        "model": model,
        "train": {"samples": str(work / "index" / "samples.parquet"), "cache": str(work / "cache" / "manifest.json"),
                  "max_steps": STEPS, "save_every": STEPS, "eval_every": STEPS // 2, "loader": {"workers": 0}},
    }


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The demo data and its cache, and the three runs: {name: (Run, merger change)}; the held-out majority baseline."""
    from vlnflow.data.demo import make_demo

    work = tmp_path_factory.mktemp("demo_learns")
    demo = work / "demo"
    make_demo(str(demo), n_episodes=EPISODES, size=SIZE)
    config = build_cache(overrides(demo, work), work, pinned=False)
    runs = {}
    for name, flags, model in (("shipped", (), {}), ("spatial", ("--blank-qwen",), {}),
                               ("spatial_off", ("--blank-qwen",), {"lam": 0.0})):
        run = run_trainer(work, name, overrides(demo, work, **model), DRIVER, driver_flags=flags, pinned=False)
        runs[name] = (run, json.loads((run.dir / "merger.json").read_text())["relative_change"])
    held_out = split_by_episode(pd.read_parquet(config["train"]["samples"]), config["dataset"]["val_fraction"])[1]
    majority = held_out.action.value_counts().iloc[0] / len(held_out)
    return work, config, runs, majority


@pytest.mark.slow
def test_the_demo_learns_and_beats_the_majority_baseline_on_held_out_episodes(learned):
    _, config, runs, majority = learned
    run, change = runs["shipped"]
    losses = run.losses
    assert len(losses) == STEPS and [v["step"] for v in run.val] == [STEPS // 2, STEPS]
    assert sum(losses[-20:]) / 20 < losses[0] / LOSS_FACTOR, (losses[0], losses[-20:])
    assert run.val[-1]["val_loss"] < run.val[0]["val_loss"], run.val  # still falling on episodes it never saw
    assert run.val[-1]["val_samples"] > 100
    assert run.val[-1]["val_action_accuracy"] > majority + ACCURACY_MARGIN, (run.val, majority)
    assert change > 0.01


@pytest.mark.slow
def test_predict_held_out_prints_accuracy_next_to_the_majority_baseline(learned, capsys):
    work, config, runs, majority = learned
    run, _ = runs["shipped"]
    out = work / "export_shipped"
    assert cli(["export", str(run.dir), str(out), "--dtype", "float32"]) == 0
    args = ["predict", "--model", str(out), "--samples", config["train"]["samples"], "--cache", config["train"]["cache"],
            "--held-out", "--n", "0", "--max-new-tokens", "8"]
    capsys.readouterr()
    assert cli(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    held_out = split_by_episode(pd.read_parquet(config["train"]["samples"]), config["dataset"]["val_fraction"])[1]
    assert [s["sample_id"] for s in result["samples"]] == held_out.sample_id.tolist()
    assert result["majority_accuracy"] == pytest.approx(majority)
    assert result["action_accuracy"] > result["majority_accuracy"] + ACCURACY_MARGIN, result
    assert sum(c["n"] for c in result["per_action"].values()) == result["n"] == len(held_out)
    assert cli(args + ["--show", "3"]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^(ok |-- )\S+ +predicted: ", printed, re.M)) == 3 and f"... {len(held_out) - 3} more" in printed
    assert re.search(r"^action accuracy: \d+/\d+ = [\d.]+%", printed, re.M)
    assert re.search(rf"^majority baseline \(always {result['majority_action']}\): \d+/{len(held_out)} = [\d.]+% on the same",
                     printed, re.M)


@pytest.mark.slow
def test_spatial_features_alone_carry_the_task_and_the_merger_learns(learned):
    """Qwen sees blank frames in both runs: only the merger's output tells where the landmark is."""
    _, _, runs, majority = learned
    (on, on_change), (off, off_change) = runs["spatial"], runs["spatial_off"]
    on_acc, off_acc = on.val[-1]["val_action_accuracy"], off.val[-1]["val_action_accuracy"]
    assert on_acc > off_acc + ACCURACY_MARGIN, (on.val, off.val)
    assert on_acc > majority + ACCURACY_MARGIN, (on.val, majority)
    assert on.val[-1]["val_loss"] < off.val[-1]["val_loss"]
    assert on_change > 0.01 and off_change == 0.0  # lam 0: the merger gets no gradient and stays as initialised
