"""Every shipped config file validates against the schema (a typo there would only show on the cluster)."""

from pathlib import Path

import pytest

from vlnflow.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [ROOT / "config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))], ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    config = load_config(path)
    assert config["train"]["deepspeed"] in ("zero2_offload", "zero2", "zero3")


# The cluster presets stand alone; configs/demo_sources.yaml is an overlay on the demo by design.
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*_h800.yaml")), ids=lambda p: p.name)
def test_demo_settings_do_not_leak_into_a_preset(path):
    """`snakemake --configfile configs/X.yaml` merges X over config.yaml: every setting of the run must be X's own
    (or the schema default), none the demo's (e.g. its warmup, a ratio there because train.warmup_steps would
    win over a preset's warmup_ratio). Only the tiny models' sizes, unused by the presets' real models, may differ."""
    import copy

    import yaml

    from vlnflow.config import deep_merge, validate_config

    demo, preset = (yaml.safe_load((p).read_text()) for p in (ROOT / "config.yaml", path))
    alone = validate_config(copy.deepcopy(preset))
    merged = validate_config(deep_merge(demo, preset))
    real = alone["model"]["qwen_path"] or alone["model"]["init_from"] or alone["model"]["preset"] != "tiny"
    assert real  # a real model (or an export to start from): the tiny sizes are indeed unused
    for config in (alone, merged):
        config["model"].pop("tiny")
    assert merged == alone


def test_bad_setting_names_the_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  deepspeed: zero4\n")
    with pytest.raises(ConfigError, match="train.deepspeed"):
        load_config(bad)


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("spatial:\n  layers: -2\n")
    with pytest.raises(ConfigError, match="layers"):
        load_config(bad)


# ---- JanusVLN's published recipe (scripts/train.sh of MIV-XJTU/JanusVLN) ----------------------------

# Each flag of JanusVLN's scripts/train.sh that sets the optimisation, and the vlnflow setting that mirrors it.
# max_grad_norm is HF's default (train.sh does not set it); 0.125 = 1.0 / 8 because JanusVLN's gradient is
# the SUM of its 8 micro-batch means (see the config's header).
JANUSVLN_FLAGS = {
    "--tune_mm_vision False": ("model.freeze_vision", True),
    "--tune_mm_mlp True": ("model.train_visual_merger", True),
    "--learning_rate 2e-5": ("train.lr.llm", 2.0e-5),
    "--mm_projector_lr 1e-5": ("train.lr.merger", 1.0e-5),
    "--vision_tower_lr 1e-6 (frozen blocks: reaches nothing)": ("train.lr.vision", 0.0),
    "--weight_decay 0.01": ("train.weight_decay", 0.01),
    "--warmup_ratio 0.03": ("train.warmup_ratio", 0.03),
    "--num_train_epochs 1": ("train.epochs", 1),
    "--seed 42": ("train.seed", 42),
    "--per_device_train_batch_size 1": ("train.per_device_batch", 1),
    "--gradient_accumulation_steps 8": ("train.grad_accum", 8),
    "max_grad_norm 1.0 (HF default) on an 8x gradient": ("train.grad_clip", 0.125),
    "--bf16": ("train.bf16", True),
    "--reference_frame first": ("spatial.reference_frame", "first"),
    "lam 0.2 (ModelArguments default)": ("model.lam", 0.2),
    "no action head (upstream's model has none)": ("model.action_head.enabled", False),
}


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_r2r_config_reproduces_janusvln_train_sh():
    path = ROOT / "configs" / "janusvln_r2r_h800.yaml"
    config = load_config(path)
    header = path.read_text().split("\ndataset:", 1)[0]
    for flag, (key, value) in JANUSVLN_FLAGS.items():
        assert _get(config, key) == value, (flag, key, _get(config, key))
        assert key.rsplit(".", 1)[-1] in header, f"the config's header does not name {key} ({flag})"
    assert config["train"]["max_steps"] is None  # the epoch decides the length, as --num_train_epochs does
    assert config["train"]["grad_clip"] * config["train"]["grad_accum"] == 1.0  # = HF's max_grad_norm
    assert config["dataset"]["val_fraction"] == 0.01 and config["train"]["eval_every"] >= 1
    for flag in ("--tune_mm_mlp True", "--mm_projector_lr 1e-5", "--weight_decay 0.01", "--warmup_ratio 0.03",
                 "--reference_frame first", "--gradient_accumulation_steps 8", "max_grad_norm"):
        assert flag in header, flag


# The seed pipeline's scripts/train_h800.sh (shaoxiang/NewJanusVLN), flag -> vlnflow setting.
SEED_FLAGS = {
    "--tune_mm_vision False": ("model.freeze_vision", True),
    "--tune_mm_mlp True": ("model.train_visual_merger", True),
    "LEARNING_RATE=2e-5": ("train.lr.llm", 2.0e-5),
    "--mm_projector_lr 1e-5": ("train.lr.merger", 1.0e-5),
    "--vision_tower_lr 1e-6 (frozen blocks: reaches nothing)": ("train.lr.vision", 0.0),
    "no --weight_decay (HF default 0.0)": ("train.weight_decay", 0.0),
    "--warmup_ratio 0.03": ("train.warmup_ratio", 0.03),
    "NUM_EPOCHS=3": ("train.epochs", 3),
    "no --seed (HF default 42)": ("train.seed", 42),
    "PER_DEVICE_BATCH=1": ("train.per_device_batch", 1),
    "GRAD_ACCUM_STEPS=8": ("train.grad_accum", 8),
    "max_grad_norm 1.0 (HF default) on an 8x gradient": ("train.grad_clip", 0.125),
    "--bf16 True": ("train.bf16", True),
    "SAVE_STEPS=1000": ("train.save_every", 1000),
    "SAVE_TOTAL_LIMIT=4": ("train.keep_last", 4),
    "reference_frame default last": ("spatial.reference_frame", "last"),
    "lam 0.2 (ModelArguments default)": ("model.lam", 0.2),
    "action_head always built and trained": ("model.action_head.enabled", True),
    "DISTILL_LOSS_WEIGHT=1.0": ("model.action_head.loss_weight", 1.0),
    "DISTILL_LOSS_WEIGHT_END unset": ("model.action_head.loss_weight_end", None),
    "DISTILL_LOSS_WEIGHT_WARMUP_STEPS=0": ("model.action_head.loss_weight_warmup_steps", 0),
    "subinstruction_weight default 1.0": ("model.segment_weights.subinstruction", 1.0),
    "desc2d_weight default 1.0": ("model.segment_weights.description_2d", 1.0),
    "desc3d_weight default 1.0": ("model.segment_weights.description_3d", 1.0),
    "action_weight default 1.0": ("model.segment_weights.action", 1.0),
}

# What each preset's samples and frames are: (spatial.preprocess, history.pad, reference frame, prompt style).
PRESET_SAMPLES = {
    "janusvln_r2r_h800.yaml": ("crop", "none", "first", "action"),  # upstream create_data.py + data_qwen.py
    "janusvln_base_h800.yaml": ("crop", "none", "first", "action"),
    "janusvln_extra_h800.yaml": ("crop", "none", "first", "action"),
    "seed_r2r_h800.yaml": ("pad", "repeat_first", "last", "descriptions"),  # the seed's vln_data.py
}


def test_seed_config_reproduces_the_seed_train_h800_sh():
    path = ROOT / "configs" / "seed_r2r_h800.yaml"
    config = load_config(path)
    header = path.read_text().split("\ndataset:", 1)[0]
    for flag, (key, value) in SEED_FLAGS.items():
        assert _get(config, key) == value, (flag, key, _get(config, key))
        assert key.rsplit(".", 1)[-1] in header, f"the config's header does not name {key} ({flag})"
    assert config["train"]["grad_clip"] * config["train"]["grad_accum"] == 1.0


@pytest.mark.parametrize("name", sorted(PRESET_SAMPLES))
def test_presets_prepare_samples_and_frames_as_the_code_they_mirror(name):
    """Both presets run 640x480 R2R-CE frames at 644: crop -> 34x46 kept patches (391 tokens per frame), pad ->
    46x46 (529); the header of each says which evaluation mode JanusVLN uses."""
    from vlnflow.model.loading import frame_geometry

    path = ROOT / "configs" / name
    config = load_config(path)
    preprocess, pad, reference, style = PRESET_SAMPLES[name]
    assert (config["spatial"]["preprocess"], config["history"]["pad"], config["spatial"]["reference_frame"],
            config["dataset"]["prompt_style"]) == (preprocess, pad, reference, style)
    geometry = frame_geometry(config)
    assert geometry.tokens_per_frame == {"crop": 391, "pad": 529}[preprocess]
    header = path.read_text().split("\ndataset:", 1)[0]
    assert "crop" in header and "evaluation" in header  # says what JanusVLN's evaluation feeds


def test_recipe_reaches_the_optimizer_and_deepspeed():
    """Parameter groups, rates, weight-decay exclusions, warmup and clipping as the trainer builds them."""
    import torch

    from vlnflow.model.loading import build_model, resolve_model_config
    from vlnflow.spatial.fingerprint import spatial_output
    from vlnflow.train.deepspeed_config import build_ds_config
    from vlnflow.train.setup import param_groups, warmup_steps

    recipe = load_config(ROOT / "configs" / "janusvln_r2r_h800.yaml")
    demo = load_config(ROOT / "config.yaml")
    model_cfg = resolve_model_config({**demo, "model": {**demo["model"], "train_visual_merger": True}})
    grid, channels = spatial_output(demo["spatial"])
    model = build_model(model_cfg, channels, grid)
    t = recipe["train"]
    groups = {g["name"]: g for g in param_groups(model, t["lr"], t["weight_decay"])}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert set(groups) == {"llm", "llm_no_decay", "merger", "merger_no_decay"}
    assert [groups[k]["lr"] for k in ("llm", "llm_no_decay")] == [2.0e-5, 2.0e-5]
    assert [groups[k]["lr"] for k in ("merger", "merger_no_decay")] == [1.0e-5, 1.0e-5]
    assert groups["llm"]["weight_decay"] == groups["merger"]["weight_decay"] == 0.01
    assert groups["llm_no_decay"]["weight_decay"] == groups["merger_no_decay"]["weight_decay"] == 0.0
    merger_names = by_group["merger"] | by_group["merger_no_decay"]
    assert any(n.startswith("merger.") for n in merger_names)  # the VGGT merger
    assert any(n.startswith("qwen.model.visual.merger.") for n in merger_names)  # Qwen's own patch merger
    assert all("merger" in n for n in merger_names)
    # vision blocks frozen and in no group; the visual merger trainable
    for name, p in model.named_parameters():
        if name.startswith("qwen.model.visual."):
            assert p.requires_grad == (".merger." in name), name
    # biases undecayed, RMSNorm weights decayed (HF's rule: only nn.LayerNorm and "bias" are excluded)
    decayed = by_group["llm"] | by_group["merger"]
    assert all("bias" in n for n in by_group["llm_no_decay"] | by_group["merger_no_decay"])
    assert any("norm" in n or "ln_q" in n for n in decayed) and not any("bias" in n for n in decayed)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())  # nothing else to exclude here
    ds = build_ds_config({**t, "bf16": False}, world_size=8, cpu=False)
    assert ds["gradient_clipping"] == 0.125
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 8, 64)
    assert warmup_steps(t, total=1000) == 30 and warmup_steps(t, total=1001) == 31  # ceil(0.03 x total), as HF
    assert warmup_steps({**t, "warmup_steps": 5}, total=1000) == 5  # explicit steps win, as HF


