"""Crash-safe writing of one shard's feature file.

Features go to a partial file outside Snakemake's declared outputs; each row is
marked `done` only after its features are flushed, so a killed job resumes from the
partial file, and the file is renamed to its final name only once every row is done
or recorded as skipped. A reader therefore never sees half a file under the final name.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

from vlnflow import __version__
from vlnflow.cache import format as fmt

log = logging.getLogger(__name__)


class ShardWriter:
    """Create or resume `partial_path`; `finalize()` renames it to `final_path`."""

    def __init__(
        self,
        final_path: str | Path,
        partial_path: str | Path,
        sample_ids: list[str],
        *,
        grid: tuple[int, int],
        channels: int,
        dtype: str,
        compression: str | None,
        encoder_fingerprint: str,
        shard_fingerprint: str,
        layer: int,
    ):
        self.final_path = Path(final_path)
        self.partial_path = Path(partial_path)
        self.sample_ids = list(sample_ids)
        self.dtype = dtype
        self.attrs = {
            "format_version": fmt.FORMAT_VERSION,
            "dtype": dtype,
            "grid_h": int(grid[0]),
            "grid_w": int(grid[1]),
            "channels": int(channels),
            "layer": int(layer),
            "encoder_fingerprint": encoder_fingerprint,
            "shard_fingerprint": shard_fingerprint,
            "vlnflow_version": __version__,
            "torch_version": str(torch.__version__),
            "h5py_version": str(h5py.__version__),
            "compression": compression or "none",
        }
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._open_or_resume(compression)
        self.done = self.file[fmt.DONE][...].astype(bool)

    # -- opening -----------------------------------------------------------------
    def _matches(self, f: h5py.File) -> bool:
        keys = ("format_version", "dtype", "grid_h", "grid_w", "channels", "layer",
                "encoder_fingerprint", "shard_fingerprint", "compression")
        if any(f.attrs.get(k) != self.attrs[k] for k in keys):
            return False
        stored = [s.decode() if isinstance(s, bytes) else s for s in f[fmt.SAMPLE_ID][...]]
        return stored == self.sample_ids

    def _open_or_resume(self, compression: str | None) -> h5py.File:
        if self.partial_path.exists():
            try:
                f = h5py.File(self.partial_path, "r+")
                if self._matches(f):
                    n_done = int(f[fmt.DONE][...].sum())
                    log.info("resuming %s: %d of %d samples already done", self.partial_path, n_done, len(self.sample_ids))
                    return f
                f.close()
                log.info("partial file %s belongs to other settings or samples: starting over", self.partial_path)
            except (OSError, KeyError) as exc:
                log.warning("partial file %s is unreadable (%s): starting over", self.partial_path, exc)
            self.partial_path.unlink()
        return self._create(compression)

    def _create(self, compression: str | None) -> h5py.File:
        n = len(self.sample_ids)
        p = self.attrs["grid_h"] * self.attrs["grid_w"]
        c = self.attrs["channels"]
        # Default libver, not "latest": a v3 superblock keeps a "file open for write" flag that a killed job
        # never clears, and HDF5 then refuses to reopen the partial file, so a real kill could never resume.
        f = h5py.File(self.partial_path, "w")
        f.create_dataset(
            fmt.FEATURES,
            shape=(n, p, c),
            dtype=fmt.STORAGE_NUMPY[self.dtype],
            chunks=(1, p, c) if n else None,
            fletcher32=True,  # a flipped or truncated chunk fails to read instead of returning garbage
            **fmt.h5_compression(compression),
        )
        if self.dtype in fmt.SCALED:
            f.create_dataset(fmt.SCALE, shape=(n, p), dtype=np.float32, chunks=(1, p) if n else None, fletcher32=True)
        f.create_dataset(fmt.SAMPLE_ID, data=np.array(self.sample_ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset(fmt.DONE, data=np.zeros(n, dtype=bool))
        f.create_dataset(fmt.ERROR, data=np.array([""] * n, dtype=object), dtype=h5py.string_dtype())
        for key, value in self.attrs.items():
            f.attrs[key] = value
        f.attrs["complete"] = False
        f.attrs["max_abs_cast_error"] = 0.0
        f.attrs["max_row_rel_error"] = 0.0  # worst per-row relative round-trip error; validation bounds it per dtype
        f.flush()
        return f

    # -- writing -------------------------------------------------------------------
    @property
    def pending(self) -> list[int]:
        """Row indices still to compute."""
        return [int(i) for i in np.flatnonzero(~self.done)]

    def write(self, rows: list[int], features: torch.Tensor) -> None:
        """Store features[k] at row rows[k]; rows become `done` only after the data is flushed."""
        if features.shape[0] != len(rows):
            raise ValueError(f"{len(rows)} rows but {features.shape[0]} feature maps")
        if not torch.isfinite(features).all():
            bad = [self.sample_ids[r] for r, ok in zip(rows, torch.isfinite(features).flatten(1).all(1)) if not ok]
            raise FloatingPointError(f"non-finite features for samples {bad} in {self.final_path.name}")
        scale, ref = None, features
        if self.dtype in fmt.SCALED:  # quantised and checked on the features' device (GPU in precompute)
            q, scale_t = fmt.quantize_fp8(features)
            # the round-trip check: every sample on a GPU; on the CPU, where it costs more than the cast, the first
            checked = len(rows) if q.device.type != "cpu" else 1
            back, ref = fmt.dequantize_fp8(q[:checked], scale_t[:checked]), features[:checked]
            stored, scale = q.view(torch.uint8).cpu().numpy(), scale_t.cpu().numpy()
        else:
            stored = fmt.to_storage(features, self.dtype)
            back = fmt.from_storage(stored, self.dtype) if features.dtype != torch.bfloat16 or self.dtype != "bfloat16" else None
        if back is not None:  # bf16 in, bf16 stored is exact: nothing to measure
            back, ref = back.float(), ref.detach().float().to(back.device)
            attrs = self.file.attrs
            attrs["max_abs_cast_error"] = max(float(attrs["max_abs_cast_error"]), (back - ref).abs().max().item())
            attrs["max_row_rel_error"] = max(float(attrs.get("max_row_rel_error", 0.0)), fmt.row_rel_error(back, ref).max().item())
        self._store(rows, stored, scale)

    def _store(self, rows: list[int], stored: np.ndarray, scale: np.ndarray | None) -> None:
        """Write the rows' values (and fp8 scales), flush, and only then mark them done (the crash-safety order)."""
        ds = self.file[fmt.FEATURES]
        for k, row in enumerate(rows):
            ds[row] = stored[k]
            if scale is not None:
                self.file[fmt.SCALE][row] = scale[k]
        self.file.flush()
        done = self.file[fmt.DONE]
        for row in rows:
            done[row] = True
            self.done[row] = True
        self.file.flush()

    def copy_rows(self, rows: list[int], stored: np.ndarray, scale: np.ndarray | None, cast_errors: tuple[float, float]) -> None:
        """Store rows taken over as they are from an earlier file of this shard (vlnflow.cache.reuse): the
        stored values (and fp8 scales) unchanged; `cast_errors` = that file's (max_abs_cast_error,
        max_row_rel_error), which bound the copied rows' errors. Done only after the data is flushed."""
        if stored.shape[0] != len(rows) or (self.dtype in fmt.SCALED) != (scale is not None):
            raise ValueError(f"{len(rows)} rows but {stored.shape[0]} stored feature maps (scales: {scale is not None})")
        attrs = self.file.attrs
        attrs["max_abs_cast_error"] = max(float(attrs["max_abs_cast_error"]), cast_errors[0])
        attrs["max_row_rel_error"] = max(float(attrs.get("max_row_rel_error", 0.0)), cast_errors[1])
        self._store(rows, stored, scale)

    def skip(self, row: int, reason: str) -> None:
        """Record that a sample could not be computed (dataset.on_error=skip); it counts as handled."""
        self.file[fmt.ERROR][row] = reason
        self.file[fmt.DONE][row] = True
        self.done[row] = True
        self.file.flush()

    def finalize(self) -> Path:
        """Mark complete, close, fsync and atomically rename the partial file to the final name."""
        if not self.done.all():
            missing = [self.sample_ids[i] for i in np.flatnonzero(~self.done)[:5]]
            raise RuntimeError(f"{self.partial_path}: {int((~self.done).sum())} samples not done, e.g. {missing}")
        self.file.attrs["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.file.attrs["n_skipped"] = int(sum(1 for e in self.file[fmt.ERROR][...] if e))
        self.file.attrs["complete"] = True
        self.file.flush()
        self.file.close()
        with open(self.partial_path, "rb") as fh:
            os.fsync(fh.fileno())
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.partial_path, self.final_path)
        return self.final_path

    def close(self) -> None:
        """Close without finalizing (the partial file stays for a resume)."""
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
