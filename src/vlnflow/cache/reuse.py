"""Rows a shard's feature file can take over from its previous version instead of recomputing them.

When a source gains episodes (the next DAgger round), the new episodes land in nearly every shard
of that source, so nearly every shard's precompute job reruns. Its old samples have not changed,
though: only the new ones need the GPU. A row is reused when its key is unchanged:

    key = blake2b(sample id, encoder fingerprint, every frame path of the sample with its size and mtime_ns)

and the previous file stored the row complete (not skipped) with the same storage dtype, grid,
channels and layer. The stored values (and fp8 row scales) are copied as they are, so a reused row
is bit-identical to the row a from-scratch build computes.

Where the previous rows live. Snakemake deletes a job's declared outputs before the job runs, so
results/cache/<shard>.h5 is gone when its precompute job starts. After every successful job the
finished file is therefore hard-linked to results/cache/.previous/<shard>.h5 (no extra disk: one
inode, two names) and the row keys are written to results/cache/.previous/<shard>.keys.json with
the file's identity (inode, size, created_at). Deleting the output leaves the link; the next job of
that shard reads its reusable rows from the link and then replaces link and keys with its own.
A keys file that does not describe the linked file (a crash between the two writes) means no reuse.

Crash safety and validation are unchanged: copied rows go through the ShardWriter's partial file
and are marked done only after they are flushed; a file that validation finds corrupt or wrong is
forgotten here too (`forget`), so its rows are never copied into a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import h5py

from vlnflow.cache import format as fmt

log = logging.getLogger(__name__)

PREVIOUS_DIR = ".previous"
KEYS_VERSION = 1
COPY_BATCH = 64  # rows read from the previous file per HDF5 call
MATCHING_ATTRS = ("format_version", "dtype", "grid_h", "grid_w", "channels", "layer", "encoder_fingerprint")


def previous_paths(out_h5: str | Path) -> tuple[Path, Path]:
    """(hard link to the shard's previous file, its keys file) for results/cache/<shard>.h5."""
    out_h5 = Path(out_h5)
    directory = out_h5.parent / PREVIOUS_DIR
    return directory / out_h5.name, directory / f"{out_h5.stem}.keys.json"


def frame_stats(root: Path, frames: list[list[str]]) -> dict[str, tuple[int, int] | None]:
    """(size, mtime_ns) of every distinct frame path (relative to root unless absolute); None if missing."""
    out: dict[str, tuple[int, int] | None] = {}
    for sample in frames:
        for rel in sample:
            if rel not in out:
                try:
                    st = os.stat(root / rel)
                    out[rel] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    out[rel] = None
    return out


def row_keys(sample_ids: list[str], frames: list[list[str]], root: Path, encoder_fingerprint: str) -> list[str | None]:
    """One key per sample; None when a frame cannot be stat'ed (such a row is never reused)."""
    stats = frame_stats(root, frames)
    keys: list[str | None] = []
    for sample_id, sample in zip(sample_ids, frames):
        h = hashlib.blake2b(f"vlnflow-row-v1\0{encoder_fingerprint}\0{sample_id}\n".encode(), digest_size=16)
        for rel in sample:
            st = stats[rel]
            if st is None:
                h = None
                break
            h.update(f"{rel}\0{st[0]}\0{st[1]}\n".encode())
        keys.append(None if h is None else h.hexdigest())
    return keys


def _identity(path: Path) -> dict:
    """Which file a keys file describes: inode, size and the file's own creation stamp. Not the mtime:
    Snakemake touches finished outputs, and the link shares the output's inode."""
    st = os.stat(path)
    with h5py.File(path, "r") as f:
        created = str(f.attrs.get("created_at", ""))
    return {"ino": st.st_ino, "size": st.st_size, "created_at": created}


def forget(out_h5: str | Path) -> None:
    """Drop the shard's previous rows (validation found its file corrupt or wrong)."""
    link, keys = previous_paths(out_h5)
    keys.unlink(missing_ok=True)
    link.unlink(missing_ok=True)


class RowReuse:
    """The keys of one shard's samples; `fill` copies matching rows into a ShardWriter, `remember` keeps
    the finished file for the shard's next job."""

    def __init__(self, out_h5: str | Path, sample_ids: list[str], frames: list[list[str]], root: str | Path, encoder_fingerprint: str):
        self.out_h5 = Path(out_h5)
        self.sample_ids = list(sample_ids)
        self.encoder_fingerprint = encoder_fingerprint
        self.keys = row_keys(self.sample_ids, frames, Path(root), encoder_fingerprint)

    # -- before computing ------------------------------------------------------------------------
    def _previous(self) -> tuple[Path, dict] | None:
        link, keys_path = previous_paths(self.out_h5)
        if not link.exists() or not keys_path.exists():
            return None
        try:
            stored = json.loads(keys_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("previous rows of %s: unreadable %s (%s): recomputing every row", self.out_h5.name, keys_path, exc)
            return None
        try:
            identity = _identity(link)
        except OSError as exc:
            log.warning("previous rows of %s: cannot read %s (%s): recomputing every row", self.out_h5.name, link, exc)
            return None
        if stored.get("version") != KEYS_VERSION or stored.get("file") != identity:
            log.info("previous rows of %s: %s does not describe %s: recomputing every row", self.out_h5.name, keys_path, link)
            return None
        return link, stored["keys"]

    def fill(self, writer) -> int:
        """Copy every pending row of `writer` whose key matches a complete row of the previous file;
        returns the number of rows copied (0 without a usable previous file)."""
        found = self._previous()
        if found is None:
            return 0
        link, previous_keys = found
        try:
            with h5py.File(link, "r") as f:
                if not f.attrs.get("complete"):
                    return 0
                mismatch = [k for k in MATCHING_ATTRS if f.attrs.get(k) != writer.attrs[k]]
                if mismatch:
                    log.info("previous rows of %s: %s differ: recomputing every row", self.out_h5.name, ", ".join(mismatch))
                    return 0
                return self._copy(f, writer, previous_keys)
        except OSError as exc:  # unreadable previous file: compute everything, as without one
            log.warning("previous rows of %s: cannot read %s (%s): recomputing the rest", self.out_h5.name, link, exc)
            return 0

    def _copy(self, f: h5py.File, writer, previous_keys: dict[str, str]) -> int:
        ids = f[fmt.SAMPLE_ID].asstr()[...]
        done, errors = f[fmt.DONE][...], f[fmt.ERROR].asstr()[...]
        where = {sid: i for i, sid in enumerate(ids) if done[i] and not errors[i]}
        pairs = [
            (row, where[self.sample_ids[row]])
            for row in writer.pending
            if self.keys[row] is not None
            and previous_keys.get(self.sample_ids[row]) == self.keys[row]
            and self.sample_ids[row] in where
        ]
        pairs.sort(key=lambda p: p[1])  # increasing rows of the previous file: one h5py selection per batch
        scaled = f.attrs["dtype"] in fmt.SCALED
        cast_errors = (float(f.attrs.get("max_abs_cast_error", 0.0)), float(f.attrs.get("max_row_rel_error", 0.0)))
        copied = 0
        for start in range(0, len(pairs), COPY_BATCH):
            batch = pairs[start : start + COPY_BATCH]
            for part in self._readable(f, batch, scaled):
                rows, values, scales = part
                writer.copy_rows(rows, values, scales, cast_errors)
                copied += len(rows)
        log.info("%s: %d of %d samples reused from the previous file", self.out_h5.name, copied, len(self.sample_ids))
        return copied

    def _readable(self, f: h5py.File, batch: list[tuple[int, int]], scaled: bool):
        """(rows, values, scales) for the batch; a chunk that fails its checksum is left out (recomputed)."""
        src = [p[1] for p in batch]
        try:
            values = f[fmt.FEATURES][src]
            scales = f[fmt.SCALE][src] if scaled else None
            yield [p[0] for p in batch], values, scales
            return
        except OSError:
            pass
        for row, prev in batch:  # find the bad rows one by one
            try:
                values = f[fmt.FEATURES][prev : prev + 1]
                scales = f[fmt.SCALE][prev : prev + 1] if scaled else None
            except OSError as exc:
                log.warning("%s: row of %s unreadable in the previous file (%s): recomputing it", self.out_h5.name, self.sample_ids[row], exc)
                continue
            yield [row], values, scales

    # -- after finishing ---------------------------------------------------------------------------
    def remember(self) -> None:
        """Keep the finished out_h5 (hard link) and its row keys for the shard's next precompute job."""
        link, keys_path = previous_paths(self.out_h5)
        link.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.out_h5, "r") as f:
            errors = f[fmt.ERROR].asstr()[...]
        keys = {sid: key for sid, key, error in zip(self.sample_ids, self.keys, errors) if key is not None and not error}
        tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            os.link(self.out_h5, tmp)
            os.replace(tmp, link)
        except OSError as exc:  # e.g. a file system without hard links: the next job recomputes every row
            tmp.unlink(missing_ok=True)
            forget(self.out_h5)
            log.warning("cannot keep %s for reuse (%s): its next precompute job recomputes every row", self.out_h5.name, exc)
            return
        record = {"version": KEYS_VERSION, "file": _identity(link), "encoder_fingerprint": self.encoder_fingerprint, "keys": keys}
        tmp_keys = keys_path.with_name(f".{keys_path.name}.tmp-{os.getpid()}")
        tmp_keys.write_text(json.dumps(record))
        os.replace(tmp_keys, keys_path)


def reusable_rows_enabled(config: dict) -> bool:
    return bool(config.get("cache", {}).get("reuse", True))

