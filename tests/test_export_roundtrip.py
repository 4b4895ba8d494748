"""Issue 12, items 4-7: train 2 steps (tiny models, CPU, DeepSpeed zero2) -> `vlnflow export` in both
layouts -> load -> the same logits and the same greedy answers as the training model itself.

One training subprocess is shared by the module. Its driver keeps the DeepSpeed engine and,
after training, writes what the *training* model computes: full logits on a two-sample batch
(reference.safetensors) and its greedy answers to the first samples (reference.json).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import KEEP_ENGINE, build_cache, run_trainer
from vlnflow.cli import main as cli
from vlnflow.config import deep_merge, load_config

N_DECODE = 3
MAX_NEW = 16
RTOL = 1e-5

# vlnflow.train.run's main, with deepspeed.initialize wrapped to keep the engine; afterwards the
# trained module computes the reference logits and greedy answers (fp32 on CPU).
DRIVER = KEEP_ENGINE + """
import json
from safetensors.torch import save_file
from pathlib import Path
import pandas as pd
from vlnflow.config import load_config
from vlnflow.cache.store import FeatureStore
from vlnflow.infer.predict import Predictor
from vlnflow.model.batching import Collator
from vlnflow.model.loading import frame_geometry, load_processors, resolve_model_config
from vlnflow.spatial.fingerprint import encoder_fingerprint
from vlnflow.train.spatial_source import SpatialSource
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
config = load_config(args["--config"])
model = engines[0].module.eval()
model_cfg = resolve_model_config(config)
geometry = frame_geometry(config)
tokenizer, processor = load_processors(model_cfg, geometry)
collator = Collator(tokenizer, processor, geometry, dataset_root=config["dataset"]["root"])
rows = pd.read_parquet(config["train"]["samples"]).to_dict("records")
store = FeatureStore(config["train"]["cache"])
batch = collator(rows[:2], [store.get(r["sample_id"]) for r in rows[:2]])
with torch.no_grad():
    logits = model.qwen.lm_head(model.hidden_states(batch))[0].float()
save_file({"logits": logits.contiguous()}, str(Path(args["--run-dir"]) / "reference.safetensors"))
source = SpatialSource(config, config["train"]["cache"], expected_fingerprint=encoder_fingerprint(config["spatial"]))
predictor = Predictor(model, tokenizer, collator, source, max_new_tokens=%d)
answers = [p.answer for p in predictor.predict_rows(rows[:%d])]
(Path(args["--run-dir"]) / "reference.json").write_text(json.dumps({"answers": answers}))
""" % (MAX_NEW, N_DECODE)


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """One 2-step zero2 run on the demo cache, with the training model's reference outputs."""
    work = tmp_path_factory.mktemp("export_roundtrip")
    overrides = {
        "dataset": {"root": str(demo_data / "episodes")},
        "train": {
            "samples": str(work / "index" / "samples.parquet"),
            "cache": str(work / "cache" / "manifest.json"),
            "max_steps": 2, "save_every": 2, "per_device_batch": 2, "grad_accum": 1,
            "lr": {"llm": 1e-3, "merger": 1e-2}, "loader": {"workers": 0},
        },
    }
    build_cache(overrides, work)
    (work / "overrides.json").write_text(json.dumps(overrides))
    run = run_trainer(work, "run", overrides, DRIVER)
    config = load_config(work / "run.yaml")
    reference = {"logits": load_file(str(run.dir / "reference.safetensors"))["logits"],
                 "answers": json.loads((run.dir / "reference.json").read_text())["answers"]}
    return work, run.dir, config, reference


@pytest.fixture(scope="module")
def exports(trained):
    """The run exported in fp32 by the CLI: hf in one shard, janusvln split into several."""
    work, run_dir, _, _ = trained
    out = {}
    assert cli(["export", str(run_dir), str(work / "export_hf"), "--dtype", "float32"]) == 0
    out["hf"] = work / "export_hf"
    assert cli(["export", str(run_dir), str(work / "export_janus"), "--layout", "janusvln", "--dtype", "float32",
                "--max-shard-size", "300000"]) == 0
    out["janusvln"] = work / "export_janus"
    return out


def load_exported(config: dict, model_dir: Path, **model_overrides):
    from vlnflow.model.loading import build_model, resolve_model_config
    from vlnflow.spatial.fingerprint import spatial_output

    cfg = deep_merge(config, {"model": {"init_from": str(model_dir), **model_overrides}})
    grid, channels = spatial_output(cfg["spatial"])
    return build_model(resolve_model_config(cfg), channels, grid).eval()


