"""Packed batches made in the DataLoader workers, handed to the step already on the device.

Two pieces replace the trainer's per-micro-batch host work (`collator.pack`, mRoPE
positions in forward, a blocking copy):

* `PackInWorker(collator, qwen_config)` is the DataLoader's collate_fn: it packs the
  samples, adds the host metadata of vlnflow.model.host_prep (mRoPE positions, vision
  windows, image token positions, max_seqlen) and stacks the cached spatial features, all
  in the worker. A sample missing from the cache keeps its VGGT frames (`live_frames`);
  its feature is computed in the main process, which owns the GPU encoder.
* `DeviceBatches(loader, source, device)` iterates `(batch, n_live)`: live features filled
  in, every tensor on the device. On CUDA the copy of micro-batch n+1 is issued on a side
  stream from pinned memory before batch n is returned, so it runs under n's compute; the
  compute stream waits only for that batch's own copy (an event), never for a later one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from vlnflow.model.batching import Collator, stack_features
from vlnflow.model.host_prep import add_host_metadata, to_device


class PackInWorker:
    """collate_fn: list[TrainItem] -> one packed CPU batch (everything but live features)."""

    def __init__(self, collator: Collator, qwen_config):
        self.collator = collator
        self.qwen_config = qwen_config

    def __call__(self, items) -> dict:
        batch = self.collator.pack_tokens([item.encoded for item in items])
        features = [item.features for item in items]
        if all(f is not None for f in features):
            batch["spatial_features"] = stack_features(batch["sample_ids"], features)
        else:
            batch["cached_features"] = features  # None where the sample is encoded live
            batch["live_frames"] = [item.vggt_frames for item in items]
        return add_host_metadata(batch, self.qwen_config)


class DeviceBatches:
    """Iterate `(batch on device, number of live samples)` over a DataLoader of PackInWorker batches."""

    def __init__(self, loader: Iterable[dict], source, device: torch.device | str):
        self.loader = loader
        self.source = source
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __iter__(self) -> Iterator[tuple[dict, int]]:
        it = iter(self.loader)
        pending = self._start(next(it, None))
        while pending is not None:
            current = pending
            pending = self._start(next(it, None))  # the next copy runs under this batch's compute
            yield self._finish(*current)

    def _start(self, host: dict | None):
        """Issue the host->device copy of one batch; returns (batch, copy-done event) or None at the end."""
        if host is None:
            return None
        if self.stream is None:
            return to_device(host, self.device), None
        with torch.cuda.stream(self.stream):
            batch = to_device(_pinned(host), self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return batch, done

    def _finish(self, batch: dict, done) -> tuple[dict, int]:
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            _record_stream(batch, compute)  # the allocator must not reuse these while compute reads them
        n_live = 0
        if "cached_features" in batch:
            maps = []
            for cached, frames in zip(batch.pop("cached_features"), batch.pop("live_frames")):
                if cached is None:
                    maps.append(self.source.encode_live(frames).to(self.device))
                    n_live += 1
                else:
                    maps.append(cached)
            batch["spatial_features"] = stack_features(batch["sample_ids"], [m.to(maps[0].dtype) for m in maps])
        return batch, n_live


def _pinned(value):
    """Pinned copies of CPU tensors (a no-op for those the DataLoader already pinned)."""
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pinned(v) for v in value)
    if torch.is_tensor(value) and value.device.type == "cpu" and not value.is_pinned():
        return value.pin_memory()
    return value


def _record_stream(value, stream) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _record_stream(v, stream)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _record_stream(v, stream)
    elif torch.is_tensor(value) and value.is_cuda:
        value.record_stream(stream)