# ---- JanusVLN's two stages: scripts/train.sh (Base) and scripts/train_extra.sh (Extra) --------------------------

STAGE_SOURCES = {"janusvln_base_h800.yaml": ["r2r", "rxr"], "janusvln_extra_h800.yaml": ["r2r", "rxr", "dagger_r2r", "dagger_rxr", "scalevln"]}
# train_extra.sh differs from train.sh in these three lines only; every flag of JANUSVLN_FLAGS is the same in both.
EXTRA_ONLY = {
    'MODEL_PATH="JanusVLN_Base"': "model.init_from",
    'DATASETS="train_r2r_rxr_extra"': "dataset.sources",
    'OUTPUT_DIR="./JanusVLN_Extra"': "train.run",
}


@pytest.mark.parametrize("name", sorted(STAGE_SOURCES))
def test_stage_presets_reproduce_the_scripts(name):
    path = ROOT / "configs" / name
    config = load_config(path)
    header = path.read_text().split("\ndataset:", 1)[0]
    for flag, (key, value) in JANUSVLN_FLAGS.items():
        assert _get(config, key) == value, (name, flag, key, _get(config, key))
        assert key.rsplit(".", 1)[-1] in header, f"{name}: the header does not name {key} ({flag})"
    assert config["train"]["max_steps"] is None and config["train"]["grad_clip"] * config["train"]["grad_accum"] == 1.0
    assert [s["name"] for s in config["dataset"]["sources"]] == STAGE_SOURCES[name]
    assert all("rate" not in s for s in config["dataset"]["sources"])  # train_extra.sh samples no source (no %N)
    assert config["export"]["layout"] == "janusvln"  # upstream's dagger.sh / evaluation.py load the export
    if name == "janusvln_extra_h800.yaml":
        for flag, key in EXTRA_ONLY.items():
            assert flag in header and key.rsplit(".", 1)[-1] in header, (flag, key)
        assert config["model"]["init_from"] == "results/export/base_h800" and config["model"]["qwen_path"] is None
        assert config["train"]["run"] == "extra_h800"
    else:
        assert config["model"]["init_from"] is None and config["model"]["qwen_path"]
        assert config["train"]["run"] == "base_h800"


