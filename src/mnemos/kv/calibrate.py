"""Scoring passes on synthetic data: what the per-head (DuoAttention / RazorAttention-style) and per-layer (D2O)
policies measure on a model before they run.

``attention_maps(model, ids)`` runs a mnemos model once over ``ids`` with a recording policy and returns every
attention layer's float32 probabilities ``[B, Hkv, g, T, T]`` (``attention_probs``: the sequence keys, causal and
inside the layer's window; persistent / retrieved prefix tokens left out). The synthetic data is a block of random
tokens repeated (``repeated_tokens``): in the second copy, a retrieval head attends back to the earlier occurrence
of the current token (an *echo* head) or to the token that followed it (an *induction* head), RazorAttention's
criterion (arXiv 2407.15891, sec. 3) and the induction pattern DuoAttention's passkey data is built to reward.

MAC's segment attention sees only its own segment's tokens (its cache is emptied at every boundary), so its map over
a longer sequence is block-diagonal and the echo of a token a segment back is not in it: on a model with MAC mixers
the scoring pass uses blocks of ``scoring_length(model, length)`` tokens, at most half the shortest segment, so
that both copies lie in the first segment (whose map is then the whole sequence's).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnemos.kv.base import Policy, attention_probs, use_kv_policy
from mnemos.layers.kv_cache import FullKVCache, KVView

__all__ = ["attention_maps", "induction_scores", "layer_variances", "repeated_tokens", "scoring_length",
           "synthetic_ids"]


def repeated_tokens(vocab_size: int, length: int, samples: int, seed: int = 0) -> Tensor:
    """``[samples, 2 * length]`` int64: ``length`` random tokens in ``[1, vocab_size)``, then the same again."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(1, vocab_size, (samples, length), generator=g)
    return torch.cat((block, block), dim=1)


def synthetic_ids(model: nn.Module, length: int, samples: int, seed: int = 0) -> Tensor:
    """``repeated_tokens`` for ``model``'s vocabulary (``model.config.vocab_size``), on its device."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise ValueError(f"model ({type(model).__name__}) has no config.vocab_size: the scoring pass needs one")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return repeated_tokens(vocab, length, samples, seed).to(device)


def scoring_length(model: nn.Module, length: int) -> int:
    """The block length of the scoring pass on ``model``: ``length``, or at most half the shortest segment of its MAC
    mixers (``MemoryAsContext``, matched by name: mnemos.kv sits below mnemos.models), so that the repeated block's
    two copies lie in one segment. A segment under 4 tokens cannot hold two copies of a 2-token block: ValueError."""
    segments = [m.segment_len for m in model.modules() if type(m).__name__ == "MemoryAsContext"]
    if not segments:
        return length
    if min(segments) < 4:
        raise ValueError(f"the scoring pass needs MAC segments of >= 4 tokens (two copies of a block of >= 2), got "
                         f"segment_len {min(segments)}; pass the heads / layer weights instead")
    return min(length, min(segments) // 2)


class _RecordingCache(FullKVCache):
    """A full cache that also keeps, per call, the attention probabilities of the call's queries."""

    def __init__(self, sink: list, window: int | None, *args, **kw):
        super().__init__(*args, **kw)
        self.sink, self.layer_window = sink, window

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        view = super().update_view(k_new, v_new, q)
        b, s, h, _ = view.keys.shape
        seen = self.seen_tokens
        k_pos = torch.arange(seen - s, seen, device=view.keys.device)[None, :, None].expand(b, s, h)
        q_pos = torch.arange(seen - q.shape[1], seen, device=q.device)
        self.sink.append(attention_probs(q, view.keys, q_pos, k_pos, self.layer_window))  # [B, Hkv, g, T, S]
        return view


class _Recorder(Policy):
    """Full caches that record their layer's attention (``maps[layer]``: one tensor per call)."""

    needs_queries = True

    def __init__(self) -> None:
        self.maps: dict[int, list[Tensor]] = {}

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None):
        return _RecordingCache(self.maps.setdefault(layer_idx, []), window, batch_size, n_heads, head_dim,
                               device=device, dtype=dtype)


@torch.no_grad()
def attention_maps(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """Each attention layer's probabilities on ``ids`` ``[B, T]`` (one call), in layer order: ``[B, Hkv, g, T, T]``."""
    recorder = _Recorder()
    with use_kv_policy(model, recorder):
        cache = model.init_cache(ids.shape[0])
    model(ids, cache)
    return [recorder.maps[i][0] for i in sorted(recorder.maps)]


def induction_scores(probs: Tensor, length: int) -> Tensor:
    """``[Hkv]`` retrieval score of one layer from its probabilities ``[B, Hkv, g, 2L, 2L]`` on repeated tokens
    (``repeated_tokens``): the attention each query of the second copy, at ``L + i``, gives to the earlier occurrence
    of its token (``i``, echo) and to the token after it (``i + 1``, induction), averaged over the second copy's
    queries, the batch and the group's query heads."""
    i = torch.arange(length, device=probs.device)
    rows = probs[..., length + i, :]  # [B, Hkv, g, L, 2L]
    echo = rows.gather(-1, i[:, None].expand(*rows.shape[:-1], 1))[..., 0]  # [B, Hkv, g, L]
    ind = rows.gather(-1, (i + 1)[:, None].expand(*rows.shape[:-1], 1))[..., 0]
    return (echo + ind).mean(dim=(0, 2, 3))  # [Hkv]


def layer_variances(probs: Tensor) -> float:
    """How peaked one layer's attention is (D2O's density, read inversely): for each query at position t (t >= 1)
    the variance of ``(t + 1) * p`` over the t + 1 keys it sees (0 for uniform attention, t for a one-hot row),
    averaged over queries, heads and batch. ``probs``: ``[B, Hkv, g, T, T]``, causal."""
    t_len = probs.shape[-1]
    out = []
    for t in range(1, t_len):
        row = probs[..., t, : t + 1] * (t + 1)  # [B, Hkv, g, t + 1]: mean 1 over the visible keys
        out.append(row.var(dim=-1, unbiased=False).mean())
    return float(torch.stack(out).mean())
