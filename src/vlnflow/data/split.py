"""The held-out validation split: whole episodes, chosen by a stable hash of the episode id.

An episode is held out when sha256("vlnflow-val\\0" + episode_id), read as a number in
[0, 1), is below `dataset.val_fraction`. Like the shard assignment (vlnflow.data.shards)
it depends on nothing but the id, so it is the same on every machine and rank, an episode
never lands on both sides, and adding episodes never moves an existing one across. The
salt makes it independent of the shard number, so held-out episodes spread over all shards.

The split is taken in training, from samples.parquet: the index, the shards and the
feature cache cover every sample, so the held-out samples have cached features too.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

_SALT = b"vlnflow-val\0"


def val_score(episode_id: str) -> float:
    """The episode's stable position in [0, 1); held out when below the fraction."""
    digest = hashlib.sha256(_SALT + str(episode_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_val_episode(episode_id: str, fraction: float) -> bool:
    return fraction > 0 and val_score(episode_id) < fraction


def split_by_episode(samples: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, held-out rows) of a samples table, in their original order, index reset."""
    if not 0 <= fraction < 1:
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return samples.reset_index(drop=True), samples.iloc[:0].reset_index(drop=True)
    episodes = samples["episode_id"].astype(str)
    held = {e: is_val_episode(e, fraction) for e in episodes.unique()}
    mask = np.fromiter((held[e] for e in episodes), dtype=bool, count=len(episodes))
    return samples[~mask].reset_index(drop=True), samples[mask].reset_index(drop=True)
