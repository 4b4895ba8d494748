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
        """The [P, C] feature map (stored precision), or None if the cache lacks this sample."""
        loc = self._index.get(sample_id)
        if loc is None:
            return None
        file_i, row = loc
        array = self._handle(int(file_i))[fmt.FEATURES][int(row)]
        return fmt.from_storage(array, self.dtype)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __getstate__(self):  # picklable for spawn-based workers: never ship open handles
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state
