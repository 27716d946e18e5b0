"""KV policies on MAC's segment attention: the segment's tokens go through the policy's cache (emptied at every
segment boundary), the retrieved tokens stay beside it. A covering budget changes nothing; StreamingLLM keeps exactly
its sinks and recent tokens of the segment (checked against MAC's own attention with that visibility written into
its mask); the cache stays bounded and holds fewer bytes; it serialises and reorders mid-segment; the scoring passes
score one segment; the policy MAC cannot take is refused by name."""

from __future__ import annotations

import pytest
import torch

import mnemos.models.titans as titans
from mnemos.kv import D2O, H2O, DuoAttention, MiniCache, StreamingLLM, apply_kv_policy
from mnemos.models.cache import Cache
from kv_helpers import ids_of, make_model, stream
from test_kv_contract import PIECES, lossless_policies
from test_kv_more import _lossless
from test_kv_retrieval import _covering, _ids
from test_minicache import RetainAll

MAC = dict(mac_attn_init_scale=1.0)  # the attention at its default init (0 would leave it out of the output)


def _state_bytes(cache: Cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.state_dict().values() if t.ndim)


def test_budget_covering_the_segment_gives_identical_logits():
    model = make_model("mac", segment_len=12, **MAC)  # PIECES (24 tokens) cross two segments
    ids = _ids(t=sum(PIECES))  # with sentence boundaries for SentenceKV
    ref, _ = stream(model, ids, PIECES)
    policies = {**lossless_policies(32), **_lossless(32), **{repr(p): p for p in _covering()},
                "duo": DuoAttention(0.5, sinks=2, recent=32, retrieval_heads=((0, 1), (2,)))}
    served = 0
    for name, policy in policies.items():
        if policy.mac_refusal():
            continue
        with policy(model):
            out, cache = stream(model, ids, PIECES)
        assert cache.layers[0].kv is not None, f"{name}: the policy's cache is not in MAC's state"
        err = (out - ref).abs().max().item()
        assert err <= 1e-12, f"{name}: max |logits - no policy| = {err:.2e}"
        served += 1
    assert served >= 13


def test_streamingllm_keeps_the_segments_sinks_and_recent_tokens(monkeypatch):
    """Decoding token by token, query p of a segment sees x_j for j < sinks or p - (budget - sinks) <= j <= p (the
    cache after the previous step plus the new token): MAC without a policy, that visibility in its mask, must agree.
    """
    budget, sinks, seg = 5, 2, 11
    model = make_model("mac", segment_len=seg, **MAC)
    ids = ids_of(2, 2 * seg + 4)
    with StreamingLLM(budget, sinks=sinks)(model):
        out, cache = stream(model, ids, [1] * ids.shape[1])
    assert all(layer.kv.num_stored <= budget for layer in cache.layers)
    original = titans.mac_attention_mask

    def streaming_mask(offset, n, num_persistent, device=None):
        mask = original(offset, n, num_persistent, device)  # [n, P + 2m]
        assert n == 1
        m = offset + 1
        j = torch.arange(m, device=device)
        hidden = (j >= sinks) & (j < offset - (budget - sinks))
        mask[0, num_persistent + m:][hidden] = False
        return mask

    monkeypatch.setattr(titans, "mac_attention_mask", streaming_mask)
    ref, _ = stream(model, ids, [1] * ids.shape[1])
    assert (out - ref).abs().max().item() <= 1e-12
    monkeypatch.setattr(titans, "mac_attention_mask", original)
    full, _ = stream(model, ids, [1] * ids.shape[1])
    assert (out - full).abs().max().item() > 1e-3  # the eviction did change what was attended


def test_the_cache_stays_bounded_and_holds_fewer_bytes():
    model = make_model("mac", segment_len=16, **MAC)
    ids = ids_of(2, 16 + 12)  # mid-segment at the end: the no-policy buffers hold 12 tokens of K and V per layer
    _, plain = stream(model, ids, [7, 5, 3, 1, 1, 1, 1, 9])
    with H2O(4, recent=1)(model):
        out, cache = stream(model, ids, [7, 5, 3, 1, 1, 1, 1, 9])
    for layer in cache.layers:
        assert layer.kv.num_stored == 4 and layer.kv.seen_tokens == 12 and layer.k_x.shape[1] == 0
        assert layer.k_h.shape[1] == 12  # the retrieved tokens are never evicted
    saved = 2 * 8 * 4 * 2 * 8  # per layer: (12 - 4) tokens x 4 heads x (K + V) x head dim 8, float64 (B = 2)
    assert _state_bytes(plain) - _state_bytes(cache) >= 2 * saved - 2 * 2 * 4 * 8 * 12  # minus H2O's scores
    assert torch.isfinite(out).all()


