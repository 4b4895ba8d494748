"""Build the sample index: every (episode, step) of the data set as one Parquet row.

results/index/samples.parquet holds the columns of records.SAMPLE_COLUMNS sorted by
(episode_id, step); episodes.parquet one row per episode with its file fingerprint
and shard; skipped.csv every episode left out under `dataset.on_error: skip` (always
written, so 'nothing skipped' is visible too). Images are never decoded.
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
from vlnflow.data.episode_dirs import list_episode_dirs, read_episode_dir
from vlnflow.data.layout import detect_format
from vlnflow.data.records import Episode, append_samples, empty_columns
from vlnflow.data.shards import shard_of, write_parquet_atomic
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

    @classmethod
    def from_config(cls, config: dict) -> "IndexSettings":
        ds, hist = config["dataset"], config["history"]
        return cls(
            root=ds["root"],
            format=ds.get("format", "auto"),
            annotations=ds.get("annotations"),
            max_frames=hist.get("max_frames", 8),
            pad=hist.get("pad", "none"),
            prompt_style=ds.get("prompt_style", "auto"),
            on_error=ds.get("on_error", "fail"),
            shard_count=config["shards"]["count"],
        )

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


def _iter_episode_dirs(root: str, processes: int) -> Iterator[tuple[str, Episode | None, tuple[str, str] | None]]:
    names = list_episode_dirs(root)
    jobs = [(root, n) for n in names]
    bar = tqdm(total=len(jobs), desc="index episodes", unit="ep", mininterval=1.0)
    if processes <= 1 or len(jobs) < POOL_MIN_EPISODES:
        results = map(_read_dir_safely, jobs)
        for item in results:
            bar.update()
            yield item
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(processes) as pool:
            for item in pool.imap(_read_dir_safely, jobs, chunksize=32):
                bar.update()
                yield item
    bar.close()


def _iter_annotations(path: str, root: str) -> Iterator[tuple[str, Episode | None, tuple[str, str] | None]]:
    groups = group_by_episode(load_entries(path))
    for episode_id in tqdm(sorted(groups), desc="index episodes", unit="ep", mininterval=1.0):
        result = read_annotation_episode_safely(episode_id, groups[episode_id], root, path)
        if isinstance(result, DatasetError):
            yield episode_id, None, (result.path or path, str(result))
        else:
            yield episode_id, result, None


def build_index(
    settings: IndexSettings,
    samples_path: str,
    episodes_path: str,
    skipped_path: str,
    processes: int = 1,
) -> IndexResult:
    """Index dataset.root into the three output files; DatasetError on the first bad episode unless on_error=skip."""
    if settings.on_error not in ("fail", "skip"):
        raise UserError(f"dataset.on_error must be 'fail' or 'skip', got {settings.on_error!r}")
    fmt, annotations = detect_format(settings.root, settings.format, settings.annotations)
    log.info("indexing %s (format %s%s)", settings.root, fmt, f", annotations {annotations}" if annotations else "")
    if fmt == "episodes":
        source = _iter_episode_dirs(settings.root, processes)
    else:
        source = _iter_annotations(annotations, settings.root)

    columns = empty_columns()
    episode_rows: dict[str, list] = {name: [] for name in EPISODES_SCHEMA.names}
    skipped: list[tuple[str, str, str]] = []
    for episode_id, episode, error in source:
        if episode is not None:
            try:
                n = append_samples(episode, columns, settings.max_frames, settings.pad, settings.prompt_style)
            except ValueError as exc:
                error = (os.path.join(settings.root, episode_id), f"episode {episode_id}: {exc}")
            else:
                for key, value in (
                    ("episode_id", episode_id),
                    ("n_steps", len(episode.frames)),
                    ("n_samples", n),
                    ("fingerprint", episode.fingerprint),
                    ("shard", shard_of(episode_id, settings.shard_count)),
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

    if not episode_rows["episode_id"]:
        raise DatasetError(f"dataset.root {settings.root}: no usable episodes ({len(skipped)} skipped)")
    metadata = {"vlnflow.index": json.dumps({**settings.content_key(), "source_format": fmt})}
    samples = pa.table(columns, schema=SAMPLES_SCHEMA.with_metadata(metadata))
    episodes = pa.table(episode_rows, schema=EPISODES_SCHEMA.with_metadata(metadata))
    for path in (samples_path, episodes_path, skipped_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_parquet_atomic(samples, samples_path)
    write_parquet_atomic(episodes, episodes_path)
    write_skipped(skipped, skipped_path)
    result = IndexResult(fmt, episodes.num_rows, samples.num_rows, len(skipped))
    log.info("index: %s", json.dumps(asdict(result)))
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
