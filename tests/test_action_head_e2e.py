"""Issue 26, end to end on the demo (tiny models, CPU, DeepSpeed zero2): a short run with the seed's action head
and non-uniform segment weights -> its loss terms in metrics.jsonl, TensorBoard and the report's plot ->
`vlnflow export` in both layouts (the head under the seed's key names) -> `model.init_from` restores the head
bit-identically -> `vlnflow predict --head action` gives the training model's head answers.

One training subprocess is shared by the module; its driver keeps the DeepSpeed engine and writes what the
*training* model's head holds and computes on the first samples (reference.safetensors).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import KEEP_ENGINE, build_cache, run_trainer
from vlnflow.cli import main as cli
from vlnflow.config import deep_merge, load_config

STEPS, N = 10, 4
HEAD_KEYS = {f"action_head.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias")}  # the seed's names

DRIVER = KEEP_ENGINE + """
from safetensors.torch import save_file
from pathlib import Path
import pandas as pd
from vlnflow.config import load_config
from vlnflow.cache.store import FeatureStore
from vlnflow.model.batching import Collator
from vlnflow.model.loading import frame_geometry, load_processors, resolve_model_config
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
config = load_config(args["--config"])
model = engines[0].module.eval()
geometry = frame_geometry(config)
tokenizer, processor = load_processors(resolve_model_config(config), geometry)
collator = Collator(tokenizer, processor, geometry, dataset_root=config["dataset"]["root"])
rows = pd.read_parquet(config["train"]["samples"]).to_dict("records")[:%d]
store = FeatureStore(config["train"]["cache"])
batch = collator(rows, [store.get(r["sample_id"]) for r in rows])  # training batch: answers included
with torch.no_grad():
    logits = model.action_logits(batch).float()