def batch_logits(model, config: dict) -> torch.Tensor:
    import pandas as pd

    from vlnflow.cache.store import FeatureStore
    from vlnflow.model.batching import Collator
    from vlnflow.model.loading import frame_geometry, load_processors, resolve_model_config

    model_cfg = resolve_model_config(config)
    geometry = frame_geometry(config)
    tokenizer, processor = load_processors(model_cfg, geometry)
    collator = Collator(tokenizer, processor, geometry, dataset_root=config["dataset"]["root"])
    rows = pd.read_parquet(config["train"]["samples"]).to_dict("records")[:2]
    store = FeatureStore(config["train"]["cache"])
    with torch.no_grad():
        return model.qwen.lm_head(model.hidden_states(collator(rows, [store.get(r["sample_id"]) for r in rows])))[0].float()


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max()
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= RTOL * float(scale), float((got - want).abs().max() / scale)


@pytest.mark.slow
def test_hf_layout_holds_config_shards_tokenizer_and_loads_in_transformers(trained, exports):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlnflow.spatial.fingerprint import encoder_fingerprint

    _, _, config, _ = trained
    out = exports["hf"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json", "vlnflow_export.json"} <= names
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in out.iterdir())  # no pickle
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lam"] == config["model"]["lam"] and cfg["reference_frame"] == config["spatial"]["reference_frame"]
    assert cfg["vggt_merger_hidden_dim"] == config["model"]["merger_hidden"]
    assert cfg["vlnflow"]["encoder_fingerprint"] == encoder_fingerprint(config["spatial"])
    assert cfg["vlnflow"]["spatial"]["preset"] == config["spatial"]["preset"]
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) == {"merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
                                            "merger.mlp.2.weight", "merger.mlp.2.bias"}


@pytest.mark.slow
def test_frozen_vision_weights_come_from_the_base_model(trained, exports):
    """The checkpoint has no vision tower (frozen params are excluded); the export has the base model's exactly."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vlnflow.model.model_dir import iter_tensors, weight_files
    from vlnflow.model.loading import load_qwen, resolve_model_config

    _, run_dir, config, _ = trained
    saved = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_0000002")
    assert not any(".visual." in k for k in saved) and any(k.startswith("merger.") for k in saved)
    base = load_qwen(resolve_model_config(config)).state_dict()
    out = exports["hf"]
    stored = dict(iter_tensors(out, weight_files(out), "visual."))
    assert len(stored) == sum(k.startswith("model.visual.") for k in base)
    for name, tensor in stored.items():
        assert torch.equal(tensor, base["model." + name]), name


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "janusvln"])
def test_exported_model_gives_the_training_models_logits(trained, exports, layout):
    _, _, config, reference = trained
    model = load_exported(config, exports[layout])
    assert_close(batch_logits(model, config), reference["logits"])
    without_merger = load_exported(config, exports[layout], lam=0.0)  # the merger is part of what is compared
    assert float((batch_logits(without_merger, config) - reference["logits"]).abs().max()) > 1e3 * RTOL * float(reference["logits"].abs().max())


@pytest.mark.slow
def test_janusvln_checkpoint_without_vlnflow_metadata_is_imported(trained, exports, tmp_path):
    """A JanusVLN checkpoint: same tensors and flat config, but no `vlnflow` section and no recorded digests."""
    _, _, config, reference = trained
    plain = tmp_path / "janusvln_ckpt"
    shutil.copytree(exports["janusvln"], plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["vlnflow"]
    (plain / "config.json").write_text(json.dumps(cfg))
    index = json.loads((plain / "model.safetensors.index.json").read_text())
    index["metadata"] = {"total_size": index["metadata"]["total_size"]}
    (plain / "model.safetensors.index.json").write_text(json.dumps(index))
    (plain / "vlnflow_export.json").unlink()
    assert_close(batch_logits(load_exported(config, plain), config), reference["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "janusvln"])
def test_predict_on_the_export_gives_the_training_models_greedy_answers(trained, exports, layout, capsys):
    """hf reads the cache; janusvln computes VGGT live from the export's own vggt.aggregator weights."""
    work, _, config, reference = trained
    args = ["predict", "--model", str(exports[layout]), "--samples", config["train"]["samples"], "--max-new-tokens", str(MAX_NEW)]
    if layout == "hf":
        args += ["--cache", config["train"]["cache"]]
    capsys.readouterr()
    assert cli(args + ["--n", str(N_DECODE), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["answer"] for s in result["samples"]] == reference["answers"]
    assert {s["spatial"] for s in result["samples"]} == {"cached" if layout == "hf" else "live"}
    assert result["n"] == N_DECODE and 0 <= result["action_accuracy"] <= 1
    assert all(s["label_action"] in ("STOP", "MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT") for s in result["samples"])
    assert cli(args + ["--n", "1"]) == 0
    assert re.search(r"^action accuracy: \d+/1 = [\d.]+%", capsys.readouterr().out, re.M)


@pytest.mark.slow
def test_corrupt_or_truncated_shard_is_an_error_naming_the_file(trained, exports, tmp_path):
    from vlnflow.errors import UserError
    from vlnflow.infer.predict import Predictor

    _, _, config, _ = trained
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exports["janusvln"], corrupt)
    shard = sorted(corrupt.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: only the digest can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=re.escape(str(shard)) + ".*corrupt"):
        load_exported(config, corrupt)

    truncated = tmp_path / "truncated"
    shutil.copytree(exports["hf"], truncated)
    index = json.loads((truncated / "model.safetensors.index.json").read_text())
    index["metadata"].pop("vlnflow_sha256")  # as in a checkpoint without digests: the file itself must be checked
    (truncated / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = truncated / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=re.escape(str(shard))):
        load_exported(config, truncated)
    with pytest.raises(UserError, match=re.escape(str(shard))):
        Predictor.from_export(truncated)


