"""Reference models that need no weights, to calibrate the harness and to bracket real models on a plot.

- :class:`InductionLM`: exact recall by lookup. It predicts the token that followed the most recent earlier
  occurrence of the longest context suffix (up to ``max_order`` tokens) seen before, an idealised induction head
  with a perfect, ever-growing memory. It solves MQAR and the passkey task; it cannot paraphrase, so it fails the
  RULER-style "number"/"uuid" needles and BABILong, whose questions are worded differently from their facts.
- :class:`RandomBigramLM`: logits are a fixed random function of the current token only; it sees no context, so
  it scores chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mnemos.eval.stateful import StatefulLM

__all__ = ["InductionLM", "RandomBigramLM", "make_baseline"]


@dataclass
class _InductionRow:
    """One sequence's memory: for each order n, the token that last followed every n-gram seen."""

    tables: list[dict[tuple[int, ...], int]]
    recent: list[int] = field(default_factory=list)  # the last max_order tokens


class InductionLM(StatefulLM):
    """Longest-suffix lookup over everything seen (see the module docstring). State: Python dicts, O(T) entries.

    >>> m = InductionLM(vocab_size=16, max_order=2)
    >>> logits, _ = m.forward(torch.tensor([[3, 9, 5, 3]]), m.init_state(1))
    >>> int(logits[0, -1].argmax())  # 3 was followed by 9 before
    9
    """

    def __init__(self, vocab_size: int, max_order: int = 8):
        if max_order < 1:
            raise ValueError(f"max_order must be >= 1, got {max_order}")
        self.vocab_size = vocab_size
        self.max_order = max_order
        self.name = f"induction-{max_order}"
        self.state_growth = "growing"
        self.max_context = None

    def init_state(self, batch: int) -> list[_InductionRow]:
        return [_InductionRow([{} for _ in range(self.max_order)]) for _ in range(batch)]

    def forward(self, ids: Tensor, state: list[_InductionRow]) -> tuple[Tensor, Any]:
        B, T = ids.shape
        if len(state) != B:
            raise ValueError(f"state holds {len(state)} sequences, ids {B}")
        preds = torch.full((B, T), -1, dtype=torch.int64)  # [B, T], -1: no earlier match
        N = self.max_order
        for b, row in enumerate(state):
            out = preds[b].tolist()
            recent, tables = row.recent, row.tables
            for t, x in enumerate(ids[b].tolist()):
                for n in range(1, min(N, len(recent)) + 1):  # every n-gram ending just before x is followed by x
                    tables[n - 1][tuple(recent[-n:])] = x
                recent.append(x)
                if len(recent) > N:
                    del recent[0]
                for n in range(min(N, len(recent)), 0, -1):  # longest suffix seen before wins
                    nxt = tables[n - 1].get(tuple(recent[-n:]))
                    if nxt is not None:
                        out[t] = nxt
                        break
            preds[b] = torch.tensor(out)
        logits = torch.zeros(B, T, self.vocab_size)  # [B, T, V]; no match: all zero (argmax 0)
        hit = preds >= 0
        logits[hit, preds[hit]] = 1.0
        return logits, state

    def bytes_per_token(self) -> float:
        # one dict entry with its key tuple (~150 B) per order per token: an estimate, the state holds no tensors
        return 150.0 * self.max_order

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_order": self.max_order}


class RandomBigramLM(StatefulLM):
    """Logits ``A[x_t] @ B`` with fixed random ``A [V, 16]``, ``B [16, V]`` (seeded): context-blind, no state."""

    def __init__(self, vocab_size: int, seed: int = 0, rank: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(vocab_size, rank, generator=g)  # [V, R]
        self.B = torch.randn(rank, vocab_size, generator=g)  # [R, V]
        self.vocab_size = vocab_size
        self.name = "random-bigram"
        self.state_growth = "constant"
        self.max_context = None

    def init_state(self, batch: int) -> None:
        return None

    def forward(self, ids: Tensor, state: None) -> tuple[Tensor, None]:
        return self.A[ids] @ self.B, state  # [B, T, R] @ [R, V] -> [B, T, V]


def make_baseline(name: str, vocab_size: int) -> StatefulLM:
    """``"induction"`` / ``"induction:ORDER"`` -> :class:`InductionLM`; ``"random"`` -> :class:`RandomBigramLM`."""
    kind, _, arg = name.partition(":")
    if kind == "induction":
        try:
            order = int(arg) if arg else 8
        except ValueError:
            raise ValueError(f"baseline:induction:ORDER needs an integer order, got {arg!r}") from None
        return InductionLM(vocab_size, max_order=order)
    if kind == "random" and not arg:
        return RandomBigramLM(vocab_size)
    raise ValueError(f"unknown baseline {name!r}; known: induction, induction:ORDER, random")