state = {"head." + k: v.detach().float().contiguous() for k, v in model.action_head.state_dict().items()}
save_file({"logits": logits.contiguous(), **state}, str(Path(args["--run-dir"]) / "reference.safetensors"))
""" % N


def overrides(demo, work) -> dict:
    return {
        "dataset": {"root": str(demo / "episodes"), "val_fraction": 0.02},
        "model": {"action_head": {"enabled": True, "loss_weight": 2.0, "loss_weight_end": 1.0, "loss_weight_warmup_steps": 4},
                  "segment_weights": {"description_2d": 0.5, "action": 2.0}},
        "train": {
            "samples": str(work / "index" / "samples.parquet"), "cache": str(work / "cache" / "manifest.json"),
            "max_steps": STEPS, "save_every": STEPS, "per_device_batch": 4, "grad_accum": 2, "tensorboard": True,
            "lr": {"llm": 3e-4, "merger": 1e-2}, "loader": {"workers": 0},
        },
    }


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("action_head")
    build_cache(overrides(demo_data, work), work)
    run = run_trainer(work, "head", overrides(demo_data, work), DRIVER)
    reference = load_file(str(run.dir / "reference.safetensors"))
    return work, run, load_config(work / "head.yaml"), reference


@pytest.fixture(scope="module")
def exports(trained):
    work, run, _, _ = trained
    out = {}
    for layout in ("hf", "janusvln"):
        out[layout] = work / f"export_{layout}"
        assert cli(["export", str(run.dir), str(out[layout]), "--layout", layout, "--dtype", "float32"]) == 0
    return out


@pytest.mark.slow
def test_demo_run_logs_the_loss_parts_and_the_head_loss_falls(trained, tmp_path):
    from matplotlib.figure import Figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlnflow.report.plot import _plot_loss_parts
    from vlnflow.report.sources import read_metrics

    _, run, _, _ = trained
    steps = run.metrics
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for m in steps:
        for key in ("loss_text_total", "loss_action_head", "loss_subinstruction", "loss_2d", "loss_3d", "loss_action"):
            assert key in m, (key, m)
        assert m["loss"] == pytest.approx(m["loss_text_total"] + m["action_head_weight"] * m["loss_action_head"], rel=1e-5)
    assert [m["action_head_weight"] for m in steps] == pytest.approx([2.0, 1.75, 1.5, 1.25] + [1.0] * (STEPS - 4))
    head = [m["loss_action_head"] for m in steps]
    assert sum(head[-3:]) / 3 < sum(head[:3]) / 3, head  # the head learns
    assert 0.0 <= run.val[-1]["val_action_head_accuracy"] <= 1.0
    acc = EventAccumulator(str(run.dir / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss_action_head")] == pytest.approx(head)
    assert "train/loss_2d" in acc.Tags()["scalars"] and "eval/action_head_accuracy" in acc.Tags()["scalars"]
    ax = Figure().subplots()
    _plot_loss_parts(ax, {"cached features": read_metrics(run.dir / "metrics.jsonl")})
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert {"text (weighted)", "action head", "SUBINSTRUCTION", "2D_DESCRIPTION", "3D_DESCRIPTION", "ACTION"} <= set(lines)
    assert lines["action head"] == pytest.approx(head)


@pytest.mark.slow
def test_exports_keep_the_head_under_the_seeds_names(trained, exports):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlnflow.model.model_dir import iter_tensors, weight_files

    _, _, _, reference = trained
    for layout, out in exports.items():
        stored = dict(iter_tensors(out, weight_files(out), "action_head."))
        assert set(stored) == HEAD_KEYS, layout
        assert all(torch.equal(stored[k], reference["head." + k.removeprefix("action_head.")]) for k in HEAD_KEYS)
    cfg = json.loads((exports["janusvln"] / "config.json").read_text())
    assert (cfg["distill_loss_weight"], cfg["distill_loss_weight_end"], cfg["distill_loss_weight_warmup_steps"]) == (2.0, 1.0, 4)
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(exports["hf"], output_loading_info=True)
    assert not info["missing_keys"] and {k for k in info["unexpected_keys"] if not k.startswith("merger.")} == HEAD_KEYS


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "janusvln"])
def test_init_from_restores_the_head_and_predict_reads_it(trained, exports, layout, capsys):
    """model.init_from: the head bit-identical to the training model's; `predict --head action` (one forward at the
    last prompt token) gives the training model's head answers on the same samples, next to the decoded ones."""
    import pandas as pd

    from vlnflow.data.vocabulary import ACTIONS
    from vlnflow.infer.predict import Predictor
    from vlnflow.model.loading import build_model, resolve_model_config
    from vlnflow.spatial.fingerprint import spatial_output

    _, _, config, reference = trained
    cfg = deep_merge(config, {"model": {"init_from": str(exports[layout])}})
    grid, channels = spatial_output(cfg["spatial"])
    model = build_model(resolve_model_config(cfg), channels, grid)
    for key, value in model.action_head.state_dict().items():
        assert torch.equal(value, reference["head." + key]), key

    predictor = Predictor.from_export(exports[layout], cache=config["train"]["cache"])
    assert predictor.head == "action"  # the default for a model with a head
    from vlnflow.infer.generate import prompt_only
    from vlnflow.train.data import TrainSamples

    rows = pd.read_parquet(config["train"]["samples"]).to_dict("records")[:N]
    samples = TrainSamples(pd.DataFrame(rows), predictor.collator, predictor.source, predictor.root)
    prompts = [prompt_only(samples[i].encoded)[0] for i in range(N)]
    with torch.no_grad():
        logits = predictor.model.action_logits(predictor.collator.pack(prompts, [samples[i].features for i in range(N)]))
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-5)

    args = ["predict", "--model", str(exports[layout]), "--samples", config["train"]["samples"], "--cache",
            config["train"]["cache"], "--n", str(N), "--max-new-tokens", "4", "--json"]
    capsys.readouterr()
    assert cli(args + ["--head", "action"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["head_action"] for s in result["samples"]] == [ACTIONS[i] for i in reference["logits"].argmax(-1).tolist()]
    assert result["head_action_accuracy"] == sum(s["head_correct"] for s in result["samples"]) / N
    assert result["head_mean_seconds"] > 0 and result["text_mean_seconds"] > 0 and 0 <= result["action_accuracy"] <= 1
    assert cli(args + ["--head", "text"]) == 0
    text_only = json.loads(capsys.readouterr().out)
    assert "head_action_accuracy" not in text_only and all(s["head_action"] is None for s in text_only["samples"])
    assert [s["answer"] for s in text_only["samples"]] == [s["answer"] for s in result["samples"]]
    assert cli(args[:-1] + ["--head", "action", "--n", "2"]) == 0
    printed = capsys.readouterr().out
    assert "head: " in printed and "(one forward pass)" in printed and "(greedy decoding" in printed
