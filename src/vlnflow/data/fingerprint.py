"""Cheap content fingerprints from file metadata (names, sizes, mtime_ns), never file contents.

Decoding or hashing 612k images would take longer than indexing them; a stat walk
catches added, removed, replaced and edited files, which is what decides whether
the index (whole data set) or a shard (its episodes) must be rebuilt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator


def file_stats(directory: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the visible regular files directly in `directory`, sorted by name."""
    stats = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            st = entry.stat()
            stats.append((entry.name, st.st_size, st.st_mtime_ns))
    stats.sort()
    return stats


def stats_digest(stats: Iterable[tuple[str, int, int]]) -> str:
    """Hex digest of (name, size, mtime_ns) records, in the order given."""
    h = hashlib.blake2b(digest_size=16)
    for name, size, mtime in stats:
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def walk_stats(root: str) -> Iterator[tuple[str, int, int]]:
    """(relative POSIX path, size, mtime_ns) of every visible file under root, in sorted order."""
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        files, dirs = [], []
        with os.scandir(full) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    dirs.append(child)
                elif entry.is_file():
                    st = entry.stat()
                    files.append((child, st.st_size, st.st_mtime_ns))
        files.sort()
        yield from files
        stack.extend(sorted(dirs, reverse=True))


def dataset_fingerprint(root: str) -> str:
    """Fingerprint of everything under dataset.root; changes when any visible file is added, removed or modified."""
    if not os.path.isdir(root):
        return "missing-root"
    return stats_digest(walk_stats(root))
