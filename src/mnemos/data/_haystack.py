"""Private helpers shared by the long-context generators: seeding, argument checks, exact-length assembly."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_SENTENCE_END = re.compile(r"[.!?]\s")


def sample_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one sample, keyed by the config seed and the sample's place in the grid.

    Keying by (length, depth, index) rather than drawing from one stream means adding a length or a depth to a
    sweep leaves the samples already in it unchanged.
    """
    return np.random.default_rng([seed, *keys])


def check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_lengths(name: str, lengths: Sequence[int], minimum: int) -> None:
    if not isinstance(lengths, tuple) or not lengths:
        raise ValueError(f"{name} must be a non-empty tuple of ints, got {lengths!r}")
    for n in lengths:
        if not isinstance(n, int) or isinstance(n, bool) or n < minimum:
            raise ValueError(f"{name} must hold ints >= {minimum} (the fixed text plus a minimal haystack), got {n!r}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"{name} has repeated values: {lengths}")


def sentence_starts(text: str) -> np.ndarray:
    """Character offsets where a sentence may be inserted: 0 and every offset just after ``[.!?]`` + whitespace
    (the end of the text included when it ends that way). Sorted, unique, ``[S] int64``."""
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)]
    return np.unique(np.asarray(starts, dtype=np.int64))


def snap(boundaries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each target offset moved to its nearest boundary (the earlier one on a tie). Keeps sorted targets sorted."""
    right = np.clip(np.searchsorted(boundaries, targets, side="left"), 0, len(boundaries) - 1)
    left = np.clip(right - 1, 0, len(boundaries) - 1)
    take_left = np.abs(targets - boundaries[left]) <= np.abs(boundaries[right] - targets)
    return np.where(take_left, boundaries[left], boundaries[right])


def insert_pieces(text: str, offsets: Sequence[int], pieces: Sequence[str]) -> tuple[str, list[int]]:
    """Insert ``pieces[i]`` at character offset ``offsets[i]`` of ``text`` (offsets sorted, into the original text).

    Returns the new text and the UTF-8 byte offset (= byte-tokenizer token index) where each piece starts.
    """
    parts: list[str] = []
    starts: list[int] = []
    n_bytes = 0
    prev = 0
    for off, piece in zip(offsets, pieces, strict=True):
        chunk = text[prev:off]
        parts.append(chunk)
        n_bytes += len(chunk.encode("utf-8"))
        starts.append(n_bytes)
        parts.append(piece)
        n_bytes += len(piece.encode("utf-8"))
        prev = off
    parts.append(text[prev:])
    return "".join(parts), starts


def n_bytes(text: str) -> int:
    return len(text.encode("utf-8"))