# JanusVLN's tensor names, derived from MIV-XJTU/JanusVLN src/qwen_vl/model/modeling_qwen2_5_vl.py
# (class Qwen2_5_VLForConditionalGenerationForJanusVLN: attributes visual / vggt / merger / model / lm_head;
# Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionBlock, Qwen2_5_VLPatchMerger, VGGTMerger,
# Qwen2_5_VLModel, Qwen2_5_VLDecoderLayer) and src/qwen_vl/model/vggt/models/{vggt,aggregator}.py
# (VGGT.aggregator: camera_token, register_token, patch_embed (DINOv2), frame_blocks, global_blocks).
JANUSVLN_KEY_PATTERNS = [
    r"model\.embed_tokens\.weight",
    r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)",
    r"model\.layers\.\d+\.self_attn\.o_proj\.weight",
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"visual\.patch_embed\.proj\.weight",
    r"visual\.blocks\.\d+\.norm[12]\.weight",
    r"visual\.blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)",
    r"visual\.blocks\.\d+\.mlp\.(gate|up|down)_proj\.(weight|bias)",
    r"visual\.merger\.ln_q\.weight",
    r"visual\.merger\.mlp\.[02]\.(weight|bias)",
    r"merger\.ln_q\.weight",
    r"merger\.mlp\.[02]\.(weight|bias)",
    r"vggt\.aggregator\.(camera_token|register_token)",
    r"vggt\.aggregator\.patch_embed\..+",
    r"vggt\.aggregator\.(frame|global)_blocks\.\d+\..+",
]
# config fields its code reads: flat text config (transformers 4.50), vision_config, and JanusVLN's own
JANUSVLN_CONFIG_FIELDS = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                          "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "vision_config",
                          "image_token_id", "vggt_merger_hidden_dim", "reference_frame", "lam")


