"""Where a training sample's Qwen vision rows come from: the per-frame vision cache, or the live tower.

With cache.vision, a sample whose frames the cache all holds carries their rows (read in the DataLoader
worker); its images are neither decoded nor processed, and the model runs only `visual.merger` on them
(vlnflow.model.vision_rows). Any other sample runs the tower live, as without the cache. The cache is
refused when its fingerprint (settings) or tower digest (the weights as built) differs from this run's,
and when the vision blocks train.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlnflow.cache.vision_fingerprint import check_trainable, enabled, vision_fingerprint
from vlnflow.errors import UserError

log = logging.getLogger(__name__)


class VisionSource:
    """rows(frames) -> list of [P, C] tensors, one per frame, or None unless the cache holds every frame."""

    def __init__(self, manifest: str | Path, *, expected_fingerprint: str, tower_digest: str, allow_mismatch: bool = False):
        from vlnflow.cache.store import FeatureStore

        if not Path(manifest).exists():
            raise UserError(f"train.vision_cache is {manifest}, which does not exist: run `snakemake vision_cache_all` "
                            f"first, or set cache.vision: false to run Qwen's vision tower live")
        store = FeatureStore(manifest)
        problems = []
        if store.encoder_fingerprint != expected_fingerprint:
            problems.append(f"vision cache {manifest} was built with vision fingerprint {store.encoder_fingerprint}, but this "
                            f"run's settings (model weights, vision config, image processor, frame geometry, model.dtype) "
                            f"give {expected_fingerprint}")
        stored_digest = store.manifest.get("tower_digest")
        if stored_digest != tower_digest:
            problems.append(f"vision cache {manifest} was written by a tower with weights digest {stored_digest}, but this "
                            f"run's tower (as built on this device, in this dtype) has {tower_digest}")
        if problems:
            message = "; ".join(problems) + ": rebuild it (snakemake vision_cache_all) or set cache.vision: false"
            if not allow_mismatch:
                raise UserError(message)
            log.warning("%s (train.allow_fingerprint_mismatch set: using it anyway)", message)
        self.store = store
        self.manifest = Path(manifest)
        log.info("[INFO] vision cache enabled: %s (%d frames, %s)", manifest, len(store), store.dtype)

    def rows(self, frames) -> list[torch.Tensor] | None:
        """Every frame's cached rows (called in DataLoader workers), or None when one is missing."""
        out = []
        for rel in frames:
            rows = self.store.get(str(rel))
            if rows is None:
                return None
            out.append(rows)
        return out


def build_vision_source(config: dict, model) -> VisionSource | None:
    """The run's VisionSource when cache.vision is on (whether VGGT is cached or live), else None (tower live)."""
    if not enabled(config):
        log.info("[INFO] vision cache disabled: Qwen's vision tower runs for every frame")
        return None
    tcfg = config["train"]
    check_trainable(config["model"], tcfg["lr"]["vision"])
    if getattr(model, "vision_grad", False) and any(p.requires_grad for n, p in model.visual.named_parameters()
                                                    if not n.startswith("merger.")):
        raise UserError("cache.vision is true but the model's vision blocks require gradients: they must be frozen")
    from vlnflow.model.vision_rows import tower_digest

    return VisionSource(tcfg["vision_cache"], expected_fingerprint=vision_fingerprint(config),
                        tower_digest=tower_digest(model.visual), allow_mismatch=tcfg["allow_fingerprint_mismatch"])
