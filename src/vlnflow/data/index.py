"""Build the sample index: every (episode, step) of the data set as one Parquet row.

results/index/samples.parquet holds the columns of records.SAMPLE_COLUMNS sorted by
(episode_id, step); episodes.parquet one row per episode with its file fingerprint
and shard; skipped.csv every episode left out under `dataset.on_error: skip` (always
written, so 'nothing skipped' is visible too). Images are never decoded.

The data set is one or more sources (vlnflow.data.sources): each is read with its
format's reader, its episode ids and frame paths are made unique and relative to
dataset.root, and its sampling rate keeps a seeded share of its samples
(vlnflow.data.sampling). A single-root config indexes exactly as before sources existed.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
from tqdm import tqdm

from vlnflow.data.annotations import group_by_episode, load_entries, read_annotation_episode_safely
from vlnflow.data.episode_dirs import list_episode_dirs, load_json, read_episode_dir
from vlnflow.data.layout import detect_format
from vlnflow.data.records import Episode, append_samples, empty_columns
from vlnflow.data.sampling import keep_mask
from vlnflow.data.scalevln import is_scalevln_entry, read_scalevln_episode_safely, scalevln_jobs
from vlnflow.data.shards import shard_index, write_parquet_atomic
from vlnflow.data.sources import Source, sources_from_params
from vlnflow.data.vlnce import read_vlnce_episode_safely, vlnce_jobs
from vlnflow.errors import DatasetError, UserError

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the rows built from the same data and settings change

SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("episode_id", pa.string()),
        ("step", pa.int32()),
        ("frames", pa.list_(pa.string())),
        ("instruction", pa.string()),
        ("action", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("sub_instruction", pa.string()),
        ("description_2d", pa.string()),
        ("description_3d", pa.string()),
        ("source_format", pa.string()),
    ]
)
EPISODES_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("n_steps", pa.int32()),
        ("n_samples", pa.int32()),
        ("fingerprint", pa.string()),
        ("shard", pa.string()),
    ]
)
SKIPPED_FIELDS = ("episode_id", "path", "reason")
POOL_MIN_EPISODES = 64  # below this, worker start-up costs more than it saves


@dataclass(frozen=True)
class IndexSettings:
    """The config values that decide the index content (dataset.*, history.*, shards.count)."""

    root: str
    format: str = "auto"
    annotations: str | None = None
    max_frames: int = 8
    pad: str = "none"
    prompt_style: str = "auto"
    on_error: str = "fail"
    shard_count: int = 4
    vlnce_episodes: str | None = None  # the single root's VLN-CE episodes file (format vlnce)
    sources: tuple[dict, ...] | None = None  # dataset.sources as sources.index_params gives them; None = root alone
    seed: int = 0  # dataset.seed: which samples a sampling rate keeps

    @classmethod
    def from_config(cls, config: dict) -> "IndexSettings":
        from vlnflow.data.sources import index_params, sources_from_config

        ds, hist = config["dataset"], config["history"]
        params = index_params(sources_from_config(config)) if ds.get("sources") else None
        return cls(
            root=ds["root"],
            format=ds.get("format", "auto"),
            annotations=ds.get("annotations"),
            max_frames=hist.get("max_frames", 8),
            pad=hist.get("pad", "none"),
            prompt_style=ds.get("prompt_style", "auto"),
            on_error=ds.get("on_error", "fail"),
            shard_count=config["shards"]["count"],
            vlnce_episodes=ds.get("vlnce_episodes"),
            sources=tuple(params) if params else None,
            seed=ds.get("seed", 0),
        )

    def source_list(self) -> list[Source]:
        """The sources to read: the configured list, or the single root as one unnamed source."""
        if self.sources:
            return sources_from_params(list(self.sources))
        resolve = lambda p: p if p is None or os.path.isabs(p) else os.path.join(self.root, p)  # noqa: E731
        return [
            Source(
                name=None,
                root=self.root,
                format=self.format,
                annotations=resolve(self.annotations),
                vlnce_episodes=resolve(self.vlnce_episodes),
                shards=self.shard_count,
            )
        ]

    def content_key(self) -> dict:
        """The settings that change rows for the same files (stored in the Parquet metadata)."""
        return {
            "index_version": INDEX_VERSION,
            "max_frames": self.max_frames,
            "pad": self.pad,
            "prompt_style": self.prompt_style,
        }


@dataclass
class IndexResult:
    format: str
    n_episodes: int
    n_samples: int
    n_skipped: int


def _read_dir_safely(job: tuple[str, str]) -> tuple[str, Episode | None, tuple[str, str] | None]:
    root, name = job
    try:
        return name, read_episode_dir(root, name), None
    except DatasetError as exc:
        return name, None, (exc.path or os.path.join(root, name), str(exc))
    except OSError as exc:  # unreadable file or directory: name it like any other data set error
        path = exc.filename or os.path.join(root, name)
        return name, None, (path, f"episode {name}: cannot read {path}: {exc.strerror or exc}")


def _map_episodes(reader, jobs: list, processes: int) -> Iterator[tuple[str, Episode | None, tuple[str, str] | None]]:
    """reader(job) for every job, in order; in `processes` forked workers for many jobs."""
    bar = tqdm(total=len(jobs), desc="index episodes", unit="ep", mininterval=1.0)
    if processes <= 1 or len(jobs) < POOL_MIN_EPISODES:
        for item in map(reader, jobs):
            bar.update()
            yield item
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(processes) as pool:
            for item in pool.imap(reader, jobs, chunksize=32):
                bar.update()
                yield item
    bar.close()


def _iter_episode_dirs(root: str, processes: int) -> Iterator[tuple[str, Episode | None, tuple[str, str] | None]]:
    return _map_episodes(_read_dir_safely, [(root, n) for n in list_episode_dirs(root)], processes)


def _iter_annotations(path: str, root: str, data: list | None = None) -> Iterator[tuple[str, Episode | None, tuple[str, str] | None]]:
    groups = group_by_episode(load_entries(path, data))
    for episode_id in tqdm(sorted(groups), desc="index episodes", unit="ep", mininterval=1.0):
        result = read_annotation_episode_safely(episode_id, groups[episode_id], root, path)
        if isinstance(result, DatasetError):
            yield episode_id, None, (result.path or path, str(result))
        else:
            yield episode_id, result, None


def _open_source(source: Source, processes: int) -> tuple[str, Iterator]:
    """(format, iterator of (episode id, Episode | None, (path, why) | None)) for one source, sorted by id."""
    try:
        fmt, path = detect_format(source.root, source.format, source.annotations, source.vlnce_episodes)
    except UserError as exc:  # name the source's own settings
        raise UserError(str(exc).replace("dataset.", f"{source.setting}.")) from None
    if fmt == "episodes":
        return fmt, _iter_episode_dirs(source.root, processes)
    if fmt == "vlnce":
        return fmt, _map_episodes(read_vlnce_episode_safely, vlnce_jobs(source.root, path), processes)
    data = None
    if not path.endswith(".jsonl"):
        data = load_json(path)
        if fmt == "annotations" and isinstance(data, list) and data and is_scalevln_entry(data[0]):
            fmt = "scalevln"
    if fmt == "scalevln":
        return fmt, _map_episodes(read_scalevln_episode_safely, scalevln_jobs(source.root, path, data), processes)
    if data is not None and not isinstance(data, list):
        raise DatasetError(f"annotations file {path} must hold a JSON list of entries", path=path)
    return fmt, _iter_annotations(path, source.root, data)


def _index_source(
    source: Source,
    settings: IndexSettings,
    processes: int,
    columns: dict[str, list],
    episode_rows: dict[str, list],
    skipped: list[tuple[str, str, str]],
) -> dict:
    """Append one source's samples and episodes; returns its summary (format, counts)."""
    fmt, reader = _open_source(source, processes)
    log.info("indexing %s: %s (format %s)", source.label, source.root, fmt)
    first_sample, first_episode, first_skipped = len(columns["sample_id"]), len(episode_rows["episode_id"]), len(skipped)
    for raw_id, episode, error in reader:
        episode_id = source.episode_id(raw_id)
        if episode is not None:
            if source.name is not None:
                episode.episode_id = episode_id
                episode.frames = [source.frame(f) for f in episode.frames]
            try:
                n = append_samples(episode, columns, settings.max_frames, settings.pad, settings.prompt_style)
            except ValueError as exc:
                error = (os.path.join(source.root, raw_id), f"episode {episode_id}: {exc}")
            else:
                for key, value in (
                    ("episode_id", episode_id),
                    ("n_steps", len(episode.frames)),
                    ("n_samples", n),
                    ("fingerprint", episode.fingerprint),
                    ("shard", source.shard_name(shard_index(episode_id, source.shards))),
                ):
                    episode_rows[key].append(value)
        if error is not None:
            if settings.on_error == "fail":
                raise DatasetError(
                    f"{error[1]} (set dataset.on_error: skip to leave such episodes out)",
                    episode=episode_id,
                    path=error[0],
                )
            log.warning("skipped episode %s: %s", episode_id, error[1])
            skipped.append((episode_id, error[0], error[1]))
    n_episodes = len(episode_rows["episode_id"]) - first_episode
    if not n_episodes:
        where = f"dataset.root {settings.root}" if source.name is None else f"{source.setting} ({source.root})"
        raise DatasetError(f"{where}: no usable episodes ({len(skipped) - first_skipped} skipped)")
    n_read = len(columns["sample_id"]) - first_sample
    if source.rate < 1:
        _apply_rate(source, settings.seed, columns, episode_rows, first_sample, first_episode)
    return {
        "format": fmt,
        "episodes": n_episodes,
        "samples": len(columns["sample_id"]) - first_sample,
        "samples_read": n_read,
        "rate": source.rate,
        "shards": source.shards,
        "skipped": len(skipped) - first_skipped,
    }


