"""Compute one shard's cached VGGT features: decode frames in DataLoader workers, encode on the GPU.

Samples of one episode share most frames, so each batch loads every unique frame
once and the encoder runs DINOv2 once per unique image (`encode_indexed`).

The GPU is kept busy by a three-stage pipeline: workers decode into pinned memory, the
next batch's host-to-device copy runs on a side stream while the current batch computes
(`DevicePrefetcher`), and features go back to pinned host memory asynchronously and are
written by one writer thread behind a bounded queue (`BackgroundWriter`). The writer still
marks a row done only after its features are flushed, so crash safety and resume are
unchanged, and rows are written in the same order with the same values as a serial loop.

Batches reach the encoder padded to the shapes its shape policy compiles for
(vlnflow.spatial.shapes; padded rows are dropped), so a long shard does not recompile; the
first batch of each shape class is warm-up (vlnflow.cache.warmup), and the stats JSON
records the set-up split (imports, weights, loader start, first batch with its compile),
whether the host's shared compile cache was warm, and the recompiles after warm-up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlnflow.cache.loader_workers import loader_workers
from vlnflow.cache.reuse import RowReuse, reusable_rows_enabled
from vlnflow.cache.warmup import WarmupTracker
from vlnflow.cache.writer import ShardWriter
from vlnflow.errors import DatasetError
from vlnflow.spatial import compile_cache

log = logging.getLogger(__name__)


@dataclass
class LoadedBatch:
    """What a worker hands the encoder: rows that loaded, their unique images and per-row frame indices.

    With a shape policy the tensors are padded (extra zero images, extra rows repeating row 0): the first
    len(rows) output rows are the real ones; `unique` is the real image count, `key` the shape class."""

    rows: list[int]
    images: torch.Tensor  # [U', 3, H, W] in [0, 1]
    frame_index: torch.Tensor  # [B' >= len(rows), S] into images
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it could not be loaded
    unique: int = 0
    key: tuple = ()
    shape: str = ""  # the shape in words, for logs

    def pin_memory(self) -> "LoadedBatch":
        """Called by DataLoader(pin_memory=True) (a dataclass is not pinned otherwise): async copies need pinned pages."""
        return LoadedBatch(self.rows, self.images.pin_memory(), self.frame_index.pin_memory(), self.errors, self.unique, self.key, self.shape)


def make_batches(pending: list[int], frame_counts: list[int], batch_size: int) -> list[list[int]]:
    """Group pending rows into batches of equal frame count (one block-causal pass needs one S),
    keeping dataset order inside each group so consecutive steps of an episode share frames."""
    by_count: dict[int, list[int]] = {}
    for row in pending:
        by_count.setdefault(frame_counts[row], []).append(row)
    batches = []
    for count in sorted(by_count):
        group = by_count[count]
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


class ShardFrames(Dataset):
    """Item i = batch i, its unique frames decoded and preprocessed once (padded per `policy`, if given)."""

    def __init__(self, root: Path, sample_ids: list[str], frames: list[list[str]], batches: list[list[int]], geometry, policy=None):
        self.root, self.sample_ids, self.frames, self.batches, self.geometry = root, sample_ids, frames, batches, geometry
        self.policy = policy

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> LoadedBatch:
        from vlnflow.spatial.preprocess import load_frame

        loaded: dict[str, torch.Tensor] = {}
        bad: dict[str, str] = {}
        for row in self.batches[i]:
            for rel in self.frames[row]:
                if rel in loaded or rel in bad:
                    continue
                try:
                    loaded[rel] = load_frame(self.root / rel, geometry=self.geometry)
                except Exception as exc:  # missing file, truncated PNG, not an image...
                    bad[rel] = f"{type(exc).__name__}: {exc}"
        rows, index, errors = [], [], {}
        order = {rel: k for k, rel in enumerate(loaded)}
        for row in self.batches[i]:
            broken = [rel for rel in self.frames[row] if rel in bad]
            if broken:
                errors[row] = f"sample {self.sample_ids[row]}: cannot read image {self.root / broken[0]} ({bad[broken[0]]})"
                continue
            rows.append(row)
            index.append([order[rel] for rel in self.frames[row]])
        images = torch.stack(list(loaded.values())) if loaded else torch.empty(0)
        width = len(self.frames[self.batches[i][0]])  # one frame count per batch (make_batches); explicit for a batch with no good row
        frame_index = torch.tensor(index, dtype=torch.long).reshape(len(rows), width)
        unique, key, shape = len(loaded), (), ""
        if self.policy is not None and rows:
            key, shape = self.policy.shape_key(unique, len(rows), width), self.policy.describe(unique, len(rows), width)
            images, frame_index = self.policy.pad(images, frame_index)
        return LoadedBatch(rows, images, frame_index, errors, unique, key, shape)


class DevicePrefetcher:
    """Iterate (batch, images, frame_index) with the tensors already on `device`.

    On CUDA the copy of batch k+1 is issued on a side stream as soon as batch k is handed
    out, so it overlaps batch k's compute; `data_wait_s` is the time spent waiting for
    the DataLoader (decode not keeping up)."""

    def __init__(self, loader, device: torch.device):
        self.it, self.device = iter(loader), device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.data_wait_s = 0.0

    def _load(self):
        t0 = time.perf_counter()
        batch = next(self.it, None)
        self.data_wait_s += time.perf_counter() - t0
        if batch is None:
            return None
        if not batch.rows or self.stream is None:
            return batch, batch.images, batch.frame_index
        with torch.cuda.stream(self.stream):
            images = batch.images.to(self.device, non_blocking=True)
            index = batch.frame_index.to(self.device, non_blocking=True)
        return batch, images, index

    def __iter__(self):
        nxt = self._load()
        while nxt is not None:
            batch, images, index = nxt
            if self.stream is not None and batch.rows:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.stream)  # compute starts after this batch's copy
                images.record_stream(current)  # memory from the side stream is used on this one
                index.record_stream(current)
            yield nxt
            nxt = self._load()  # after the caller launched batch k's compute: overlaps it


def timing_event(device: torch.device):
    """A recorded CUDA timing event on the current stream (None on CPU): brackets a batch's GPU work."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def to_host_async(feats: torch.Tensor):
    """(host tensor, end event or None): a CUDA result copied into pinned memory without blocking the launcher."""
    if feats.device.type != "cuda":
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    return host, timing_event(feats.device)


