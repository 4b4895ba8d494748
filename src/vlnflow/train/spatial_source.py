"""Where a training sample's VGGT features come from: the cache, or a live encoder as fallback.

The live encoder is built only when the first sample is missing from the cache, so a
run over a complete cache never loads VGGT (less GPU memory per rank).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlnflow.errors import UserError

log = logging.getLogger(__name__)


class SpatialSource:
    """features(row) -> [P, C] tensor; counts cached and live samples."""

    def __init__(self, config: dict, manifest: str | Path | None, *, expected_fingerprint: str, allow_mismatch: bool = False,
                 encoder=None):
        """`encoder`: a ready SpatialEncoder to use for live samples (default: built from config['spatial'] on first use)."""
        self.config = config
        self.store = None
        self.cached = 0
        self.live = 0
        self._encoder = encoder
        if manifest is not None and not Path(manifest).exists():
            raise UserError(
                f"train.cache is {manifest}, which does not exist: run `snakemake precompute_all` first, "
                f"or set train.cache: null to compute every sample live"
            )
        if manifest is not None:
            from vlnflow.cache.store import FeatureStore

            store = FeatureStore(manifest)
            if store.encoder_fingerprint != expected_fingerprint:
                message = (
                    f"feature cache {manifest} was built by encoder {store.encoder_fingerprint}, but this run's spatial "
                    f"settings give {expected_fingerprint}; rebuild it (snakemake precompute_all) or set "
                    f"train.allow_fingerprint_mismatch: true"
                )
                if not allow_mismatch:
                    raise UserError(message)
                log.warning("%s (override set: using it anyway)", message)
            self.store = store
            log.info("[INFO] VGGT feature cache enabled: %s", manifest)
        else:
            log.info("[INFO] VGGT feature cache disabled: every sample is encoded live")

    @property
    def encoder(self):
        if self._encoder is None:
            from vlnflow.spatial import SpatialEncoder

            log.info("building the live VGGT encoder for samples missing from the cache")
            self._encoder = SpatialEncoder.from_config(self.config["spatial"])
        return self._encoder

    def lookup(self, sample_id: str) -> torch.Tensor | None:
        """Cached features or None (called in DataLoader workers)."""
        return None if self.store is None else self.store.get(sample_id)

    def encode_live(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [S, 3, H, W] in [0, 1] -> [P, C], computed the same way precompute does."""
        with torch.inference_mode():
            out = self.encoder.encode(frames[None].to(self.encoder.device))[0]
        return out.to(torch.bfloat16).clone()
