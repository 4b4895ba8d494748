"""A source's sampling rate: JanusVLN's `name%50`, a seeded share of that source's samples.

Upstream (data/__init__.py parse_sampling_rate, data_qwen.py) keeps
random.sample(entries, int(len(entries) * rate)) of a source's per-step entries. vlnflow keeps
the same number of samples, int(n * rate), chosen as the ones with the smallest
blake2b(seed, source, sample id) score. The choice therefore depends on the seed (dataset.seed)
and the sample ids only: the same on every machine and run, independent of reading order, and
when a source grows, a sample chosen before stays chosen unless a new sample outranks it, so
the cache rows of the kept samples stay reusable.
"""

from __future__ import annotations

import hashlib

import numpy as np


def sample_scores(sample_ids: list[str], seed: int, source: str) -> np.ndarray:
    """A stable 64-bit score per sample id (uint64)."""
    salt = f"vlnflow-rate\0{seed}\0{source}\0".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + s.encode(), digest_size=8).digest(), "big") for s in sample_ids),
        dtype=np.uint64,
        count=len(sample_ids),
    )


def kept_count(n: int, rate: float) -> int:
    """How many of n samples a rate keeps: int(n * rate), as upstream's random.sample call."""
    if not 0 < rate <= 1:
        raise ValueError(f"a sampling rate must be in (0, 1], got {rate}")
    return n if rate >= 1 else int(n * rate)


def keep_mask(sample_ids: list[str], rate: float, seed: int, source: str) -> np.ndarray:
    """Boolean mask over sample_ids: True for the int(n * rate) samples kept (all for rate 1)."""
    n = len(sample_ids)
    k = kept_count(n, rate)
    mask = np.zeros(n, dtype=bool)
    if k == n:
        mask[:] = True
        return mask
    if k == 0:
        return mask
    scores = sample_scores(sample_ids, seed, source)
    order = sorted(range(n), key=lambda i: (int(scores[i]), sample_ids[i]))  # score, then id for (unseen) ties
    mask[order[:k]] = True
    return mask
