"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al. 2023, §3).

A sequence starts with K key-value pairs ``k_1 v_1 k_2 v_2 ... k_K v_K``; the remaining positions hold each key once
more, as a query, among noise tokens. At a query the model must output the value that followed that key in the
context. Keys come from the lower half of the vocabulary (token 0 excluded, it is the blank of
``random_non_queries=False``), values from the upper half.

``noise="zoology"`` (the default) draws the other tokens after the context as Zoology's generator does
(``zoology/data/multiquery_ar.py``, ``multiquery_ar``): uniform over the whole vocabulary, so noise may repeat a
key of the sample, unscored. ``noise="disjoint"`` keeps the sample's keys out of the noise: every key after the
context is then a scored query and nothing overwrites a stored pair, an easier task whose scores do not compare with
Zoology's at large K or L. ``noise="values"`` draws it from the value ids only: no key id at all after the context
but the planted queries, so the noise holds no key-then-value bigram that looks like a pair (a diagnostic of what
those cost a recurrent memory past its training length, docs/RESULTS.md; not a training task).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mnemos.data._haystack import check_int

__all__ = ["IGNORE_INDEX", "MQARConfig", "MQAR_EXTRAPOLATION_GRID", "MQAR_NOISE", "MQAR_ZOOLOGY_GRID", "mqar_grid"]

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

# How the tokens after the context that are not queries are drawn (MQARConfig.noise).
MQAR_NOISE: tuple[str, ...] = ("zoology", "disjoint", "values")

# (seq_len, num_kv_pairs) of Zoology's MQAR training grid (vocab 8192): one kv pair per 16 tokens.
MQAR_ZOOLOGY_GRID: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16))
# Longer sequences and denser memories than seen in training, up to K = L / 4, the densest MQAR allows.
MQAR_EXTRAPOLATION_GRID: tuple[tuple[int, int], ...] = (
    (512, 32), (512, 64), (512, 128), (1024, 64), (1024, 128), (1024, 256),
)


