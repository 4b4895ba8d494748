"""The validation split (vlnflow.data.split): whole episodes, by a stable hash, near the asked fraction."""

from __future__ import annotations

import pandas as pd
import pytest

from vlnflow.data.shards import shard_index
from vlnflow.data.split import is_val_episode, split_by_episode, val_score


def samples(n_episodes: int, per_episode: int = 3) -> pd.DataFrame:
    rows = [{"sample_id": f"ep{e:05d}_{s}", "episode_id": f"ep{e:05d}", "step": s}
            for e in range(n_episodes) for s in range(per_episode)]
    return pd.DataFrame(rows)


def test_split_is_disjoint_by_episode_and_complete():
    table = samples(400)
    train, val = split_by_episode(table, 0.1)
    assert set(train.episode_id).isdisjoint(val.episode_id)
    assert len(train) + len(val) == len(table)
    assert sorted(train.sample_id.tolist() + val.sample_id.tolist()) == sorted(table.sample_id)
    assert len(val) % 3 == 0 and val.groupby("episode_id").size().eq(3).all()  # every sample of a held-out episode
    assert train.sample_id.tolist() == [s for s in table.sample_id if s in set(train.sample_id)]  # order kept


def test_split_is_deterministic_and_stable_when_episodes_are_added():
    table = samples(300)
    _, val_a = split_by_episode(table, 0.2)
    _, val_b = split_by_episode(table.sample(frac=1.0, random_state=3), 0.2)
    assert set(val_a.episode_id) == set(val_b.episode_id)  # row order does not matter
    assert sorted(set(val_a.episode_id)) == sorted(e for e in table.episode_id.unique() if is_val_episode(e, 0.2))
    _, val_grown = split_by_episode(samples(600), 0.2)  # 300 more episodes: none of the first 300 moves
    assert {e for e in val_grown.episode_id if int(e[2:]) < 300} == set(val_a.episode_id)
    assert val_score("ep00007") == val_score("ep00007") and 0 <= val_score("ep00007") < 1


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_fraction_of_episodes_is_respected(fraction):
    table = samples(20_000, per_episode=1)
    _, val = split_by_episode(table, fraction)
    share = val.episode_id.nunique() / 20_000
    assert abs(share - fraction) < 4 * (fraction * (1 - fraction) / 20_000) ** 0.5 + 1e-9, share  # 4 sigma
    assert val.episode_id.nunique() > 0


def test_zero_fraction_holds_nothing_out_and_bad_fractions_are_refused():
    table = samples(50)
    train, val = split_by_episode(table, 0.0)
    assert val.empty and len(train) == len(table)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            split_by_episode(table, bad)


def test_held_out_episodes_spread_over_the_shards():
    """A salted hash: the split is independent of the shard number, so no shard is all-validation."""
    episodes = [f"ep{e:05d}" for e in range(4000)]
    held = [e for e in episodes if is_val_episode(e, 0.25)]
    per_shard = pd.Series([shard_index(e, 4) for e in held]).value_counts()
    assert len(per_shard) == 4 and per_shard.min() > 0.2 * len(held)
