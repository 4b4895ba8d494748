"""Stable shards: each episode goes to shard sha256(episode_id) mod shards.count.

The assignment depends on nothing but the episode id and the count, so a growing
data set adds samples to existing shards without moving others. `write_shards`
writes results/shards/<shard>.parquet beside the checkpoint's one declared output
(shards.json) and replaces a shard file only when its fingerprint changed, so
downstream jobs (precompute) rerun for changed shards only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SHARD_PREFIX = "shard_"
FINGERPRINT_KEY = b"vlnflow.shard_fingerprint"
SHARD_FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}"


def shard_index(episode_id: str, count: int) -> int:
    """Stable shard number of an episode (same on every machine and Python run)."""
    digest = hashlib.sha256(episode_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_of(episode_id: str, count: int) -> str:
    return shard_name(shard_index(episode_id, count))


def table_digest(table: pa.Table) -> str:
    """Digest of a table's content (Arrow IPC bytes of its one-chunk form, so chunking does not matter)."""
    h = hashlib.blake2b(digest_size=16)
    sink = pa.BufferOutputStream()
    table = table.combine_chunks()
    with ipc.new_stream(sink, table.schema.remove_metadata()) as writer:
        writer.write_table(table)
    h.update(sink.getvalue())
    return h.hexdigest()


def shard_fingerprint(rows: pa.Table, episode_fingerprints: list[tuple[str, str]]) -> str:
    """Fingerprint of a shard: its sample rows plus the file fingerprints of its episodes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"vlnflow-shard-v{SHARD_FORMAT_VERSION}\n{table_digest(rows)}\n".encode())
    for episode_id, fingerprint in sorted(episode_fingerprints):
        h.update(f"{episode_id}\0{fingerprint}\n".encode())
    return h.hexdigest()


def stored_fingerprint(path: str) -> str | None:
    """The fingerprint in an existing shard file's metadata, or None when absent or unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    """Write to a temporary file beside `path` and rename, so readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_shards(samples_path: str, episodes_path: str, out_dir: str, manifest_path: str, count: int) -> dict:
    """Split the index into shard files under out_dir, rewriting only changed ones; write the manifest JSON."""
    samples = pq.read_table(samples_path).combine_chunks()  # take() on many chunks re-concatenates per call
    episodes = pq.read_table(episodes_path, columns=["episode_id", "fingerprint"])
    os.makedirs(out_dir, exist_ok=True)

    episode_ids = episodes.column("episode_id").to_pylist()
    episode_fp = dict(zip(episode_ids, episodes.column("fingerprint").to_pylist()))
    episode_shard = {e: shard_index(e, count) for e in episode_ids}

    encoded = samples.column("episode_id").combine_chunks().dictionary_encode()
    dictionary = encoded.dictionary.to_pylist()
    missing = [e for e in dictionary if e not in episode_shard]
    if missing:
        raise ValueError(f"{samples_path} has samples of episode {missing[0]!r}, which {episodes_path} lacks")
    per_code = np.array([episode_shard[e] for e in dictionary], dtype=np.int64)
    row_shard = per_code[encoded.indices.to_numpy(zero_copy_only=False)]
    order = np.argsort(row_shard, kind="stable")  # keeps (episode_id, step) order inside a shard
    bounds = np.searchsorted(row_shard[order], np.arange(count + 1))

    shards, written, kept = [], 0, 0
    keep_files = set()
    for index in range(count):
        rows_idx = order[bounds[index] : bounds[index + 1]]
        if len(rows_idx) == 0:
            continue
        name = shard_name(index)
        rows = samples.take(pa.array(rows_idx))
        shard_episodes = sorted(set(rows.column("episode_id").to_pylist()))
        fingerprint = shard_fingerprint(rows, [(e, episode_fp[e]) for e in shard_episodes])
        path = os.path.join(out_dir, f"{name}.parquet")
        keep_files.add(os.path.basename(path))
        if stored_fingerprint(path) == fingerprint:
            kept += 1
        else:
            schema = rows.schema.with_metadata({**(rows.schema.metadata or {}), FINGERPRINT_KEY: fingerprint.encode()})
            write_parquet_atomic(rows.replace_schema_metadata(schema.metadata), path)
            written += 1
        shards.append(
            {"name": name, "fingerprint": fingerprint, "n_samples": len(rows_idx), "n_episodes": len(shard_episodes)}
        )

    removed = 0
    for fname in sorted(os.listdir(out_dir)):
        if fname.startswith(SHARD_PREFIX) and fname.endswith(".parquet") and fname not in keep_files:
            os.remove(os.path.join(out_dir, fname))  # stale: shard now empty or count changed
            removed += 1
    manifest = {"count": count, "n_samples": samples.num_rows, "n_episodes": len(episode_ids), "shards": shards}
    tmp = f"{manifest_path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(tmp, manifest_path)
    log.info(
        "shards: %d non-empty of %d; %d rewritten, %d unchanged, %d stale removed",
        len(shards),
        count,
        written,
        kept,
        removed,
    )
    return manifest


def read_shard_list(manifest_path: str) -> list[dict]:
    """The shards listed in a shards.json written by write_shards."""
    with open(manifest_path) as fh:
        return json.load(fh)["shards"]
