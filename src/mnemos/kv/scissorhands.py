"""Scissorhands: persistence of importance (Liu et al. 2023, arXiv 2305.17118, NeurIPS 2023; sec. 4, Alg. 1-2).

A token that received little attention over a recent history window is unlikely to matter later. The cache holds
at most ``budget`` entries (B); when a call leaves more, the policy counts, for each entry, how often it was
*unimportant* to the last ``history`` queries (w: its attention fell below the uniform share ``1 / n``, n the
number of entries that query sees) and drops the ``drop`` entries (m) with the highest counts, never one of the
``recent`` newest (r); the cache then holds ``B - m`` and fills up again, so it evicts in batches of m rather than
at every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mnemos.kv.base import EvictionContext, EvictionPolicy, attention_probs, check_int, resolve_budget

__all__ = ["Scissorhands", "unimportance_counts"]

_TOP = float(2**52)


def unimportance_counts(hist: Tensor, keys: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """``[B, Hkv, S]`` float32: for each entry, how many (query head, history query) pairs gave it less than the
    uniform share of their attention. ``hist`` ``[B, w, Hq, D]`` are the last w queries (positions ``seen - w ..
    seen - 1``), ``keys`` / ``k_pos`` the visible entries ``[B, S, Hkv, D]`` / ``[B, S, Hkv]``; a query judges only
    the entries it can see (causal, inside the window), over which its softmax is taken."""
    w = hist.shape[1]
    seen = int(k_pos.max()) + 1
    q_pos = torch.arange(seen - w, seen, device=keys.device)  # [w]
    probs = attention_probs(hist, keys, q_pos, k_pos, window)  # [B, Hkv, g, w, S]
    kp = k_pos.permute(0, 2, 1)[:, :, None, None, :]  # [B, Hkv, 1, 1, S]
    qp = q_pos[None, None, None, :, None]
    visible = kp <= qp
    if window is not None:
        visible = visible & (qp - kp < window)
    n_vis = visible.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, Hkv, 1, w, 1]
    low = visible & (probs < 1.0 / n_vis)
    return low.sum(dim=(2, 3)).float()  # [B, Hkv, S]


class Scissorhands(EvictionPolicy):
    """Budgeted eviction by persistence of importance (the module docstring has the algorithm).

    Args:
        budget: B, the most entries held; an int (tokens), a ratio of the tokens seen, or ``Bytes``.
        history: w, the queries whose attention is counted (the last w, across calls); default 32.
        recent: r, the newest entries never dropped; default 8.
        drop: m, the entries dropped at once when over budget, an int, or a fraction of B (default 0.1); at least 1,
            at most ``B - recent``.

    Reading (the paper's thresholds are not restated in its code, which is not public): "unimportant" is
    attention below ``1 / n`` (uniform), and the history queries' attention is recomputed at eviction time over the
    entries still held (from the stored queries, ``[B, w, Hq, D]``, counted in ``nbytes``), so entries evicted
    earlier do not take part in the normalisation.
    """

    needs_queries = True

    def __init__(self, budget: int | float = 1024, *, history: int = 32, recent: int = 8,
                 drop: int | float = 0.1) -> None:
        super().__init__(budget)
        self.history = check_int("history", history, 1)
        self.recent = check_int("recent", recent, 0)
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop <= 0 or \
                (isinstance(drop, float) and drop >= 1):
            raise ValueError(f"drop must be a positive int (entries) or a fraction in (0, 1) of the budget, got "
                             f"{drop!r}")
        self.drop = drop
        if type(self.budget) is int and self.budget <= self.recent:
            raise ValueError(f"budget ({self.budget}) must exceed recent ({self.recent})")

    def drop_count(self, capacity: int) -> int:
        """m for a budget of ``capacity`` entries (at least 1, leaving room for the recent window)."""
        m = self.drop if isinstance(self.drop, int) else int(self.drop * capacity)
        return max(1, min(m, capacity - self.recent))

    def cache_state(self, batch_size, n_heads, head_dim, device, dtype) -> dict[str, Tensor]:
        # the last w queries; the query heads are known at the first call (until then 0 tokens of the kv heads)
        return {"history": torch.empty(batch_size, 0, n_heads, head_dim, device=device, dtype=dtype)}

    def scores(self, ctx: EvictionContext) -> Tensor | None:
        hist = ctx.extra["history"]
        hist = ctx.q if hist.shape[1] == 0 else torch.cat((hist, ctx.q.to(hist.dtype)), dim=1)
        ctx.extra["history"] = hist[:, -self.history:].clone()  # [B, <= w, Hq, D]: never pins the call's queries
        n = ctx.keys.shape[1]
        if n <= ctx.target:
            return None
        ctx.keep = ctx.target - self.drop_count(ctx.target)
        counts = unimportance_counts(ctx.extra["history"], ctx.keys, ctx.positions, ctx.window)  # [B, Hkv, S]
        prio = -counts.permute(0, 2, 1).to(torch.float64)  # [B, S, Hkv]: fewer low-attention events rank higher
        recent = torch.arange(n, device=prio.device) >= n - self.recent  # [S]
        return torch.where(recent[None, :, None], _TOP + ctx.positions.to(torch.float64), prio)

    def target(self, seen: int, layer_idx: int, n_layers: int, entry_bytes: int = 1) -> int:
        return resolve_budget(self.budget, seen, entry_bytes)
