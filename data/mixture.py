"""Length buckets and the token mix across (source, bucket) streams.

Every training piece falls in one bucket by its length: edges [0, e1, ..., eK] make buckets (0, e1], (e1, e2],
..., so "0-4k" includes a piece of exactly 4096 tokens; the last bucket also takes pieces longer than eK.
A stream is one (source, bucket) pair. `plan_mix` gives each stream its target share of
tokens from the source weights and the bucket ratios, dropping empty streams (with a warning) and
renormalising. `DeficitScheduler` then picks, for every next piece, the stream furthest behind its target
share of the tokens scheduled so far: deterministic, a few ints of state, and the realised shares converge to
the targets (the error is at most one piece per stream, whatever the piece lengths).
"""
from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import numpy as np

from data.config import DataError

log = logging.getLogger(__name__)


def bucket_of(lengths: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """Bucket index of every length: bucket i holds (edges[i], edges[i+1]]; the last one is open above."""
    return np.searchsorted(np.asarray(edges[1:-1], np.int64), lengths, side="left").astype(np.int64)


def _fmt(n: int) -> str:
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def bucket_labels(edges: Sequence[int]) -> List[str]:
    return [f"{_fmt(lo)}-{_fmt(hi)}" for lo, hi in zip(edges, edges[1:])]


def plan_mix(tokens: np.ndarray, weights: Sequence[float], ratios: Sequence[float], mix_by: str,
             source_labels: Sequence[str], bucket_names: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """tokens: [S, K] training tokens available per stream. Returns the target token shares [S, K] (zero for
    unused streams, summing to 1) and the warnings about what was dropped."""
    weights = np.asarray(weights, np.float64)
    ratios = np.asarray(ratios, np.float64)
    usable = (tokens > 0) & (ratios[None, :] > 0)
    warnings = []
    empty = [name for b, name in enumerate(bucket_names) if ratios[b] > 0 and not usable[:, b].any()]
    if empty:
        kept = [name for b, name in enumerate(bucket_names) if usable[:, b].any()]
        warnings.append(f"length bucket(s) {', '.join(empty)} empty (no training pieces of those lengths at this "
                        f"seq_len); the bucket ratios are renormalised over {', '.join(kept) or 'none'}")
    for s, name in enumerate(source_labels):
        if not usable[s].any():
            warnings.append(f"source {name!r} has no training pieces in a bucket with a positive ratio; it is "
                            "left out and the source weights renormalised")
    if not usable.any():
        raise DataError("empty corpus: no training documents are left (after the held-out split, min_tokens, "
                        "long_docs=drop and the buckets with a positive ratio); add data or relax the filters")
    shares = np.zeros(tokens.shape, np.float64)
    if mix_by == "source":
        outer = weights * usable.any(1)
        for s in np.nonzero(outer)[0]:
            inner = ratios * usable[s]
            shares[s] = outer[s] / outer.sum() * inner / inner.sum()
    else:
        outer = ratios * usable.any(0)
        for b in np.nonzero(outer)[0]:
            inner = weights * usable[:, b]
            shares[:, b] = outer[b] / outer.sum() * inner / inner.sum()
    return shares, warnings


class DeficitScheduler:
    """Chooses the stream whose scheduled tokens lag furthest behind `target * total` (ties: lowest index)."""

    def __init__(self, targets: Sequence[float]):
        self.targets = [float(t) for t in targets]
        self.scheduled = [0] * len(self.targets)
        self.total = 0

    def pick(self) -> int:
        best, best_gap = -1, -float("inf")
        total = self.total
        for k, (p, c) in enumerate(zip(self.targets, self.scheduled)):
            if p > 0:
                gap = p * total - c
                if gap > best_gap:
                    best, best_gap = k, gap
        return best

    def add(self, k: int, n: int) -> None:
        self.scheduled[k] += n
        self.total += n