def _apply_rate(source: Source, seed: int, columns: dict[str, list], episode_rows: dict[str, list], first_sample: int, first_episode: int) -> None:
    """Keep the seeded share `source.rate` of the source's samples (rows from first_sample on)."""
    mask = keep_mask(columns["sample_id"][first_sample:], source.rate, seed, source.label)
    for name, values in columns.items():
        values[first_sample:] = [v for v, keep in zip(values[first_sample:], mask) if keep]
    kept: dict[str, int] = {}
    for episode_id in columns["episode_id"][first_sample:]:
        kept[episode_id] = kept.get(episode_id, 0) + 1
    ids = episode_rows["episode_id"][first_episode:]
    episode_rows["n_samples"][first_episode:] = [kept.get(e, 0) for e in ids]


def build_index(
    settings: IndexSettings,
    samples_path: str,
    episodes_path: str,
    skipped_path: str,
    processes: int = 1,
) -> IndexResult:
    """Index the data set's sources into the three output files; DatasetError on the first bad episode
    unless on_error=skip."""
    if settings.on_error not in ("fail", "skip"):
        raise UserError(f"dataset.on_error must be 'fail' or 'skip', got {settings.on_error!r}")
    sources = settings.source_list()
    columns = empty_columns()
    episode_rows: dict[str, list] = {name: [] for name in EPISODES_SCHEMA.names}
    skipped: list[tuple[str, str, str]] = []
    summaries = {s.label: _index_source(s, settings, processes, columns, episode_rows, skipped) for s in sources}

    single = sources[0].name is None
    if single:
        fmt = summaries[sources[0].label]["format"]
        metadata = {"vlnflow.index": json.dumps({**settings.content_key(), "source_format": fmt})}
    else:
        fmt = "+".join(sorted({v["format"] for v in summaries.values()}))
        metadata = {"vlnflow.index": json.dumps({**settings.content_key(), "seed": settings.seed, "sources": summaries})}
    samples = pa.table(columns, schema=SAMPLES_SCHEMA.with_metadata(metadata))
    episodes = pa.table(episode_rows, schema=EPISODES_SCHEMA.with_metadata(metadata))
    if not single:  # sources are read one after the other: restore the (episode_id, step) order
        samples = samples.sort_by([("episode_id", "ascending"), ("step", "ascending")])
        episodes = episodes.sort_by([("episode_id", "ascending")])
    for path in (samples_path, episodes_path, skipped_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_parquet_atomic(samples, samples_path)
    write_parquet_atomic(episodes, episodes_path)
    write_skipped(skipped, skipped_path)
    result = IndexResult(fmt, episodes.num_rows, samples.num_rows, len(skipped))
    log.info("index: %s", json.dumps(asdict(result)))
    if not single:
        for label, summary in summaries.items():
            log.info("index source %s: %s", label, json.dumps(summary))
    if skipped:
        log.warning("%d episode(s) skipped; listed in %s", len(skipped), skipped_path)
    return result


def write_skipped(skipped: list[tuple[str, str, str]], path: str) -> None:
    """skipped.csv: one line per left-out episode (header only when none)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(SKIPPED_FIELDS)
        writer.writerows(skipped)
    os.replace(tmp, path)