class BackgroundWriter:
    """ShardWriter calls (write / skip) run in order on one thread behind a bounded queue.

    The caller never waits for HDF5 unless the queue is full (`wait_s`). The first error
    in the thread stops it and is raised in the caller at the next call or at `close()`.
    """

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.wait_s = 0.0  # caller blocked on a full queue or on the final drain
        self.hdf5_s = 0.0  # thread: ShardWriter calls (checks, cast, HDF5 writes and flushes)
        self.device_s = 0.0  # GPU time of the written batches (CUDA events: compute + copy back)
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain without writing: the caller raises the error
            try:
                kind, args = item
                if kind == "write":
                    rows, host, (start, end) = args
                    if end is not None:
                        end.synchronize()  # the features are in host memory
                        self.device_s += start.elapsed_time(end) / 1000
                    t0 = time.perf_counter()
                    self.writer.write(rows, host)
                else:
                    t0 = time.perf_counter()
                    self.writer.skip(*args)
                self.hdf5_s += time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                self.error = exc

    def _put(self, item) -> None:
        self._raise()
        t0 = time.perf_counter()
        self.queue.put(item)
        self.wait_s += time.perf_counter() - t0

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def write(self, rows: list[int], host: torch.Tensor, events=(None, None)) -> None:
        """Queue rows' features; `events` = (start, end) CUDA timing events bracketing their GPU work."""
        self._put(("write", (rows, host, events)))

    def skip(self, row: int, reason: str) -> None:
        self._put(("skip", (row, reason)))

    def skip_errors(self, errors: dict[int, str], on_error: str) -> int:
        """A batch's unreadable rows: raise the first (`dataset.on_error: fail`) or record each as skipped, logged;
        returns how many were skipped."""
        for row, why in errors.items():
            if on_error == "fail":
                raise DatasetError(why)
            log.warning("skipped %s", why)
            self.skip(row, why)
        return len(errors)

    def close(self) -> None:
        """Finish every queued call (rows already computed are kept, also when the caller failed), then re-raise."""
        if self.thread.is_alive():
            t0 = time.perf_counter()
            self.queue.put(None)
            self.thread.join()
            self.wait_s += time.perf_counter() - t0
        self._raise()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also after a failure: the rows computed before it are written (resume keeps them)