@dataclass(frozen=True)
class MQARConfig:
    """MQAR with vocabulary ``vocab_size`` (V), ``num_kv_pairs`` (K) pairs and ``seq_len`` (L) tokens.

    ``build(seed)`` returns ``(inputs, labels)``, both ``[N, L] int64`` with N = ``num_examples``:

    - ``inputs[:, :2K]`` is the context ``k_1 v_1 ... k_K v_K``; keys are distinct, drawn from ``[1, V // 2)``,
      values distinct, drawn from ``[V // 2, V)``.
    - the rest has G = ``(L - 2K) // 2`` query slots at positions ``2K, 2K + 2, ...``; key ``k_i`` is asked at slot
      ``g_i``, the slots being drawn without replacement with probability ``∝ (g + 1) ** (power_a - 1)``, the
      power law of Zoology (small ``power_a`` puts most queries soon after the context, with a long tail).
    - ``labels[n, t] = v_i`` where ``inputs[n, t]`` is the query of ``k_i``: the model reading the query token must
      predict the value (next-token style, no extra shift needed). Everywhere else ``labels`` is ``IGNORE_INDEX``.
    - the other positions after the context are noise, or 0 when ``random_non_queries=False`` (``noise`` is then
      moot). ``noise="zoology"``: uniform over ``[0, V)`` as in Zoology, so a noise token may equal one of the
      sample's keys (or values, or 0); such a repeat is not scored (only the planted queries are) and, followed by
      a random token, can overwrite what a recurrent model stored for that key. ``noise="disjoint"``: uniform over
      ``[0, V)`` minus the sample's own keys, so every key after the context is a scored query (the easier task).
      ``noise="values"``: uniform over the value ids ``[V // 2, V)``, so no key id but the queries follows the
      context (no noise bigram looks like a key-value pair).
      Keys, values, query slots and labels are the same in every mode for the same seed; only the noise differs.

    Worked example (V = 16, K = 3, L = 12; keys in 1..7, values in 8..15)::

        >>> inputs, labels = MQARConfig(vocab_size=16, seq_len=12, num_kv_pairs=3, num_examples=1).build(seed=0)
        >>> inputs
        tensor([[ 4, 15,  7, 14,  5,  8,  7,  8,  4, 14,  5, 13]])
        >>> labels
        tensor([[-100, -100, -100, -100, -100, -100,   14, -100,   15, -100,    8, -100]])

    The context is 4->15, 7->14, 5->8. The G = 3 query slots are positions 6, 8, 10: key 7 is asked at 6 (label
    14), key 4 at 8 (label 15), key 5 at 10 (label 8); positions 7, 9, 11 are noise (8, 14, 13: here two of them
    are values of the context; any token may be). The same seed with ``noise="disjoint"`` gives the same context,
    queries and labels and other noise, never a key::

        >>> MQARConfig(vocab_size=16, seq_len=12, num_kv_pairs=3, num_examples=1, noise="disjoint").build(seed=0)[0]
        tensor([[ 4, 15,  7, 14,  5,  8,  7, 10,  4, 15,  5, 13]])

    With ``noise="zoology"``, ``vocab_size`` must exceed ``seq_len``, the bound Zoology's generator asserts (the
    noise then holds fewer than ``K * L / V < K`` repeated keys on average). Zoology also asserts an even
    ``seq_len``; mnemos accepts an odd one, its last token being noise.

    Defaults follow Zoology (V = 8192, ``power_a`` = 0.01); see :data:`MQAR_ZOOLOGY_GRID` and
    :data:`MQAR_EXTRAPOLATION_GRID` for (L, K) pairs, and :func:`mqar_grid` to make configs from them.
    """

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    num_examples: int = 1000
    power_a: float = 0.01
    random_non_queries: bool = True
    noise: str = "zoology"

    def __post_init__(self):
        check_int("num_kv_pairs", self.num_kv_pairs, 1)
        check_int("num_examples", self.num_examples, 1)
        check_int("vocab_size", self.vocab_size, 4)
        check_int("seq_len", self.seq_len, 4)
        K = self.num_kv_pairs
        if self.seq_len < 4 * K:
            raise ValueError(
                f"seq_len must be >= 4 * num_kv_pairs = {4 * K} (2K context tokens + K query slots of 2 tokens), "
                f"got seq_len={self.seq_len}, num_kv_pairs={K}"
            )
        n_keys, n_values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if K > min(n_keys, n_values):
            raise ValueError(
                f"vocab_size={self.vocab_size} has {n_keys} key ids and {n_values} value ids, too few for "
                f"num_kv_pairs={K} distinct pairs; raise vocab_size to >= {2 * K + 2}"
            )
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise ValueError(f"power_a must be a number > 0, got {self.power_a!r}")
        if not isinstance(self.random_non_queries, bool):
            raise ValueError(f"random_non_queries must be a bool, got {self.random_non_queries!r}")
        if not isinstance(self.noise, str) or self.noise not in MQAR_NOISE:
            raise ValueError(f"noise must be one of {', '.join(map(repr, MQAR_NOISE))}, got {self.noise!r}")
        if self.noise == "zoology" and self.vocab_size <= self.seq_len:
            raise ValueError(
                f"noise='zoology' needs vocab_size > seq_len, as Zoology's generator asserts; got "
                f"vocab_size={self.vocab_size}, seq_len={self.seq_len} (raise vocab_size, or use noise='disjoint')"
            )

    def build(self, seed: int) -> tuple[Tensor, Tensor]:
        """``(inputs [N, L] int64, labels [N, L] int64)``; same seed -> identical tensors."""
        check_int("seed", seed, 0)
        rng = np.random.default_rng(seed)
        N, L, K, V = self.num_examples, self.seq_len, self.num_kv_pairs, self.vocab_size
        half = V // 2

        keys = np.stack([rng.choice(half - 1, size=K, replace=False) + 1 for _ in range(N)])  # [N, K] in [1, V/2)
        values = np.stack([rng.choice(V - half, size=K, replace=False) + half for _ in range(N)])  # [N, K] in [V/2, V)

        # Query slots without replacement under the power law, all rows at once: the Gumbel top-K trick draws the
        # same ordered sample as K sequential weighted draws.
        n_slots = (L - 2 * K) // 2
        log_p = (self.power_a - 1.0) * np.log(np.arange(1, n_slots + 1))  # [G], unnormalised
        scores = log_p + rng.gumbel(size=(N, n_slots))  # [N, G]
        slots = np.argsort(-scores, axis=1, kind="stable")[:, :K]  # [N, K]: slot of key i is slots[:, i]
        query_pos = 2 * K + 2 * slots  # [N, K]

        inputs = np.zeros((N, L), dtype=np.int64)
        inputs[:, 0 : 2 * K : 2] = keys
        inputs[:, 1 : 2 * K : 2] = values
        rows = np.arange(N)[:, None]  # [N, 1]
        if self.random_non_queries:  # the query slots are overwritten next
            if self.noise == "zoology":
                inputs[:, 2 * K :] = rng.integers(0, V, size=(N, L - 2 * K))
            elif self.noise == "values":
                inputs[:, 2 * K :] = rng.integers(half, V, size=(N, L - 2 * K))
            else:
                inputs[:, 2 * K :] = _noise_without(keys, V, (N, L - 2 * K), rng)
        inputs[rows, query_pos] = keys
        labels = np.full((N, L), IGNORE_INDEX, dtype=np.int64)
        labels[rows, query_pos] = values
        return torch.from_numpy(inputs), torch.from_numpy(labels)


def _noise_without(excluded: np.ndarray, vocab_size: int, shape: tuple[int, int], rng: np.random.Generator):
    """``[N, M]`` tokens uniform over ``[0, vocab_size)`` minus row n's ``excluded[n]`` (``[N, K]``, distinct)."""
    N, K = excluded.shape
    r = rng.integers(0, vocab_size - K, size=shape)  # [N, M]: rank among the allowed tokens
    # The r-th allowed token is r + #{j : s_j - j <= r} for the sorted excluded s_j. Offsetting row n by
    # n * vocab_size turns the per-row counts into one searchsorted over a globally sorted array.
    shifted = np.sort(excluded, axis=1) - np.arange(K)  # [N, K], non-decreasing per row, in [0, vocab_size)
    offset = np.arange(N)[:, None] * vocab_size  # [N, 1]
    counts = np.searchsorted((shifted + offset).ravel(), (r + offset).ravel(), side="right").reshape(shape)
    return r + counts - np.arange(N)[:, None] * K


def mqar_grid(
    pairs: tuple[tuple[int, int], ...] = MQAR_ZOOLOGY_GRID,
    *,
    vocab_size: int = 8192,
    num_examples: int = 1000,
    power_a: float = 0.01,
    noise: str = "zoology",
) -> list[MQARConfig]:
    """One :class:`MQARConfig` per ``(seq_len, num_kv_pairs)`` in ``pairs``."""
    if not pairs:
        raise ValueError("pairs is empty")
    return [
        MQARConfig(vocab_size=vocab_size, seq_len=L, num_kv_pairs=K, num_examples=num_examples, power_a=power_a,
                   noise=noise)
        for L, K in pairs
    ]
