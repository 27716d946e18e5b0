"""ThinK: query-driven pruning of key channels, stored narrower (Xu et al. 2024, arXiv 2407.21018, sec. 3, ICLR 2025).

Per batch row and key/value head, channel i scores ``||Q_obs[:, i]||^2 * ||K[:, i]||^2`` (= ``||Q_i K_i^T||_F^2``,
the greedy solution of ``min ||Q K^T - Q S (K S)^T||_F`` over channel selections S), with Q_obs the last
``window_size`` queries of the first call (the prompt) and K its keys; the query term is averaged over the query heads
of the group. The ``floor(lambda * D)`` lowest channels are pruned. Values are untouched.

Storage: keys older than the last ``recent`` tokens are kept narrow, ``[B, S_p, H, D - floor(lambda D)]``, with the
kept channel indices ``[B, H, D - floor(lambda D)]`` (int16); the last ``recent`` keys are kept full width. At
attention the narrow keys are widened with zeros in the pruned channels (the reference's ``recover_cache``), so
``q . k`` uses only the kept channels; nothing is evicted, so positions stay contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mnemos.kv.base import NamedTensorsCache, Policy, _check_new, check_int, check_ratio
from mnemos.layers.kv_cache import KVCache, KVView

__all__ = ["ThinK", "ThinKCache", "choose_channels", "think_channel_scores", "widen_keys"]


def think_channel_scores(q_obs: Tensor, k: Tensor) -> Tensor:
    """``[B, Hkv, D]`` float32: ``mean_g ||Q_obs[:, i]||^2 * ||K[:, i]||^2`` for queries ``[B, w, Hq, D]`` and keys
    ``[B, S, Hkv, D]`` (query head h belongs to key head ``h // g``)."""
    b, _, hq, d = q_obs.shape
    h_kv = k.shape[2]
    qn = q_obs.float().square().sum(dim=1).reshape(b, h_kv, hq // h_kv, d).mean(dim=2)  # [B, Hkv, D]
    kn = k.float().square().sum(dim=1)  # [B, Hkv, D]
    return qn * kn


def choose_channels(q: Tensor, k: Tensor, window_size: int, kept: int) -> Tensor:
    """The ``kept`` key channels per (row, KV head) that ThinK keeps: the top scores of
    :func:`think_channel_scores` over the last ``window_size`` queries of ``q`` ``[B, T, Hq, D]`` against ``k``
    ``[B, S, Hkv, D]``, in increasing channel order: ``[B, Hkv, kept]`` int16."""
    w = min(window_size, q.shape[1])
    score = think_channel_scores(q[:, -w:], k)  # [B, Hkv, D]
    return score.topk(kept, dim=-1).indices.sort(dim=-1).values.to(torch.int16)


def widen_keys(narrow: Tensor, channels: Tensor, head_dim: int) -> Tensor:
    """Narrow keys ``[B, S, H, Dk]`` stored at ``channels`` ``[B, H, Dk]`` back at full width ``[B, S, H, head_dim]``,
    zeros in the pruned channels (what attention reads)."""
    b, s, h, dk = narrow.shape
    idx = channels.long()[:, None].expand(b, s, h, dk)
    return narrow.new_zeros(b, s, h, head_dim).scatter(3, idx, narrow)


class ThinK(Policy):
    """Key-channel pruning (``ThinKCache``).

    Args:
        pruning_ratio: lambda in [0, 1), the fraction of key channels pruned (``floor(lambda * D)`` of them); default
            0.4 (the paper also reports 0.5).
        window_size: observation queries, default 32. recent: keys kept full width, default 32 (the reference's
            ``recent_size``).
    """

    needs_queries = True

    def __init__(self, pruning_ratio: float = 0.4, *, window_size: int = 32, recent: int = 32) -> None:
        self.pruning_ratio = check_ratio("pruning_ratio", pruning_ratio, 0.0, 1.0, hi_open=True)
        self.window_size = check_int("window_size", window_size, 1)
        self.recent = check_int("recent", recent, 0)

    def n_pruned(self, head_dim: int) -> int:
        return int(self.pruning_ratio * head_dim + 1e-9)

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        return ThinKCache(self, batch_size, n_heads, head_dim, window=window, device=device, dtype=dtype)


class ThinKCache(NamedTensorsCache):
    """One layer's ThinK cache: narrow old keys ``kp`` ``[B, Sp, H, Dk]`` with their channels ``channels``
    ``[B, H, Dk]`` (int16, chosen at the first call), full-width recent keys ``kf`` ``[B, Sf, H, D]`` (Sf <= recent)
    and every value ``v`` ``[B, Sp + Sf, H, Dv]``."""

    _NAMES = ("kp", "channels", "kf", "v")

    def __init__(self, policy: ThinK, batch_size: int, n_heads: int, head_dim: int, *, window: int | None = None,
                 device=None, dtype=None) -> None:
        self.policy = policy
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.n_heads = check_int("n_heads", n_heads, 1)
        self.head_dim = self.value_dim = check_int("head_dim", head_dim, 1)
        self.layer_window = window
        dtype = torch.get_default_dtype() if dtype is None else dtype
        dk = head_dim - policy.n_pruned(head_dim)
        b, h = batch_size, n_heads
        self.kp = torch.empty(b, 0, h, dk, device=device, dtype=dtype)
        self.channels = torch.zeros(b, h, dk, device=device, dtype=torch.int16)  # set by the first call
        self.kf = torch.empty(b, 0, h, head_dim, device=device, dtype=dtype)
        self.v = torch.empty(b, 0, h, head_dim, device=device, dtype=dtype)
        self._seen = 0

    @property
    def window(self) -> int | None:
        return self.layer_window

    @property
    def num_stored(self) -> int:
        return self.v.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.v.dtype

    @property
    def device(self) -> torch.device:
        return self.v.device

    def widened_keys(self) -> Tensor:
        """The stored keys at full width ``[B, S, H, D]``: pruned channels of the narrow ones are zero."""
        return torch.cat((widen_keys(self.kp, self.channels, self.head_dim), self.kf), dim=1)

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError("ThinKCache scores channels with the queries: call update_view(k_new, v_new, q)")

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        _check_new(self, k_new, v_new)
        if self._seen == 0:
            if q is None:
                raise ValueError("ThinK chooses key channels from the first call's queries: update_view needs q")
            self.channels = choose_channels(q, k_new, self.policy.window_size, self.kp.shape[3])
        keys = torch.cat((self.widened_keys(), k_new), dim=1)  # [B, S, H, D]
        values = torch.cat((self.v, v_new), dim=1)
        self._seen += k_new.shape[1]
        full = torch.cat((self.kf, k_new), dim=1)
        n_old = max(0, full.shape[1] - self.policy.recent)  # keys leaving the recent window are narrowed
        if n_old:
            b, _, h, _ = full.shape
            idx = self.channels.long()[:, None].expand(b, n_old, h, self.kp.shape[3])
            self.kp = torch.cat((self.kp, full[:, :n_old].gather(3, idx)), dim=1)
        self.kf = full[:, n_old:].clone()
        self.v = values.clone()
        if self.layer_window is not None and self.num_stored > self.layer_window - 1:
            drop = self.num_stored - (self.layer_window - 1)
            dp = min(drop, self.kp.shape[1])
            self.kp, self.kf = self.kp[:, dp:].clone(), self.kf[:, drop - dp:].clone()
            self.v = self.v[:, drop:].clone()
        return KVView(keys, values, None)

    def reset(self) -> None:
        self.kp, self.kf, self.v = self.kp[:, :0].clone(), self.kf[:, :0].clone(), self.v[:, :0].clone()
        self.channels = torch.zeros_like(self.channels)
        self._seen = 0

    def _check_loaded(self, state: dict[str, Tensor]) -> None:
        for n in self._NAMES:
            cur, new = getattr(self, n), state[n]
            fixed = (0, 1, 2) if n == "channels" else (0, 2, 3)
            if new.ndim != cur.ndim or any(new.shape[i] != cur.shape[i] for i in fixed):
                raise ValueError(f"state[{n!r}] must match {tuple(cur.shape)} except along tokens, got "
                                 f"{tuple(new.shape)}")
        if state["kp"].shape[1] + state["kf"].shape[1] != state["v"].shape[1]:
            raise ValueError("state's narrow + full-width keys must count as many tokens as its values")

    def __repr__(self) -> str:
        return (f"ThinKCache(policy={self.policy!r}, seen_tokens={self._seen}, narrow={self.kp.shape[1]}, "
                f"full_width={self.kf.shape[1]}, nbytes={self.nbytes})")
