"""Named data sources: what `dataset.sources` (or today's single `dataset.root`) asks the index to read.

JanusVLN trains its Extra stage on several trajectory sets at once (R2R-CE, RxR-CE, two DAgger
rounds, ScaleVLN), each in its own folder and layout, and optionally a seeded fraction of one
(`name%50`). A `Source` is one such set: a name, a folder, a format, and a sampling rate.

Two shapes of config:
- today's single `dataset.root` (no `dataset.sources`): one unnamed source; episode ids, sample ids,
  frame paths and shard names are exactly what they were before sources existed;
- `dataset.sources`: a list of named sources. Every path in an entry is relative to `dataset.root`
  (the folder the frame paths of the index are relative to) unless absolute. A source's episode ids
  become `<name>/<episode id>` (sample ids `<name>/<episode id>/<step>`), so two sources may use the
  same episode numbers, and its shards are named `<name>.shard_<k>`, so adding a source adds files
  and never changes another source's.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from vlnflow.data.fingerprint import dataset_fingerprint, stats_digest

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
SHARD_FILE = re.compile(r"^(?:(?P<source>[A-Za-z0-9][A-Za-z0-9_-]*)\.)?shard_(?P<index>\d{5})$")
SINGLE_ROOT = "dataset.root"  # how reports label the unnamed source of a single-root config


@dataclass(frozen=True)
class Source:
    """One data source, its paths resolved against dataset.root.

    `root`, `annotations` and `vlnce_episodes` are paths to open; `prefix` is what the source's frame
    paths get in front so that they are relative to dataset.root ('' for the unnamed source)."""

    name: str | None
    root: str
    prefix: str = ""
    format: str = "auto"
    annotations: str | None = None
    vlnce_episodes: str | None = None
    rate: float = 1.0
    shards: int = 4

    def episode_id(self, raw: str) -> str:
        """The episode id the index stores: `<name>/<raw>` for a named source, `raw` otherwise."""
        return raw if self.name is None else f"{self.name}/{raw}"

    def frame(self, path: str) -> str:
        """A frame path relative to this source's root -> relative to dataset.root (or absolute)."""
        if not self.prefix or os.path.isabs(path):
            return path
        return posixpath.normpath(posixpath.join(self.prefix, path))

    def shard_name(self, index: int) -> str:
        return shard_file_name(self.name, index)

    @property
    def label(self) -> str:
        return SINGLE_ROOT if self.name is None else self.name

    @property
    def setting(self) -> str:
        """The config key to name in errors about this source."""
        return "dataset" if self.name is None else f"dataset.sources[{self.name}]"


def shard_file_name(source: str | None, index: int) -> str:
    """'shard_00007' (single root) or '<source>.shard_00007'."""
    base = f"shard_{index:05d}"
    return base if source is None else f"{source}.{base}"


def parse_shard_name(name: str) -> tuple[str | None, int] | None:
    """(source or None, shard number) of a shard name, or None when the name is no shard name."""
    match = SHARD_FILE.match(name)
    if match is None:
        return None
    return match.group("source"), int(match.group("index"))


def source_of_shard(name: str) -> str:
    """The source label of a shard (SINGLE_ROOT for a single-root config's shards)."""
    parsed = parse_shard_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a shard name")
    return parsed[0] or SINGLE_ROOT


def _resolve(base: str, path: str | None) -> str | None:
    if path is None:
        return None
    return path if os.path.isabs(path) else os.path.join(base, path)


def sources_from_config(config: dict) -> list[Source]:
    """The sources a validated config asks for, in config order."""
    ds = config["dataset"]
    base = ds["root"]
    count = config.get("shards", {}).get("count", 4)
    if not ds.get("sources"):
        return [
            Source(
                name=None,
                root=base,
                format=ds.get("format", "auto"),
                annotations=_resolve(base, ds.get("annotations")),
                vlnce_episodes=_resolve(base, ds.get("vlnce_episodes")),
                shards=count,
            )
        ]
    out = []
    for entry in ds["sources"]:
        root = entry.get("root") or "."
        out.append(
            Source(
                name=entry["name"],
                root=_resolve(base, root),
                prefix=root if os.path.isabs(root) else posixpath.normpath(root.replace(os.sep, "/")),
                format=entry.get("format", "auto"),
                annotations=_resolve(base, entry.get("annotations")),
                vlnce_episodes=_resolve(base, entry.get("vlnce_episodes")),
                rate=float(entry.get("rate", 1.0)),
                shards=int(entry.get("shards") or count),
            )
        )
    return out


def config_problem(config: dict) -> tuple[str, str] | None:
    """(setting, message) for a dataset section the schema cannot judge, or None when it is fine."""
    ds = config["dataset"]
    sources = ds.get("sources")
    if sources is None:
        return None
    for key, default in (("format", "auto"), ("annotations", None), ("vlnce_episodes", None)):
        if ds.get(key, default) != default:
            return (
                f"dataset.{key}",
                f"applies to a single dataset.root; with dataset.sources set it per source (dataset.sources[i].{key})",
            )
    seen: dict[str, int] = {}
    for i, entry in enumerate(sources):
        name = entry["name"]
        if name in seen:
            return f"dataset.sources[{i}].name", f"{name!r} is also the name of dataset.sources[{seen[name]}]"
        seen[name] = i
        fmt = entry.get("format", "auto")
        if entry.get("vlnce_episodes") and fmt not in ("auto", "vlnce"):
            return f"dataset.sources[{i}].vlnce_episodes", f"is set but the format is {fmt!r} (only vlnce reads it)"
        if fmt == "vlnce" and not entry.get("vlnce_episodes"):
            return f"dataset.sources[{i}].vlnce_episodes", "format vlnce needs the VLN-CE episodes file (train.json.gz)"
        if entry.get("annotations") and fmt in ("episodes", "vlnce"):
            return f"dataset.sources[{i}].annotations", f"is set but the format is {fmt!r}"
    return None


def source_fingerprints(sources: list[Source]) -> dict[str, str] | str:
    """Stat-walk fingerprint per source (one value for a single root, as before sources existed):
    it changes when a file under a source's root, or its annotations / episodes file, changes."""
    if len(sources) == 1 and sources[0].name is None and sources[0].vlnce_episodes is None:
        return dataset_fingerprint(sources[0].root)
    out = {}
    for source in sources:
        extra = []
        for path in (source.annotations, source.vlnce_episodes):
            if path is not None:
                try:
                    st = os.stat(path)
                    extra.append((path, st.st_size, st.st_mtime_ns))
                except OSError:
                    extra.append((path, -1, -1))
        out[source.label] = stats_digest([(dataset_fingerprint(source.root), 0, 0), *extra])
    return out


def index_params(sources: list[Source]) -> list[dict] | None:
    """The sources as the index rule's params see them (None for a single root, keeping its params)."""
    if len(sources) == 1 and sources[0].name is None:
        return None
    return [
        {
            "name": s.name,
            "root": s.root,
            "prefix": s.prefix,
            "format": s.format,
            "annotations": s.annotations,
            "vlnce_episodes": s.vlnce_episodes,
            "rate": s.rate,
            "shards": s.shards,
        }
        for s in sources
    ]


def sources_from_params(items: list[dict]) -> list[Source]:
    return [Source(**item) for item in items]
