"""Each eviction policy keeps exactly what its algorithm says, checked against a brute-force re-computation of its
score on small inputs (loops over rows, heads and queries in float64; no code shared with mnemos.kv):

- StreamingLLM: kept set == [0, s) ∪ the last budget - s, call after call; re-rotated keys == RoPE of the raw keys
  at their in-cache positions;
- H2O: the last k_r always kept; scores == the brute-force accumulated attention; kept set == the oracle's;
- SnapKV: the window always kept; kept prefix == brute-force top-k of the pooled vote (avg and max, GQA);
- PyramidKV: budgets non-increasing in depth, mean exactly the global budget; each layer keeps its budget;
- L2-norm: kept set == the lowest key norms.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from kv_helpers import F64, attn_caches, ids_of, make_model, stream

from mnemos.kv import H2O, L2Norm, PyramidKV, SnapKV, StreamingLLM, pyramid_budgets
from mnemos.layers import RotaryEmbedding


def _data(b, t, h, d, hq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq or h, d, generator=g, dtype=F64)
    k = torch.randn(b, t, h, d, generator=g, dtype=F64)
    v = torch.randn(b, t, h, d, generator=g, dtype=F64)
    return q, k, v


def _feed(cache, q, k, v, pieces, check=None):
    s = 0
    for n in pieces:
        cache.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        s += n
        if check is not None:
            check(cache, s)


def _kept_sets(cache) -> list[list[list[int]]]:
    pos = cache.kept_positions()
    return [[sorted(pos[b, :, h].tolist()) for h in range(pos.shape[2])] for b in range(pos.shape[0])]


# ----------------------------------------------------------------------------------------------------------------------


def test_streamingllm_keeps_sinks_and_the_recent_window_after_every_call():
    q, k, v = _data(2, 100, 2, 8)
    policy = StreamingLLM(50, sinks=4)

    def check(cache, n):
        want = list(range(n)) if n <= 50 else list(range(4)) + list(range(n - 46, n))
        for row in _kept_sets(cache):
            for kept in row:
                assert kept == want, f"after {n} tokens kept {kept}"

    _feed(policy.make_cache(2, 2, 8, dtype=F64), q, k, v, [30, 1, 25, 7, 1, 1, 35], check)
    # the example: n = 100 at half the budget in one call -> [0, 4) ∪ [54, 100)
    cache = policy.make_cache(2, 2, 8, dtype=F64)
    cache.update_view(k, v, q=q)
    assert _kept_sets(cache)[0][0] == list(range(4)) + list(range(54, 100))


def test_streamingllm_rerotation_equals_rope_at_in_cache_positions():
    b, h, d = 1, 2, 8
    rope = RotaryEmbedding(d)
    _, k_raw, v = _data(b, 40, h, d, seed=1)  # pre-RoPE keys
    cache = StreamingLLM(10, sinks=2, rerotate=True).make_cache(b, h, d, rope=rope, dtype=F64)
    s = 0
    for n in [12, 1, 5, 1, 9, 12]:
        k_new = rope(k_raw[:, s : s + n], offset=cache.rope_offset)  # the layer rotates at the cache's offset
        cache.update_view(k_new, v[:, s : s + n])
        s += n
        kept = cache.kept_positions()[0, :, 0]
        want = rope(k_raw[:, kept], offset=0)  # kept key i at in-cache position i
        assert (cache.keys - want).abs().max() <= 1e-12, f"after {s} tokens"
        assert cache.rope_offset == cache.num_stored
    assert kept.tolist() == [0, 1] + list(range(32, 40))


# ----------------------------------------------------------------------------------------------------------------------


def _h2o_oracle(q, k, budget, k_r, pieces):
    """Brute-force H2O per row and head (MHA): kept positions and accumulated scores, in float64."""
    b, _, h, d = q.shape
    kept = [[[] for _ in range(h)] for _ in range(b)]
    score = [[{} for _ in range(h)] for _ in range(b)]
    s = 0
    for n in pieces:
        for bi in range(b):
            for hi in range(h):
                kept[bi][hi] += list(range(s, s + n))
                for p in range(s, s + n):
                    score[bi][hi][p] = 0.0
                for i in range(s, s + n):  # each new query attends to the visible keys before and at it
                    keys = [j for j in kept[bi][hi] if j <= i]
                    logits = torch.stack([q[bi, i, hi] @ k[bi, j, hi] / math.sqrt(d) for j in keys])
                    for j, pr in zip(keys, torch.softmax(logits, 0).tolist(), strict=True):
                        score[bi][hi][j] += pr
                if len(kept[bi][hi]) > budget:
                    recent = kept[bi][hi][-k_r:] if k_r else []
                    rest = kept[bi][hi][: len(kept[bi][hi]) - k_r]
                    heavy = sorted(rest, key=lambda j: -score[bi][hi][j])[: budget - k_r]
                    kept[bi][hi] = sorted(heavy + recent)
                    score[bi][hi] = {j: score[bi][hi][j] for j in kept[bi][hi]}
        s += n
    return kept, score


def test_h2o_keeps_recent_window_and_heavy_hitters_of_brute_force_accumulated_attention():
    q, k, v = _data(2, 30, 2, 8, seed=2)
    pieces = [10, 1, 1, 4, 1, 1, 1, 6, 1, 1, 1, 1, 1]
    budget, k_r = 8, 3
    cache = H2O(budget, recent=k_r).make_cache(2, 2, 8, dtype=F64)
    _feed(cache, q, k, v, pieces)
    kept, score = _h2o_oracle(q, k, budget, k_r, pieces)
    got = _kept_sets(cache)
    pos, sc = cache.kept_positions(), cache.entry_state["score"]
    for bi in range(2):
        for hi in range(2):
            assert got[bi][hi] == kept[bi][hi], f"row {bi} head {hi}: kept {got[bi][hi]} != oracle {kept[bi][hi]}"
            assert got[bi][hi][-k_r:] == list(range(30 - k_r, 30)), "the recent window must always be kept"
            for j, p in enumerate(pos[bi, :, hi].tolist()):
                assert abs(sc[bi, j, hi].item() - score[bi][hi][p]) <= 1e-5, f"score of position {p}"


def test_h2o_scores_without_eviction_are_column_sums_of_the_attention_matrix():
    q, k, v = _data(1, 12, 1, 8, hq=2, seed=3)  # GQA: two query heads share the key head; their attention adds
    cache = H2O(12).make_cache(1, 1, 8, dtype=F64)
    _feed(cache, q, k, v, [5, 1, 6])
    s = torch.einsum("bihd,bjhd->bhij", q, k.expand(-1, -1, 2, -1)) / math.sqrt(8)
    s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    want = torch.softmax(s, -1).sum(dim=(1, 2))  # [B, S]: summed over both query heads and all queries
    assert (cache.entry_state["score"][0, :, 0] - want[0]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------------


def _snapkv_oracle(q, k, budget, w, kernel, pooling):
    """Brute-force SnapKV on one call of n tokens: kept positions per row and key head."""
    b, n, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    out = []
    for bi in range(b):
        row = []
        for hi in range(h):
            vote = torch.zeros(n, dtype=F64)
            for member in range(g):
                qh = hi * g + member
                for i in range(n - w, n):
                    logits = torch.stack([q[bi, i, qh] @ k[bi, j, hi] / math.sqrt(d) for j in range(i + 1)])
                    vote[: i + 1] += torch.softmax(logits, 0) / g
            m = n - w
            pooled = []
            for j in range(m):
                win = [vote[x].item() for x in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= x < m]
                pooled.append(sum(win) / kernel if pooling == "avgpool" else max(win))
            top = sorted(range(m), key=lambda j: -pooled[j])[: budget - w]
            row.append((sorted(top) + list(range(m, n)), pooled))
        out.append(row)
    return out


@pytest.mark.parametrize("pooling,kernel,hq", [("avgpool", 5, 2), ("maxpool", 3, 4)])
def test_snapkv_keeps_the_window_and_the_brute_force_top_of_the_pooled_vote(pooling, kernel, hq):
    q, k, v = _data(2, 24, 2, 8, hq=hq, seed=4)
    cache = SnapKV(10, window_size=4, kernel_size=kernel, pooling=pooling).make_cache(2, 2, 8, dtype=F64)
    cache.update_view(k, v, q=q)
    want = _snapkv_oracle(q, k, 10, 4, kernel, pooling)
    got = _kept_sets(cache)
    for bi in range(2):
        for hi in range(2):
            kept, pooled = want[bi][hi]
            if pooling == "avgpool":  # no ties: the exact set
                assert got[bi][hi] == kept, f"row {bi} head {hi}"
            else:  # max pooling copies a peak to its neighbours: ties; the kept ones must rank at least as high
                prefix = got[bi][hi][:-4]
                dropped = [j for j in range(20) if j not in prefix]
                assert len(prefix) == 6
                assert min(pooled[j] for j in prefix) >= max(pooled[j] for j in dropped) - 1e-6, f"row {bi} head {hi}"
    assert all(kept[-4:] == [20, 21, 22, 23] for row in got for kept in row), "the window must be kept"


def test_snapkv_appends_while_decoding_and_compresses_each_prompt_chunk():
    q, k, v = _data(1, 30, 2, 8, seed=5)
    cache = SnapKV(10, window_size=4).make_cache(1, 2, 8, dtype=F64)
    sizes = []
    _feed(cache, q, k, v, [12, 8, 1, 1, 8], lambda c, n: sizes.append(c.num_stored))
    assert sizes == [10, 10, 11, 12, 10]
    eager = SnapKV(10, window_size=4, compress_decoding=True).make_cache(1, 2, 8, dtype=F64)
    sizes = []
    _feed(eager, q, k, v, [12, 8, 1, 1, 8], lambda c, n: sizes.append(c.num_stored))
    assert sizes == [10] * 5


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,n,w,layers", [(2048, 8192, 32, 32), (64, 300, 8, 5), (20, 23, 4, 3), (9, 40, 3, 7)])
def test_pyramid_budgets_are_non_increasing_with_the_global_budget_as_mean(total, n, w, layers):
    budgets = pyramid_budgets(total, n, w, layers)
    assert len(budgets) == layers
    assert all(a >= b for a, b in pairwise(budgets)), f"not non-increasing: {budgets}"
    assert sum(budgets) == total * layers, f"mean {sum(budgets) / layers} != {total}"
    assert budgets[-1] >= w and budgets[0] <= n, budgets
    if (total, n) == (2048, 8192):  # c = 2016: lo = c / 20 = 100.8, hi = 2c - lo = 3931.2, window 32 on top
        assert abs(budgets[0] - 3963.2) < 1 and abs(budgets[-1] - 132.8) < 1, budgets
    assert pyramid_budgets(total, total, w, layers) == [total] * layers, "no compression when n <= budget"


def test_pyramidkv_layers_keep_their_budgets_in_a_model():
    model = make_model("transformer", n_layers=4)
    ids = ids_of(1, 40)
    with PyramidKV(12, window_size=3)(model):
        _, cache = stream(model, ids, [40])
    want = pyramid_budgets(12, 40, 3, 4)
    assert [c.num_stored for c in attn_caches(cache)] == want
    assert want[0] > want[-1]
    for c in attn_caches(cache):
        assert (c.kept_positions()[0, -3:] == torch.arange(37, 40)[:, None]).all(), "window kept in every layer"


def test_l2norm_keeps_the_lowest_norm_keys():
    q, k, v = _data(2, 20, 3, 8, seed=6)
    cache = L2Norm(7).make_cache(2, 3, 8, dtype=F64)
    _feed(cache, q, k, v, [20])
    norms = k.norm(dim=-1)  # [B, T, H]
    for bi, row in enumerate(_kept_sets(cache)):
        for hi, kept in enumerate(row):
            assert kept == sorted(norms[bi, :, hi].argsort()[:7].tolist())
    ratio = L2Norm(0.5).make_cache(1, 3, 8, dtype=F64)
    ratio.update_view(k[:1, :15], v[:1, :15])
    assert ratio.num_stored == 7, "floor(0.5 * 15) entries"


def test_eviction_on_a_sliding_window_layer_never_keeps_what_the_window_hides():
    model = make_model("swa")  # window 5
    ids = ids_of(2, 30)
    for policy in [H2O(3), SnapKV(3, window_size=2, kernel_size=1, compress_decoding=True), L2Norm(3),
                   StreamingLLM(3, sinks=1)]:
        with policy(model):
            def check(cache, policy=policy):
                for kv in attn_caches(cache):
                    pos = kv.kept_positions()
                    assert kv.num_stored <= 3
                    assert (pos > cache.position - 5).all(), f"{policy!r} keeps positions {pos[0, :, 0].tolist()}"
            stream(model, ids, [9, 1, 4, 1, 1, 8, 6], on_call=check)
