"""What a full cache will cost before anything runs: bytes, files and GPU-hours."""

from __future__ import annotations

from dataclasses import dataclass

from vlnflow.cache.format import SCALED, bytes_per_sample


@dataclass
class CacheEstimate:
    samples: int
    feature_shape: tuple[int, int]
    dtype: str
    shards: int
    bytes_per_sample: int
    total_bytes: int
    files: int
    samples_per_s: float | None
    gpu_hours: float | None

    def lines(self) -> list[str]:
        p, c = self.feature_shape
        scales = f" + {p} float32 row scales" if self.dtype in SCALED else ""
        out = [
            f"samples            {self.samples:,}",
            f"feature per sample {p} x {c} {self.dtype}{scales} = {self.bytes_per_sample:,} B ({self.bytes_per_sample / 2**20:.2f} MiB)",
            f"total              {self.total_bytes:,} B = {self.total_bytes / 1e12:.3f} TB ({self.total_bytes / 2**40:.2f} TiB), before compression",
            f"files              {self.files} ({self.shards} shard files + manifest.json + manifest.parquet)",
        ]
        if self.gpu_hours is not None:
            out.append(f"GPU time           {self.gpu_hours:,.1f} GPU-hours at {self.samples_per_s:.2f} samples/s per GPU")
        else:
            out.append("GPU time           unknown: pass --samples-per-s (measured by bench/bench_spatial.py)")
        return out


def estimate(samples: int, grid: tuple[int, int], channels: int, dtype: str, shards: int, samples_per_s: float | None) -> CacheEstimate:
    """Sizes from the feature map shape ((grid_h, grid_w), channels) that precompute will store."""
    per_sample = bytes_per_sample(grid[0] * grid[1], channels, dtype)
    hours = samples / samples_per_s / 3600 if samples_per_s else None
    return CacheEstimate(samples, (grid[0] * grid[1], channels), dtype, shards, per_sample, per_sample * samples, shards + 2, samples_per_s, hours)