def test_serialise_and_reorder_mid_segment():
    model = make_model("mac", segment_len=8, **MAC)
    ids = ids_of(3, 20)
    policy = H2O(3, recent=1)
    with policy(model):
        _, cache = stream(model, ids[:, :11], [6, 5])
        sd = cache.state_dict()
        fresh = model.init_cache(3)
    fresh.load_state_dict(sd)
    a, _ = stream(model, ids[:, 11:], [2, 7], cache=cache)
    b, _ = stream(model, ids[:, 11:], [2, 7], cache=fresh)
    assert torch.equal(a, b)
    with policy(model):
        _, cache = stream(model, ids[:, :11], [6, 5])
    index = torch.tensor([2, 0, 1])
    c, _ = stream(model, ids[index, 11:], [9], cache=cache.reorder(index))
    with policy(model):
        _, alone = stream(model, ids[index, :11], [6, 5])
    d, _ = stream(model, ids[index, 11:], [9], cache=alone)
    assert (c - d).abs().max().item() <= 1e-12


def test_minicache_pairs_mac_layers_across_segment_resets():
    """MAC resets its segment cache at a boundary in the middle of a call, before the pair's upper layer has merged
    the lower's tokens: the waiting calls go on with a frozen copy. Retaining every token gives MAC's own logits;
    merging every token stores the pair in fewer bytes and gives finite logits that differ from them."""
    model = make_model("mac", n_layers=3, segment_len=8, **MAC)  # pair (1, 2)
    pieces = [5, 6, 1, 1, 9, 2]  # 24 tokens: calls that end, straddle and start segments
    ids = ids_of(2, sum(pieces))
    ref, plain = stream(model, ids, pieces)
    with RetainAll(1)(model):
        out, cache = stream(model, ids, pieces)
    assert (out - ref).abs().max().item() <= 1e-12
    with MiniCache(1, gamma=1.0)(model):
        merged, cache = stream(model, ids[:, :22], pieces[:-1])  # stop mid-segment: the pair holds 6 tokens
    assert torch.isfinite(merged).all() and (merged - ref[:, :22]).abs().max().item() > 1e-6
    lower, upper = cache.layers[1].kv, cache.layers[2].kv
    assert lower.seen_tokens == upper.seen_tokens == 6 and lower.num_merged == 6
    _, plain = stream(model, ids[:, :22], pieces[:-1])
    assert _state_bytes(cache) < _state_bytes(plain)


def test_policies_mac_cannot_take_are_refused_by_name():
    policy = StreamingLLM(8, sinks=2, rerotate=True)
    with pytest.raises(ValueError, match=r"MAC mixer.*rerotate"):
        apply_kv_policy(make_model("mac"), policy)
    apply_kv_policy(make_model("transformer"), policy)  # the same policy serves the transformer


def test_scoring_passes_on_mac_score_one_segment():
    """DuoAttention's and D2O's scoring passes on MAC: the repeated block is capped at half a segment
    (``scoring_length``), so both copies lie in the first segment; each layer's recorded map is then a causal
    distribution over the block's tokens, the heads' scores are the induction scores of those maps, and a block
    longer than that would score every head ~0 (the echo a segment back is not in MAC's map). The calibrated policies
    then serve MAC: all heads retrieval (ratio 1) gives MAC's own logits."""
    from mnemos.kv.calibrate import attention_maps, induction_scores, scoring_length, synthetic_ids

    model = make_model("mac", segment_len=12, **MAC)
    assert scoring_length(model, 32) == 6 and scoring_length(model, 4) == 4
    assert scoring_length(make_model("transformer"), 32) == 32
    with pytest.raises(ValueError, match="segment_len 3"):
        scoring_length(make_model("mac", segment_len=3, **MAC), 32)
    duo = DuoAttention(0.5, sinks=1, recent=2, calibration_length=32, calibration_samples=2)
    apply_kv_policy(model, duo)
    ids = synthetic_ids(model, 6, 2, 0)
    with torch.no_grad():
        maps = attention_maps(model, ids)
    assert len(maps) == 2 and all(m.shape == (2, 4, 1, 12, 12) for m in maps)
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones((), dtype=m.dtype))
        assert (m.triu(1) == 0).all()  # causal
    want = [induction_scores(m, 6) for m in maps]
    for got, w in zip(duo.head_scores, want, strict=True):
        assert torch.equal(got, w)
    assert max(float(w.max()) for w in want) > 0.05
    with torch.no_grad():  # a block of 8 (16 tokens): the second copy's echoes sit in the first segment
        long = [induction_scores(m, 8)[None] for m in attention_maps(model, synthetic_ids(model, 8, 2, 0))
                if m.shape[-1] >= 16]
    assert not long  # the first call's map holds one segment: 12 tokens, not 16
    d2o = D2O(8, calibration_length=32, calibration_samples=2)
    apply_kv_policy(model, d2o)
    assert len(d2o.weights(2)) == 2 and all(w > 0 for w in d2o.weights(2))
    apply_kv_policy(model, None)
    ids = _ids(t=sum(PIECES))
    ref, _ = stream(model, ids, PIECES)
    with DuoAttention(1.0, sinks=1, recent=2, calibration_length=32, calibration_samples=2)(model):
        out, _ = stream(model, ids, PIECES)
    assert (out - ref).abs().max().item() <= 1e-12
