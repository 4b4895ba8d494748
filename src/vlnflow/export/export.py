"""export_run(): one checkpoint of a training run -> one complete, loadable model directory.

The directory is written under `<OUT>.partial` and renamed to OUT only when every file
is in place, with `vlnflow_export.json` (what was exported, from where) written last,
so a crashed export is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from vlnflow.errors import UserError
from vlnflow.export import layout_hf, layout_janusvln
from vlnflow.export.consolidate import DTYPES, consolidate
from vlnflow.export.shards import DEFAULT_SHARD_SIZE, write_shards

log = logging.getLogger(__name__)

LAYOUTS = ("hf", "janusvln")
FORMAT_VERSION = 1
MARKER = "vlnflow_export.json"
RUN_CONFIG = "run_config.json"  # written into the run dir by vlnflow.train.run


def run_config(run_dir: Path, fallback: str | Path | dict | None) -> dict:
    """The run's resolved config (run_dir/run_config.json), else `fallback` (a config.yaml path or dict) validated."""
    from vlnflow.config import load_config, validate_config

    saved = Path(run_dir) / RUN_CONFIG
    if saved.is_file():
        return validate_config(json.loads(saved.read_text()))
    if fallback is None:
        raise UserError(f"{run_dir}: no {RUN_CONFIG}; pass the run's config with --config")
    return validate_config(dict(fallback)) if isinstance(fallback, dict) else load_config(fallback)


def vlnflow_settings(config: dict, layout: str, step: int, run_dir: Path, frozen_from: str) -> dict:
    """What vlnflow needs to rebuild and feed the model: model + spatial settings, fingerprint, prompt style."""
    from vlnflow.model.loading import frame_geometry, resolve_model_config
    from vlnflow.spatial.fingerprint import encoder_fingerprint, spatial_output

    model_cfg = resolve_model_config(config)
    model_cfg.pop("init_from", None)
    grid, channels = spatial_output(config["spatial"])
    geometry = frame_geometry(config)
    return {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "model": model_cfg,
        "spatial": dict(config["spatial"]),
        "encoder_fingerprint": encoder_fingerprint(config["spatial"]),
        "spatial_grid": list(grid),
        "frames": {**geometry.as_dict(), "vggt_hw": list(geometry.vggt_hw), "kept_grid": list(geometry.kept_grid),
                   "qwen_hw": list(geometry.qwen_hw), "tokens_per_frame": geometry.tokens_per_frame},
        "spatial_channels": channels,
        "prompt_style": config["dataset"].get("prompt_style", "auto"),
        "dataset_root": str(config["dataset"]["root"]),
        "val_fraction": float(config["dataset"].get("val_fraction", 0.0)),  # which episodes `predict --held-out` answers
        "source": {"run_dir": str(run_dir), "step": step, "frozen_from": frozen_from},
    }


def action_head_fields(model_cfg: dict, head: dict) -> dict:
    """config.json fields of the seed's head schedule (its ModelArguments, set on its config) when the run trained a
    head; a run with the head on whose checkpoint lacks it is an error (it would export a model without one)."""
    settings = model_cfg.get("action_head") or {}
    if not settings.get("enabled"):
        return {}
    if not head:
        raise UserError("model.action_head is enabled but the checkpoint holds no action_head.* weights")
    return {"distill_loss_weight": float(settings.get("loss_weight", 1.0)),
            "distill_loss_weight_end": settings.get("loss_weight_end"),
            "distill_loss_weight_warmup_steps": int(settings.get("loss_weight_warmup_steps", 0))}


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    layout: str = "hf",
    dtype: str = "bfloat16",
    config_path: str | Path | dict | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Export run_dir's checkpoint (newest complete one, or `step`) to `out` in `layout`; returns `out`."""
    from vlnflow.model.loading import frame_geometry, load_processors, resolve_model_config

    if layout not in LAYOUTS:
        raise UserError(f"export layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in DTYPES:
        raise UserError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"export output {out} exists and is not a vlnflow export: refusing to replace it")
    config = run_config(run_dir, config_path)
    model_cfg = resolve_model_config(config)
    torch_dtype = DTYPES[dtype]
    model = consolidate(run_dir, model_cfg, step, torch_dtype)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    settings = vlnflow_settings(config, layout, model.step, run_dir, model.frozen_from)
    extras = {
        "lam": float(model_cfg.get("lam", 0.2)),
        "reference_frame": config["spatial"].get("reference_frame", "last"),
        "vggt_merger_hidden_dim": int(model.merger["merger.mlp.0.weight"].shape[0]),
        "vlnflow": settings,
    }
    extras.update(action_head_fields(model_cfg, model.action_head))
    tensors = {**model.qwen, **model.merger, **model.action_head}
    if layout == "hf":
        layout_hf.write_config(model.qwen_config, extras, torch_dtype, partial)
    else:
        layout_janusvln.write_config(model.qwen_config, extras, torch_dtype, partial)
        if not model.action_head:
            log.warning("this run trained no action head (model.action_head.enabled false): the seed pipeline's "
                        "evaluation reads its action from one by default, so run it with use_action_head=False")
        tensors.update(layout_janusvln.vggt_tensors(config["spatial"], torch_dtype))
    index = write_shards(tensors, partial, max_shard_size)
    tokenizer, image_processor = load_processors(model_cfg, frame_geometry(config))
    tokenizer.save_pretrained(str(partial))
    image_processor.save_pretrained(str(partial))
    if layout == "janusvln":
        layout_janusvln.fix_processor_config(partial)
    marker = {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "dtype": dtype,
        "step": model.step,
        "run_dir": str(run_dir),
        "tensors": len(tensors),
        "bytes": index["metadata"]["total_size"],
        "shards": sorted(set(index["weight_map"].values())),
    }
    (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    log.info("exported %s step %d (%s, %s) to %s: %d tensors, %.1f MB", run_dir, model.step, layout, dtype, out,
             len(tensors), index["metadata"]["total_size"] / 1e6)
    return out