def precompute_shard(
    shard_parquet: str | Path,
    shard_fingerprint: str,
    out_h5: str | Path,
    partial_h5: str | Path,
    config: dict,
    *,
    encoder=None,
    progress: bool = True,
    process_start: float | None = None,
    gpu_wait_s: float = 0.0,
    jobs_per_node: int = 1,
) -> dict:
    """Fill `out_h5` with every sample of the shard (resuming `partial_h5` if present); returns stats.

    `process_start` (epoch seconds the job's process began) and `gpu_wait_s` (time it waited for a GPU
    slot) let the stats split the whole job's set-up; `jobs_per_node` sizes `cache.loader_workers: auto`.
    """
    from vlnflow.spatial import SpatialEncoder

    started, started_at = time.perf_counter(), time.time()
    imports_s = max(0.0, started_at - process_start - gpu_wait_s) if process_start else 0.0
    cache_cfg = config["cache"]
    counters_before = compile_cache.CompileCounters.snapshot()
    table = pd.read_parquet(shard_parquet)
    sample_ids = table.sample_id.tolist()
    frames = [list(f) for f in table.frames]
    t0 = time.perf_counter()
    encoder = encoder or SpatialEncoder.from_config(config["spatial"])
    weights_s = time.perf_counter() - t0
    compiling = bool(getattr(encoder, "compile_blocks", False))  # compiles happen at the first batch, after this
    compile_dir = compile_cache.activate(cache_cfg.get("compile_cache")) if compiling else None
    t0 = time.perf_counter()
    reuse = None
    if reusable_rows_enabled(config):  # rows of unchanged samples come from the shard's previous file
        reuse = RowReuse(out_h5, sample_ids, frames, config["dataset"]["root"], encoder.fingerprint())
    writer = ShardWriter(
        out_h5,
        partial_h5,
        sample_ids,
        grid=encoder.grid,
        channels=encoder.feature_shape[1],
        dtype=cache_cfg["dtype"],
        compression=cache_cfg["compression"],
        encoder_fingerprint=encoder.fingerprint(),
        shard_fingerprint=shard_fingerprint,
        layer=config["spatial"]["layer"],
    )
    with writer:
        n_reused = reuse.fill(writer) if reuse else 0
        pending = writer.pending
        batches = make_batches(pending, [len(f) for f in frames], config["spatial"]["batch_size"])
        policy = getattr(encoder, "shapes", None)
        policy = policy if policy is not None and policy.pads(compiling) else None  # None: batches as they come
        dataset = ShardFrames(Path(config["dataset"]["root"]), sample_ids, frames, batches, encoder.geometry, policy)
        workers = loader_workers(cache_cfg["loader_workers"], jobs_per_node)
        device = encoder.device
        loader = DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=(4 if workers == 1 else 2) if workers else None,  # >= 4 batches ahead, bounded pinned memory
            persistent_workers=False,
        )
        shard_name = Path(out_h5).stem
        warmup = WarmupTracker(encoder, compile_dir, job=f"precompute_shard {shard_name}")
        n_skipped = n_done = 0
        compute_s = 0.0
        first_data_s = None
        prefetch = DevicePrefetcher(loader, device)
        with tqdm(total=len(pending), unit="sample", desc=shard_name, disable=not progress, smoothing=0.1) as bar, \
                BackgroundWriter(writer) as background:
            open_s = time.perf_counter() - t0
            loop_started = time.perf_counter()
            for number, (batch, images, index) in enumerate(prefetch):
                if first_data_s is None:
                    first_data_s = prefetch.data_wait_s  # worker start-up + decoding the first batch
                n_skipped += background.skip_errors(batch.errors, config["dataset"]["on_error"])
                if batch.rows:
                    n = len(batch.rows)
                    with warmup.batch(number, batch.key, n, batch.shape or f"{n} samples"):
                        t0 = time.perf_counter()
                        start = timing_event(device)
                        with torch.inference_mode():
                            feats = encoder.encode_indexed(images, index)[:n]  # padded rows dropped
                        host, end = to_host_async(feats)
                        compute_s += time.perf_counter() - t0
                    background.write(batch.rows, host, (start, end))
                    n_done += n
                bar.update(len(batch.rows) + len(batch.errors))
        loop_s = time.perf_counter() - loop_started
        writer.finalize()
    if reuse:
        reuse.remember()
    finished = time.perf_counter()
    wall = finished - started
    first_data_s = first_data_s or 0.0
    warm = warmup.stats()
    setup_split = {
        "imports": imports_s,  # process start -> this function (interpreter, Snakemake's script preamble, torch)
        "weights": weights_s,  # encoder built on its device, weights read onto it
        "open": open_s,  # shard table, partial file, loader
        "first_data": first_data_s,  # DataLoader workers started and the first batch decoded
        "first_batch": warmup.first_batch_s or 0.0,  # the first batch on the device, its compile included
        "later_warmup": warm["warmup_s"] - (warmup.first_batch_s or 0.0),  # first batches of the other shape classes
    }
    weights_split = getattr(encoder, "load_split_s", None)  # an encoder passed in by the caller has none
    steady_samples = n_done - warm["warmup_samples"]
    steady_s = max(0.0, loop_s - warm["warmup_s"] - first_data_s)
    counters = compile_cache.CompileCounters.since(counters_before)
    stats = {
        "shard": shard_name,
        "samples": len(sample_ids),
        "computed": n_done,
        "resumed": len(sample_ids) - len(pending) - n_reused,  # done in the partial file of a killed job
        "reused": n_reused,  # copied from the shard's previous file (unchanged samples)
        "skipped": n_skipped,
        "frames": int(sum(len(frames[r]) for b in batches for r in b)),
        "batches": len(batches),
        "wall_s": wall,
        "job_wall_s": wall + imports_s,  # the whole job's process, less any wait for a GPU slot
        "encode_s": compute_s,
        "samples_per_s": n_done / wall if wall > 0 else 0.0,
        "job_samples_per_s": n_done / (wall + imports_s) if wall + imports_s > 0 else 0.0,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "started_at": started_at,
        "finished_at": time.time(),
        "process_started_at": process_start,
        "gpu_wait_s": gpu_wait_s,
        # set-up = everything that is not the steady batch loop: the split below, summed
        "setup_s": sum(setup_split.values()),
        "setup_split_s": setup_split,
        **({"weights_split_s": weights_split} if weights_split else {}),  # device_init, build, read, kernels of "weights"
        "loop_s": loop_s,
        "loop_samples_per_s": n_done / loop_s if loop_s > 0 else 0.0,
        # steady state: the loop without its warm-up batches (first batch of each shape class) and loader start
        "steady_s": steady_s,
        "steady_samples": steady_samples,
        "steady_samples_per_s": steady_samples / steady_s if steady_s > 0 else 0.0,
        "loader_workers": workers,
        "compile": {
            "enabled": warmup.compiling,
            "shapes": getattr(getattr(encoder, "shapes", None), "strategy", None),
            "frame_bucket": getattr(getattr(encoder, "shapes", None), "frame_bucket", None),
            "padded": policy is not None,
            "cache_dir": str(compile_dir) if compile_dir else None,
            "cache_warm": compile_cache.cache_was_warm(counters) if warmup.compiling else None,
            "first_on_host": warmup.first_turn.first,
            "lock_wait_s": warmup.lock_wait_s,
            "counters": counters,
            "recompile_limit": _recompile_limit(),
        },
        "recompiles_after_warmup": warm["recompiles_after_warmup"],
        "warmup": warm,
        # The main thread's loop time: waiting for decoded frames (data_wait), running (CPU) or launching
        # (GPU) the encoder (compute), blocked on a full writer queue (write_wait; on a GPU this also holds
        # the wait for the GPU, as the writer waits for each batch's copy back). device_busy: the GPU time
        # of the batches (CPU: = compute); device_busy / loop_s is the device's utilisation. writer_hdf5:
        # the writer thread's own time, overlapped with the loop.
        "time_split_s": {
            "data_wait": prefetch.data_wait_s,
            "compute": compute_s,
            "write_wait": background.wait_s,
            "device_busy": background.device_s if device.type == "cuda" else compute_s,
            "writer_hdf5": background.hdf5_s,
        },
    }
    log.info("precompute %s: %s", stats["shard"], stats)
    return stats


def _recompile_limit() -> int | None:
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", getattr(config, "cache_size_limit", None))