@pytest.mark.slow
def test_janusvln_layout_has_janusvlns_key_set_and_config_fields(trained, exports):
    from vlnflow.model.model_dir import iter_tensors, weight_files
    from vlnflow.spatial import SpatialEncoder

    _, _, config, _ = trained
    out = exports["janusvln"]
    weight_map = weight_files(out)
    assert len(set(weight_map.values())) > 1  # split into several shards
    patterns = [re.compile(p) for p in JANUSVLN_KEY_PATTERNS]
    unmatched = [k for k in weight_map if not any(p.fullmatch(k) for p in patterns)]
    assert unmatched == []
    assert all(any(p.fullmatch(k) for k in weight_map) for p in patterns), "a JanusVLN tensor group is missing"
    cfg = json.loads((out / "config.json").read_text())
    assert [f for f in JANUSVLN_CONFIG_FIELDS if f not in cfg] == []
    assert "text_config" not in cfg and cfg["model_type"] == "qwen2_5_vl"
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGenerationForJanusVLN"]
    assert cfg["rope_scaling"]["type"] == "mrope" and len(cfg["rope_scaling"]["mrope_section"]) == 3
    layers = {int(m.group(1)) for k in weight_map if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert layers == set(range(cfg["num_hidden_layers"]))
    vision = json.loads((out / "preprocessor_config.json").read_text())
    assert vision["image_processor_type"] == "Qwen2VLImageProcessor"
    # VGGTMerger(output_dim=hidden_size, hidden_dim=vggt_merger_hidden_dim, context_dim=C): mlp.0 is [hidden, 4C]
    merger = dict(iter_tensors(out, weight_map, "merger."))
    channels = cfg["vlnflow"]["spatial_channels"]
    assert tuple(merger["merger.mlp.0.weight"].shape) == (cfg["vggt_merger_hidden_dim"], 4 * channels)
    assert tuple(merger["merger.mlp.2.weight"].shape) == (cfg["hidden_size"], cfg["vggt_merger_hidden_dim"])
    # vggt.aggregator.* are the weights the run's spatial encoder used (seeded random init on the demo)
    encoder = SpatialEncoder.from_config(config["spatial"]).model.state_dict()
    stored = dict(iter_tensors(out, weight_map, "vggt.aggregator."))
    assert set(stored) == {"vggt.aggregator." + k for k in encoder}
    assert all(torch.equal(stored["vggt.aggregator." + k], v.float()) for k, v in encoder.items())


@pytest.mark.slow
def test_export_refuses_a_missing_step_and_an_incomplete_checkpoint(trained, tmp_path):
    from vlnflow.errors import UserError
    from vlnflow.export.export import export_run

    _, run_dir, _, _ = trained
    with pytest.raises(UserError, match="no complete checkpoint for step 1; complete ones: step_0000002"):
        export_run(run_dir, tmp_path / "out", step=1)
    half = tmp_path / "half_run"
    (half / "checkpoints" / "step_0000002").mkdir(parents=True)
    shutil.copy(run_dir / "run_config.json", half / "run_config.json")
    with pytest.raises(UserError, match="no complete checkpoint"):
        export_run(half, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a vlnflow export: refusing to replace it"):
        export_run(run_dir, busy)
    assert (busy / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_crop_end_to_end_and_a_pad_cache_is_refused(demo_data, workflow_copy):
    """Snakemake on the demo with crop frames: index -> precompute -> validate -> train 2 steps -> export;
    the export records crop and `vlnflow predict` reads it; a cache built from pad frames is refused by the run."""
    import shutil
    import subprocess
    import sys

    from vlnflow.errors import UserError
    from vlnflow.spatial.fingerprint import encoder_fingerprint
    from vlnflow.train.spatial_source import SpatialSource

    workflow_copy.configure({
        "dataset": {"root": str(demo_data / "episodes")},
        "spatial": {"preprocess": "pad"},
        "train": {"max_steps": 2, "save_every": 2, "per_device_batch": 2, "grad_accum": 1},
    })
    workflow_copy.snakemake("precompute_all", cores=2)
    pad_cache = workflow_copy.path / "results" / "cache_pad"
    shutil.copytree(workflow_copy.path / "results" / "cache", pad_cache)
    assert json.loads((pad_cache / "manifest.json").read_text())["feature_shape"][0] == 16  # 4x4 pad grid at 56
    workflow_copy.configure({"spatial": {"preprocess": "crop"}})
    workflow_copy.snakemake("export", cores=2)  # every shard recomputed for crop, then train and export
    manifest = json.loads((workflow_copy.path / "results" / "cache" / "manifest.json").read_text())
    assert manifest["grid"] == [2, 4] and manifest["feature_shape"][0] == 8  # 42x56 crop input, 2x4 merge blocks
    out = workflow_copy.path / "results" / "export" / "demo"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "preprocessor_config.json"} <= names
    assert any(n.startswith("model-") and n.endswith(".safetensors") for n in names)
    assert json.loads((out / "vlnflow_export.json").read_text())["step"] == 2
    settings = json.loads((out / "config.json").read_text())["vlnflow"]
    assert settings["spatial"]["preprocess"] == "crop"
    assert settings["frames"]["qwen_hw"] == [28, 56] and settings["frames"]["tokens_per_frame"] == 2
    proc = subprocess.run([str(Path(sys.executable).parent / "vlnflow"), "predict", "--model", str(out), "--n", "2",
                           "--max-new-tokens", "4"], cwd=workflow_copy.path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^action accuracy: \d+/2 = ", proc.stdout, re.M), proc.stdout
    config = load_config(workflow_copy.path / "config.yaml")
    with pytest.raises(UserError, match="was built by encoder .* but this run's spatial settings give"):
        SpatialSource(config, pad_cache / "manifest.json", expected_fingerprint=encoder_fingerprint(config["spatial"]))


@pytest.mark.slow
def test_zero3_checkpoint_exports_the_same_weights_as_zero2(trained, exports):
    """ZeRO-3 partitions every parameter; DeepSpeed's consolidation gathers them: same model as the zero2 run."""
    from vlnflow.model.model_dir import iter_tensors, weight_files

    work, _, _, _ = trained
    overrides = deep_merge(json.loads((work / "overrides.json").read_text()), {"train": {"deepspeed": "zero3"}})
    run = run_trainer(work, "run_zero3", overrides, "import sys\nfrom vlnflow.train.run import main\nsys.exit(main(sys.argv[1:]))\n")
    out = work / "export_zero3"
    assert cli(["export", str(run.dir), str(out), "--dtype", "float32"]) == 0
    got = dict(iter_tensors(out, weight_files(out)))
    want = dict(iter_tensors(exports["hf"], weight_files(exports["hf"])))
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, rtol=1e-3, atol=1e-4), name
