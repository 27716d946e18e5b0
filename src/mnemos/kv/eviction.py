"""Token-eviction policies: StreamingLLM, H2O, SnapKV, PyramidKV and the L2-norm rule.

Each is an ``EvictionPolicy``: a budget (tokens, or a ratio of the tokens seen; see ``mnemos.kv.base``) and a keep
priority per visible entry, ``[B, S, H]``; ``EvictingKVCache`` keeps the highest ``target`` per batch row and
key/value head after every call (prefill, each chunk of a streamed prefill, each decoding step). The algorithms, their
defaults and every reading of an ambiguous point are in docs/KV.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mnemos.kv.base import (
    EvictionContext,
    EvictionPolicy,
    attention_probs,
    check_int,
    check_ratio,
    resolve_budget,
)

__all__ = ["StreamingLLM", "H2O", "SnapKV", "PyramidKV", "L2Norm", "pyramid_budgets", "snapkv_scores"]

# float64 priorities: integers up to 2**53 are exact, so "forced first, then by position" orders are exact
_TOP = float(2**52)


class StreamingLLM(EvictionPolicy):
    """Attention sinks + a recent window (Xiao et al. 2023, arXiv 2309.17453, sec. 3.2, "rolling KV cache with
    attention sinks").

    After every call the cache holds the first ``sinks`` tokens and the most recent ``budget - sinks``:
    ``[0, s) ∪ [n - (budget - s), n)``; content-independent, the same for every head.

    Args:
        budget: s + w, the entries kept; default 4 + 2000 (``examples/run_streaming_llama.py``: start 4, recent 2000).
        sinks: s, default 4.
        rerotate: False (default): kept keys keep their original RoPE positions and new tokens continue at their
            absolute positions (kvpress). True: the reference's positional shift: kept keys are re-rotated to their
            in-cache positions ``0 .. S-1`` after each eviction and a new token is rotated at its cache index.
    """

    def __init__(self, budget: int | float = 2004, *, sinks: int = 4, rerotate: bool = False) -> None:
        super().__init__(budget)
        self.sinks = check_int("sinks", sinks, 0)
        if type(self.budget) is int and self.budget <= self.sinks:  # tokens (not a ratio, not Bytes)
            raise ValueError(f"budget ({self.budget}) must exceed sinks ({self.sinks}): no room for a recent window")
        if not isinstance(rerotate, bool):
            raise ValueError(f"rerotate must be a bool, got {rerotate!r}")
        self.rerotate = rerotate

    def scores(self, ctx: EvictionContext) -> Tensor | None:
        pos = ctx.positions.to(torch.float64)  # [B, S, H]
        return torch.where(pos < self.sinks, _TOP - pos, pos)  # sinks first (earliest first), then the most recent


class H2O(EvictionPolicy):
    """Heavy hitters + a recent window (Zhang et al. 2023, arXiv 2306.14048, Alg. 1 "H2 eviction").

    Each entry's score is the attention it has received, accumulated over every query since it arrived (softmax
    probabilities summed over queries and over the query heads of its key/value group, float32); new entries start
    at the attention the call's own queries give them. After every call, if more than ``budget`` entries are visible,
    the last ``k_r`` are kept and the other ``budget - k_r`` are the highest-scoring of the rest (per batch row and
    head); evicted entries' scores are dropped (the reference's ``real_drop``).

    Args:
        budget: k_h + k_r; default 0.2 (the paper's 20 % KV cache: ``heavy_ratio = recent_ratio = 0.1``).
        recent: k_r as an int (tokens) or as a fraction of the budget (default 0.5: heavy and recent equal, as in
            the paper's 10 % + 10 %).
    """

    entry_state = ("score",)
    needs_queries = True

    def __init__(self, budget: int | float = 0.2, *, recent: int | float = 0.5) -> None:
        super().__init__(budget)
        if isinstance(recent, int) and not isinstance(recent, bool):
            self.recent = check_int("recent", recent, 0)
        else:
            self.recent = check_ratio("recent", recent, 0.0, 1.0)

    def recent_size(self, target: int) -> int:
        """k_r for a budget of ``target`` entries."""
        if isinstance(self.recent, int):
            return min(self.recent, target)
        return target - int(target * (1.0 - self.recent) + 1e-9)

    def scores(self, ctx: EvictionContext) -> Tensor | None:
        probs = attention_probs(ctx.q, ctx.keys, ctx.q_positions, ctx.positions, ctx.window)  # [B, Hkv, g, T, S]
        received = probs.sum(dim=(2, 3)).permute(0, 2, 1)  # [B, S, Hkv]: summed over the group's heads and queries
        ctx.state["score"] = ctx.state["score"] + received
        n = ctx.keys.shape[1]
        k_r = self.recent_size(ctx.target)
        prio = ctx.state["score"].to(torch.float64)
        recent = torch.arange(n, device=prio.device) >= n - k_r  # [S]: the last k_r visible entries
        return torch.where(recent[None, :, None], _TOP + ctx.positions.to(torch.float64), prio)


def snapkv_scores(ctx: EvictionContext, window_size: int, kernel_size: int, pooling: str) -> Tensor:
    """SnapKV's priority ``[B, S, H]`` (arXiv 2404.14469, sec. 4.1 and Listing 1).

    The observation window is the call's last ``w = min(window_size, T)`` queries; their float32 softmax over every
    visible key is summed over the window's queries, averaged over the query heads of each key/value group, and the
    columns before the window are pooled along the keys (kernel k, stride 1, padding k // 2; ``avgpool`` counts the
    padding, ``maxpool`` pads with -inf). The window's own entries rank above everything, the latest first.
    """
    w = min(window_size, ctx.n_new)
    q = ctx.q[:, -w:]  # [B, w, Hq, D]
    probs = attention_probs(q, ctx.keys, ctx.q_positions[-w:], ctx.positions, ctx.window)  # [B, Hkv, g, w, S]
    vote = probs.sum(dim=3).mean(dim=2)  # [B, Hkv, S]: sum over window queries, mean over the group
    b, h, n = vote.shape
    prefix = vote[:, :, : n - w].reshape(b * h, 1, n - w)  # [B * Hkv, 1, S - w]
    if n - w > 0:
        if pooling == "avgpool":
            prefix = F.avg_pool1d(prefix, kernel_size, stride=1, padding=kernel_size // 2)
        else:
            prefix = F.max_pool1d(prefix, kernel_size, stride=1, padding=kernel_size // 2)
    prefix = prefix.reshape(b, h, n - w).to(torch.float64)
    win = _TOP + torch.arange(w, dtype=torch.float64, device=vote.device).expand(b, h, w)  # [B, Hkv, w]
    return torch.cat((prefix, win), dim=2).permute(0, 2, 1)  # [B, S, Hkv]


class SnapKV(EvictionPolicy):
    """Observation-window voting (Li et al. 2024, arXiv 2404.14469, sec. 4.1 ``C = sum_i W_obs[:, i, :]``,
    ``I = Top_k(C, k)``; sec. 4.2 pooling).

    A call that leaves more than ``budget`` entries compresses them to ``budget``: the ``window_size`` window entries
    plus the top ``budget - window_size`` of the pooled vote (``snapkv_scores``). The paper compresses the prompt once,
    and generated tokens are appended: single-token calls (decoding steps) therefore append without compressing
    unless ``compress_decoding``; every call of two tokens or more (a prompt, or each chunk of a streamed prompt)
    compresses, so a streamed prompt stays bounded.

    Args:
        budget: C, window included; default 2048 (``max_capacity_prompt``).
        window_size: w, default 32. kernel_size: odd, default 5. pooling: ``"avgpool"`` (default) or ``"maxpool"``
            (the code's defaults; the paper's LongBench runs use kernel 7 with max pooling).
        compress_decoding: also keep the cache at the budget during decoding, each step voting with its one query.
    """

    needs_queries = True

    def __init__(self, budget: int | float = 2048, *, window_size: int = 32, kernel_size: int = 5,
                 pooling: str = "avgpool", compress_decoding: bool = False) -> None:
        super().__init__(budget)
        self.window_size = check_int("window_size", window_size, 1)
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (padding k // 2 keeps the length), got {kernel_size}")
        if pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"pooling must be 'avgpool' or 'maxpool', got {pooling!r}")
        self.pooling = pooling
        if not isinstance(compress_decoding, bool):
            raise ValueError(f"compress_decoding must be a bool, got {compress_decoding!r}")
        self.compress_decoding = compress_decoding
        if type(self.budget) is int and self.budget < self.window_size:  # tokens (not a ratio, not Bytes)
            raise ValueError(f"budget ({self.budget}) must be >= window_size ({self.window_size}): the window is "
                             "always kept")

    def scores(self, ctx: EvictionContext) -> Tensor | None:
        if not ctx.over_budget or (ctx.n_new == 1 and not self.compress_decoding):
            return None
        return snapkv_scores(ctx, self.window_size, self.kernel_size, self.pooling)


def pyramid_budgets(total: int, n: int, window: int, n_layers: int, beta: float = 20) -> list[int]:
    """PyramidKV's per-layer budgets (Cai et al. 2024, arXiv 2406.02069, sec. 4), window included.

    With c = total - window selected tokens per layer on average: the top layer keeps ``lo = c / beta``, the bottom
    ``hi = 2c - lo`` (capped at the n - window tokens there are, with ``lo = 2c - hi``), the layers between on the
    arithmetic sequence ``hi - l (hi - lo) / (L - 1)``, whose mean is exactly c; the reals are rounded by largest
    remainder, so the integers stay non-increasing and their mean is exactly c. No compression (every layer keeps
    ``total``) when n <= total, total <= window, or L = 1.
    """
    if n <= total or total <= window or n_layers == 1:
        return [total] * n_layers
    c = total - window
    lo = c / beta
    hi = 2 * c - lo
    if hi > n - window:
        hi = n - window
        lo = 2 * c - hi
    real = [hi - layer * (hi - lo) / (n_layers - 1) for layer in range(n_layers)]
    ints = [math.floor(x + 1e-9) for x in real]
    short = n_layers * c - sum(ints)
    order = sorted(range(n_layers), key=lambda i: (-(real[i] - ints[i]), i))
    for i in order[:short]:
        ints[i] += 1
    return [x + window for x in ints]


class PyramidKV(SnapKV):
    """SnapKV's vote with pyramidal per-layer budgets (Cai et al. 2024, arXiv 2406.02069; ``pyramid_budgets``).

    ``budget`` is the global budget C: the mean over the model's attention layers of what each keeps (window
    included); layer l keeps ``pyramid_budgets(C, n, window_size, L, beta)[l]`` where n is the number of tokens seen.
    Defaults as the reference code (KVCache-Factory): C 2048, w 32, kernel 5, avgpool, beta 20.
    """

    def __init__(self, budget: int | float = 2048, *, window_size: int = 32, kernel_size: int = 5,
                 pooling: str = "avgpool", beta: float = 20, compress_decoding: bool = False) -> None:
        super().__init__(budget, window_size=window_size, kernel_size=kernel_size, pooling=pooling,
                         compress_decoding=compress_decoding)
        self.beta = check_ratio("beta", beta, 1.0, math.inf)

    def target(self, seen: int, layer_idx: int, n_layers: int, entry_bytes: int = 1) -> int:
        total = resolve_budget(self.budget, seen, entry_bytes)
        return pyramid_budgets(total, seen, self.window_size, n_layers, self.beta)[layer_idx]


class L2Norm(EvictionPolicy):
    """Keep the keys of lowest L2 norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression", arXiv 2406.11430): query-free; priority ``-||k||_2`` (RoPE is a rotation, so the norm is the
    pre-RoPE key's).

    Args:
        budget: default 0.9 (the reference README's keep ratio).
        skip_layers: attention-layer indices left uncompressed (the reference skips 0 and 1 in its LM runs; default
            none).
    """

    def __init__(self, budget: int | float = 0.9, *, skip_layers: tuple[int, ...] = ()) -> None:
        super().__init__(budget)
        if not isinstance(skip_layers, (tuple, list)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in skip_layers):
            raise ValueError(f"skip_layers must be a tuple of non-negative ints, got {skip_layers!r}")
        self.skip_layers = tuple(skip_layers)

    def skips_layer(self, layer_idx: int, n_layers: int) -> bool:
        return layer_idx in self.skip_layers

    def scores(self, ctx: EvictionContext) -> Tensor | None:
        if not ctx.over_budget:
            return None
        return -ctx.keys.to(torch.float64).norm(dim=-1)  # [B, S, H]
