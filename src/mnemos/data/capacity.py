"""State capacity, the data side: passkey retrieval over a sweep of context lengths, as in Stuffed Mamba (Chen et al.
2024), which measures how long a context a recurrent state of a given size can hold a passkey through.

The evaluation loop over models and state sizes lives in :mod:`mnemos.eval`; here are the prompts and the summary
statistic :func:`longest_length_at`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mnemos.data._haystack import check_int, check_lengths, sample_rng
from mnemos.data.niah import NIAHSample, make_niah_sample, min_length

__all__ = ["PasskeyCapacityConfig", "longest_length_at"]

_TAG = 21


@dataclass(frozen=True)
class PasskeyCapacityConfig:
    """``samples_per_length`` passkey prompts (see :mod:`mnemos.data.niah`) at every length in ``lengths`` (tokens).

    Depths are stratified: sample i of n sits at a depth drawn uniformly from ``[i / n, (i + 1) / n]``, so every
    length covers the whole context evenly whatever n is.

    >>> by_length = PasskeyCapacityConfig(lengths=(512, 1024), samples_per_length=2).build(seed=0)
    >>> {length: [s.input_ids.shape[0] for s in samples] for length, samples in by_length.items()}
    {512: [512, 512], 1024: [1024, 1024]}
    """

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768)
    samples_per_length: int = 20

    def __post_init__(self):
        check_lengths("lengths", self.lengths, min_length("passkey"))
        check_int("samples_per_length", self.samples_per_length, 1)

    def build(self, seed: int) -> dict[int, list[NIAHSample]]:
        """``{length: samples}`` in the order of ``lengths``; each sample seeded by ``(seed, length, index)``."""
        check_int("seed", seed, 0)
        out: dict[int, list[NIAHSample]] = {}
        n = self.samples_per_length
        for length in self.lengths:
            out[length] = []
            for i in range(n):
                rng = sample_rng(seed, _TAG, length, i)
                depth = (i + rng.random()) / n
                out[length].append(make_niah_sample("passkey", length, depth, rng))
        return out


def longest_length_at(acc_by_length: Mapping[int, float], threshold: float = 0.95) -> int | None:
    """The longest length up to which accuracy stays at or above ``threshold``, or None if the shortest misses it.

    Lengths are read in increasing order and the scan stops at the first miss, so a lucky long length after a
    failure does not count. Accuracies must lie in [0, 1].

    >>> longest_length_at({1024: 1.0, 2048: 0.97, 4096: 0.6, 8192: 0.96})
    2048
    """
    if not acc_by_length:
        raise ValueError("acc_by_length is empty")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    for length, acc in acc_by_length.items():
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"acc_by_length[{length}] must be in [0, 1], got {acc!r}")
    best = None
    for length in sorted(acc_by_length):
        if acc_by_length[length] < threshold:
            break
        best = length
    return best
