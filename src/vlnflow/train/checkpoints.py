"""Checkpoints under <run>/checkpoints/step_XXXXXXX: save every N steps, keep the last K, resume the latest."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

TAG = re.compile(r"^step_(\d{7})$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished (DeepSpeed writes `latest` last; we also require our marker)."""
    if not ckpt_dir.exists():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG.match(p.name) and (p / "vlnflow_complete").exists()]
    return sorted(tags)


def latest_tag(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, is_rank0: bool,
         keep_files: tuple[Path, ...] = ()) -> None:
    """All ranks call this (ZeRO shards are per rank); rank 0 copies `keep_files` into it (the metrics
    log as of this step), marks it complete and prunes old ones."""
    import torch.distributed as dist

    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    if dist.is_initialized():
        dist.barrier()
    if is_rank0:
        for path in keep_files:
            if Path(path).exists():
                shutil.copyfile(path, ckpt_dir / tag / Path(path).name)
        (ckpt_dir / tag / "vlnflow_complete").write_text(f"{step}\n")
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        log.info("checkpoint %s saved (keeping the last %d)", tag, keep_last)
    if dist.is_initialized():
        dist.barrier()


def load_latest(engine, ckpt_dir: Path) -> dict | None:
    """Restore the newest complete checkpoint into the engine; returns its client state or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state
