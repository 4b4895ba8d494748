"""Read cached features by sample id, safely from forked DataLoader workers.

h5py handles must not cross a fork, so files are opened lazily on first use in
each process (keyed by pid) and never in the constructor.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pandas as pd
import torch

from vlnflow.cache import format as fmt
from vlnflow.cache.manifest import load_manifest


class FeatureStore:
    """Manifest -> sample_id lookups; `get` returns the stored feature map or None when absent."""

    def __init__(self, manifest_path: str | Path):
        self.manifest_path = Path(manifest_path)
        self.manifest = load_manifest(self.manifest_path)
        self.root = self.manifest_path.parent
        table = pd.read_parquet(self.manifest_path.with_suffix(".parquet"))
        self.files = sorted(table.file.unique())
        file_idx = {name: i for i, name in enumerate(self.files)}
        self._index = dict(zip(table.sample_id, zip(table.file.map(file_idx), table.row)))
        self._handles: dict[int, h5py.File] = {}
        self._pid = None

    @property
    def encoder_fingerprint(self) -> str:
        return self.manifest["encoder_fingerprint"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    def _handle(self, i: int) -> h5py.File:
        if self._pid != os.getpid():  # first use in this process, or we were forked: drop inherited handles
            self._handles = {}
            self._pid = os.getpid()
        if i not in self._handles:
            self._handles[i] = h5py.File(self.root / self.files[i], "r")
        return self._handles[i]

    def get(self, sample_id: str) -> torch.Tensor | None:
        """The [P, C] feature map, or None if the cache lacks this sample.

        bf16 / fp16 / fp32 caches return the stored precision; a float8_e4m3 cache is dequantised
        (value x its row's scale) to bf16 here, so the merger never sees fp8."""
        loc = self._index.get(sample_id)
        if loc is None:
            return None
        file_i, row = loc
        f = self._handle(int(file_i))
        array = f[fmt.FEATURES][int(row)]
        scale = f[fmt.SCALE][int(row)] if self.dtype in fmt.SCALED else None
        return fmt.decode(array, self.dtype, scale)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __getstate__(self):  # picklable for spawn-based workers: never ship open handles
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state