def test_stage_presets_share_the_base_sources_index_shards_and_cache():
    """The Extra stage adds sources without changing the Base's: same source entries, index settings, shard
    counts and encoder, so the Base's r2r.* and rxr.* shard files and cache rows stay valid."""
    from vlnflow.workflow.helpers import index_settings_param, shard_settings_param

    base = load_config(ROOT / "configs" / "janusvln_base_h800.yaml")
    extra = load_config(ROOT / "configs" / "janusvln_extra_h800.yaml")
    assert extra["dataset"]["sources"][:2] == base["dataset"]["sources"]
    for key in ("root", "seed", "prompt_style", "val_fraction", "on_error"):
        assert base["dataset"][key] == extra["dataset"][key], key
    for section in ("history", "shards", "spatial", "cache"):  # spatial equal: the same encoder fingerprint
        assert base[section] == extra[section], section
    b, e = index_settings_param(base), index_settings_param(extra)
    assert e["sources"][:2] == b["sources"] and {k: v for k, v in b.items() if k != "sources"} == {k: v for k, v in e.items() if k != "sources"}
    assert shard_settings_param(extra)["sources"]["r2r"] == shard_settings_param(base)["sources"]["r2r"]
    # the extra model starts from the base's export
    assert extra["model"]["init_from"] == f"results/export/{base['train']['run']}"
