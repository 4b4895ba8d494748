"""What the per-frame vision cache costs before it is built: bytes on disk, and the read rate training needs.

    size            = frames x bytes per frame       (frames: the index's distinct frames; one per step)
    bytes per frame = grid_h x grid_w x channels x storage bytes (+ fp8 row scales)
                      Qwen2.5-VL-7B (1280 channels), 640x480 frames at 644: crop 34x46 -> 4.0 MB, pad 46x46 -> 5.4 MB
                      in bfloat16, half with float8_e4m3
    read per sample = frames per sample x bytes per frame   (a sample reads its whole history's rows)
    read rate       = read per sample x samples/s per GPU x GPUs per node

`vlnflow cache estimate` and the benchmark report print these lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlnflow.cache.format import SCALED, bytes_per_sample
from vlnflow.spatial.geometry import geometry_of

QWEN7B_CHANNELS = 1280  # Qwen2.5-VL-7B's vision width, when the configured checkpoint is not on this machine


@dataclass
class VisionEstimate:
    frames: int
    frames_source: str
    frames_per_sample: float
    grid: tuple[int, int]
    channels: int
    channels_source: str
    dtype: str
    samples_per_s_per_gpu: float | None
    rate_source: str
    gpus_per_node: int
    enabled: bool

    @property
    def bytes_per_frame(self) -> int:
        return bytes_per_sample(self.grid[0] * self.grid[1], self.channels, self.dtype)

    @property
    def total_bytes(self) -> int:
        return self.frames * self.bytes_per_frame

    @property
    def bytes_per_sample_read(self) -> float:
        return self.frames_per_sample * self.bytes_per_frame

    def read_rate(self, samples_per_s_per_gpu: float) -> tuple[float, float]:
        """(bytes/s per GPU, bytes/s per node) at a training rate."""
        per_gpu = self.bytes_per_sample_read * samples_per_s_per_gpu
        return per_gpu, per_gpu * self.gpus_per_node

    def lines(self) -> list[str]:
        p = self.grid[0] * self.grid[1]
        scales = f" + {p} float32 row scales" if self.dtype in SCALED else ""
        out = [
            f"per-frame vision cache (cache.vision: {str(self.enabled).lower()}; Qwen's vision tower output before visual.merger)",
            f"  frames           {self.frames:,} ({self.frames_source})",
            f"  rows per frame   {self.grid[0]}x{self.grid[1]} = {p} x {self.channels} channels ({self.channels_source}) "
            f"{self.dtype}{scales} = {self.bytes_per_frame:,} B ({self.bytes_per_frame / 1e6:.2f} MB)",
            f"  total            {self.total_bytes:,} B = {self.total_bytes / 1e12:.3f} TB, before compression",
            f"  read per sample  {self.frames_per_sample:.2f} frames x {self.bytes_per_frame / 1e6:.2f} MB = "
            f"{self.bytes_per_sample_read / 1e6:.1f} MB",
        ]
        if self.samples_per_s_per_gpu:
            gpu, node = self.read_rate(self.samples_per_s_per_gpu)
            out.append(f"  read rate        {gpu / 1e6:,.0f} MB/s per GPU, {node / 1e9:.2f} GB/s per node of {self.gpus_per_node} "
                       f"GPUs at {self.samples_per_s_per_gpu:.3g} samples/s per GPU ({self.rate_source}); a faster step "
                       f"(the tower skipped) reads proportionally more")
        gpu, node = self.read_rate(1.0)
        out.append(f"  per sample/s     {gpu / 1e6:,.0f} MB/s per GPU, {node / 1e9:.2f} GB/s per node for every sample/s per GPU")
        return out


def frame_counts(index: Path | None, samples: int, history_frames: int) -> tuple[int, str, float]:
    """(distinct frames, where that number comes from, mean frames per sample) from the index's frames column,
    or estimated (one new frame per sample: a sample is one step of an episode) without it."""
    if index is not None and index.exists():
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        frames = pq.read_table(index, columns=["frames"]).column("frames")
        lengths = pc.list_value_length(frames)
        per_sample = float(pc.mean(lengths).as_py() or 0.0)
        return int(len(pc.unique(pc.list_flatten(frames)))), f"distinct frames of {index}", per_sample
    return samples, "estimated: one new frame per sample (a sample is one step)", float(history_frames)


def vision_estimate(config: dict, samples: int, *, index: Path | None = None, samples_per_s_per_gpu: float | None = None,
                    rate_source: str = "", gpus_per_node: int | None = None) -> VisionEstimate:
    """The estimate for the configured model, frame geometry and cache.vision_dtype."""
    from vlnflow.errors import UserError

    geometry = geometry_of(config["spatial"], config["model"])
    try:
        from vlnflow.cache.vision_fingerprint import vision_config

        channels, channels_source = int(vision_config(config["model"])["hidden_size"]), "the configured tower"
    except UserError as exc:  # e.g. model.qwen_path names a directory of the cluster
        channels, channels_source = QWEN7B_CHANNELS, f"Qwen2.5-VL-7B's; the configured checkpoint is not readable here: {exc}"
    frames, frames_source, per_sample = frame_counts(index, samples, int(config["history"]["max_frames"]) + 1)
    return VisionEstimate(frames, frames_source, per_sample, geometry.kept_grid, channels, channels_source,
                          config["cache"]["vision_dtype"], samples_per_s_per_gpu, rate_source,
                          int(gpus_per_node or config["cluster"]["gpus_per_node"]), bool(config["cache"].get("vision")))


def report_markdown(config: dict, samples: int, *, index: str | None, train_metrics=None, manifest_json: str | None = None,
                    stats_files: list[str] = ()) -> str:
    """The benchmark report's section: the estimate at this workspace's training rate (the cached run's median
    samples/s per GPU, else the committed docs/results rate), what was built (manifest) and how fast (stats)."""
    import json

    if train_metrics is not None and len(train_metrics):
        from vlnflow.report.runs import train_summary

        summary = train_summary(train_metrics)
        rate, source = summary["samples_per_s"] / summary["world_size"], "the training run above, median"
    else:
        from vlnflow.cache.decision import docs_rates

        cached = docs_rates()["cached"]
        rate, source = cached.per_gpu, cached.source
    est = vision_estimate(config, samples, index=Path(index) if index else None, samples_per_s_per_gpu=rate, rate_source=source)
    lines = est.lines()
    if manifest_json and Path(manifest_json).exists():
        manifest = json.loads(Path(manifest_json).read_text())
        lines.append(f"  built            {manifest['samples']:,} frames in {manifest['n_shards']} files, {manifest['bytes']:,} B "
                     f"({manifest['bytes'] / 1e9:.3g} GB on disk)")
    stats = [json.loads(Path(p).read_text()) for p in stats_files]
    computed, wall = sum(s["computed"] for s in stats), sum(s["wall_s"] for s in stats)
    if computed and wall > 0:
        per_gpu = computed / wall
        lines.append(f"  build rate       {per_gpu:.3g} frames/s per GPU ({computed:,} frames in {wall:.1f} job-s over {len(stats)} "
                     f"jobs, 1 GPU each): {est.frames / per_gpu / 3600:,.2f} GPU-hours for all {est.frames:,} frames")
    return "\n## Per-frame vision cache (sizes: estimate; read rate: PROJECTION)\n\n```\n" + "\n".join(lines) + "\n```\n"
