"""Stable shards: each episode goes to shard sha256(episode_id) mod shards.count.

The assignment depends on nothing but the episode id and the count, so a growing
data set adds samples to existing shards without moving others. `write_shards`
writes results/shards/<shard>.parquet beside the checkpoint's one declared output
(shards.json) and replaces a shard file only when its fingerprint changed, so
downstream jobs (precompute) rerun for changed shards only.

With several sources (vlnflow.data.sources) every source has shards of its own,
`<source>.shard_<k>` with k = sha256(episode_id) mod that source's count, so adding a
source or episodes to one source never rewrites another source's shard files.
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

from vlnflow.data.sources import parse_shard_name, shard_file_name

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


def shard_assigner(count: int, source_counts: dict[str, int] | None = None):
    """episode id -> shard name: shard_<k> for a single root, <source>.shard_<k> with the source's
    own count when `source_counts` (source name -> shard count) is given."""
    if source_counts is None:
        return lambda episode_id: shard_name(shard_index(episode_id, count))

    def assign(episode_id: str) -> str:
        source = episode_id.split("/", 1)[0]
        if source not in source_counts:
            raise ValueError(f"episode {episode_id!r} belongs to no configured source ({', '.join(source_counts)})")
        return shard_file_name(source, shard_index(episode_id, source_counts[source]))

    return assign


def write_shards(
    samples_path: str,
    episodes_path: str,
    out_dir: str,
    manifest_path: str,
    count: int,
    source_counts: dict[str, int] | None = None,
) -> dict:
    """Split the index into shard files under out_dir, rewriting only changed ones; write the manifest JSON.

    `source_counts` (source name -> shards.count of that source) for an index of several sources."""
    samples = pq.read_table(samples_path).combine_chunks()  # take() on many chunks re-concatenates per call
    episodes = pq.read_table(episodes_path, columns=["episode_id", "fingerprint"])
    os.makedirs(out_dir, exist_ok=True)

    assign = shard_assigner(count, source_counts)
    episode_ids = episodes.column("episode_id").to_pylist()
    episode_fp = dict(zip(episode_ids, episodes.column("fingerprint").to_pylist()))
    episode_shard = {e: assign(e) for e in episode_ids}
    names = sorted(set(episode_shard.values()))
    code_of = {name: i for i, name in enumerate(names)}

    encoded = samples.column("episode_id").combine_chunks().dictionary_encode()
    dictionary = encoded.dictionary.to_pylist()
    missing = [e for e in dictionary if e not in episode_shard]
    if missing:
        raise ValueError(f"{samples_path} has samples of episode {missing[0]!r}, which {episodes_path} lacks")
    per_code = np.array([code_of[episode_shard[e]] for e in dictionary], dtype=np.int64)
    row_shard = per_code[encoded.indices.to_numpy(zero_copy_only=False)]
    order = np.argsort(row_shard, kind="stable")  # keeps (episode_id, step) order inside a shard
    bounds = np.searchsorted(row_shard[order], np.arange(len(names) + 1))

    shards, written, kept = [], 0, 0
    keep_files = set()
    for code, name in enumerate(names):
        rows_idx = order[bounds[code] : bounds[code + 1]]
        if len(rows_idx) == 0:
            continue
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
        entry = {"name": name, "fingerprint": fingerprint, "n_samples": len(rows_idx), "n_episodes": len(shard_episodes)}
        if source_counts is not None:
            entry["source"] = parse_shard_name(name)[0]
        shards.append(entry)

    removed = 0
    for fname in sorted(os.listdir(out_dir)):
        stem, ext = os.path.splitext(fname)
        if ext == ".parquet" and parse_shard_name(stem) is not None and fname not in keep_files:
            os.remove(os.path.join(out_dir, fname))  # stale: shard now empty, count changed or source gone
            removed += 1
    manifest = {"count": count, "n_samples": samples.num_rows, "n_episodes": len(episode_ids), "shards": shards}
    if source_counts is not None:
        manifest["sources"] = per_source_counts(shards, episode_shard, source_counts)
    tmp = f"{manifest_path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(tmp, manifest_path)
    log.info(
        "shards: %d non-empty of %d; %d rewritten, %d unchanged, %d stale removed",
        len(shards),
        count if source_counts is None else sum(source_counts.values()),
        written,
        kept,
        removed,
    )
    return manifest


def per_source_counts(shards: list[dict], episode_shard: dict[str, str], source_counts: dict[str, int]) -> dict:
    """source -> {count, n_shards, n_samples, n_episodes} for shards.json."""
    out = {name: {"count": c, "n_shards": 0, "n_samples": 0, "n_episodes": 0} for name, c in source_counts.items()}
    for entry in shards:
        summary = out[entry["source"]]
        summary["n_shards"] += 1
        summary["n_samples"] += entry["n_samples"]
    for shard in episode_shard.values():
        out[parse_shard_name(shard)[0]]["n_episodes"] += 1
    return out


def read_shard_list(manifest_path: str) -> list[dict]:
    """The shards listed in a shards.json written by write_shards."""
    with open(manifest_path) as fh:
        return json.load(fh)["shards"]
