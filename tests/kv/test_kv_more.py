"""Scissorhands, D2O, DuoAttention-style per-head caches and eviction + KIVI, each against a brute-force
re-computation (Python loops over rows, heads and queries in float64; no code shared with mnemos.kv):

- Scissorhands: over budget, the kept set is B - m entries, the recent r among them, and no kept entry was
  unimportant (attention below 1/n) to the last w queries more often than a dropped one; under budget nothing goes;
- D2O: layer budgets have the global budget as mean; the merge equals the loop's (best cosine match, EMA threshold,
  exp-weighted average); in a model each layer keeps its calibrated budget; the layer variance and the calibration
  agree with loops;
- DuoAttention: induction scores and the head choice equal the loops'; retrieval heads keep every position,
  streaming heads [0, s) ∪ the last r; ratio 1 == the full cache, ratio 0 == StreamingLLM(s + r) (logits);
- eviction + KIVI: with nothing evicted it is KIVI's cache exactly; with StreamingLLM it keeps StreamingLLM's
  positions in KIVI's layout over the kept entries, byte for byte;
- every new policy: budget >= context gives the default cache's logits on every attention variant; serialise /
  reorder mid-stream; bad arguments raise ValueError naming them.
"""

from __future__ import annotations

import math

import pytest
import torch
from kv_helpers import ATTENTION_VARIANTS, F64, attn_caches, ids_of, make_model, stream, tiny_llama

from mnemos.kv import (
    D2O,
    H2O,
    KIVI,
    Bytes,
    Composed,
    DuoAttention,
    Scissorhands,
    SnapKV,
    StreamingLLM,
    ThinK,
    choose_retrieval_heads,
    compose,
    layer_budgets,
    merge_evicted,
    parse_policy_spec,
)
from mnemos.kv.calibrate import attention_maps, induction_scores, layer_variances, repeated_tokens

PIECES = [7, 1, 5, 2, 1, 1, 6, 1]


def _data(b, t, h, d, hq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, hq or h, d, generator=g, dtype=F64), torch.randn(b, t, h, d, generator=g, dtype=F64),
            torch.randn(b, t, h, d, generator=g, dtype=F64))


def _kept(cache, b, h) -> list[int]:
    return sorted(p for p in cache.kept_positions()[b, :, h].tolist() if p >= 0)


# ----------------------------------------------------------------------------------------------------------------------
# Scissorhands


def _unimportant(q, k, kept, hist, bi, hi, g):
    """Loop count: for each history query position p and each query head of the group, over the kept entries it
    sees, how often each entry got less than the uniform share."""
    d = q.shape[-1]
    count = {j: 0 for j in kept}
    for p in hist:
        vis = [j for j in kept if j <= p]
        for member in range(g):
            qh = hi * g + member
            probs = torch.softmax(torch.stack([q[bi, p, qh] @ k[bi, j, hi] / math.sqrt(d) for j in vis]), 0)
            for j, pr in zip(vis, probs.tolist(), strict=True):
                if pr < 1.0 / len(vis):
                    count[j] += 1
    return count


def test_scissorhands_drops_the_persistently_unimportant_in_batches():
    b, h, hq, d = 2, 2, 4, 8
    q, k, v = _data(b, 40, h, d, hq=hq, seed=7)
    budget, w, r, m = 12, 5, 3, 4
    cache = Scissorhands(budget, history=w, recent=r, drop=m).make_cache(b, h, d, dtype=F64)
    s, evictions = 0, 0
    for n in [9, 1, 6, 1, 1, 1, 2, 1, 1, 10, 1, 1, 1, 4]:
        before = [[_kept(cache, bi, hi) for hi in range(h)] for bi in range(b)]
        cache.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        s += n
        hist = list(range(max(0, s - w), s))
        for bi in range(b):
            for hi in range(h):
                visible = before[bi][hi] + list(range(s - n, s))
                after = _kept(cache, bi, hi)
                if len(visible) <= budget:
                    assert after == visible, f"under budget nothing is dropped (after {s} tokens)"
                    continue
                evictions += 1
                assert len(after) == budget - m, f"{len(after)} kept after {s} tokens, want B - m = {budget - m}"
                assert visible[-r:] == after[-r:], "the recent window is never dropped"
                count = _unimportant(q, k, visible, hist, bi, hi, hq // h)
                kept_old = [j for j in after if j not in visible[-r:]]
                dropped = [j for j in visible if j not in after]
                assert max(count[j] for j in kept_old) <= min(count[j] for j in dropped), \
                    f"row {bi} head {hi} after {s} tokens: kept {kept_old} dropped {dropped} counts {count}"
    assert evictions >= 8
    assert cache.state_dict()["extra.history"].shape == (b, w, hq, d), "the last w queries are held (and counted)"


# ----------------------------------------------------------------------------------------------------------------------
# D2O


@pytest.mark.parametrize("total,weights", [(8, (1.0, 1.0, 2.0)), (13, (0.3, 0.9, 0.5, 0.7, 0.1)), (5, (1.0,))])
def test_d2o_layer_budgets_have_the_global_budget_as_mean(total, weights):
    got = layer_budgets(total, weights)
    assert sum(got) == total * len(weights), got
    for g, w in zip(got, weights, strict=True):
        assert abs(g - total * len(weights) * w / sum(weights)) < 1 + 1e-9 and g >= 1
    if weights == (1.0, 1.0, 2.0):
        assert got == [6, 6, 12]


def test_d2o_merge_equals_the_loop():
    b, s, h, d = 2, 10, 2, 4
    _, k, v = _data(b, s, h, d, seed=8)
    g = torch.Generator().manual_seed(9)
    idx = torch.stack([torch.stack([torch.randperm(s, generator=g)[:4].sort().values for _ in range(h)], -1)
                       for _ in range(b)])  # [B, 4, H]
    tau0 = torch.tensor([[float("nan"), 0.1], [0.3, float("nan")]])
    beta = 0.25
    got_k, got_v, tau = merge_evicted(k, v, idx, None, tau0, beta)
    for bi in range(b):
        for hi in range(h):
            kept = idx[bi, :, hi].tolist()
            ev = [j for j in range(s) if j not in kept]
            best = {}
            for e in ev:
                sims = [torch.nn.functional.cosine_similarity(k[bi, e, hi], k[bi, c, hi], dim=0).item() for c in kept]
                best[e] = (max(sims), kept[sims.index(max(sims))])
            mean = sum(x for x, _ in best.values()) / len(ev)
            t0 = tau0[bi, hi].item()
            want_tau = mean if math.isnan(t0) else beta * t0 + (1 - beta) * mean
            assert abs(tau[bi, hi].item() - want_tau) < 1e-5
            for slot, c in enumerate(kept):
                group = [(math.exp(u), e) for e, (u, cc) in best.items() if cc == c and u >= want_tau]
                den = math.e + sum(wt for wt, _ in group)
                want_k = (math.e * k[bi, c, hi] + sum(wt * k[bi, e, hi] for wt, e in group)) / den
                want_v = (math.e * v[bi, c, hi] + sum(wt * v[bi, e, hi] for wt, e in group)) / den
                assert (got_k[bi, slot, hi] - want_k).abs().max() < 1e-5, f"row {bi} head {hi} kept {c}: keys"
                assert (got_v[bi, slot, hi] - want_v).abs().max() < 1e-5, f"row {bi} head {hi} kept {c}: values"
                if not group:
                    assert torch.equal(got_k[bi, slot, hi], k[bi, c, hi]), "an entry nothing merged into is unchanged"


def test_d2o_in_a_cache_keeps_h2o_positions_and_stores_the_merge():
    q, k, v = _data(1, 20, 2, 8, seed=10)
    d2o = D2O(8, recent=2, calibrate=False).make_cache(1, 2, 8, dtype=F64)
    h2o = H2O(8, recent=2).make_cache(1, 2, 8, dtype=F64)
    for c in (d2o, h2o):
        c.update_view(k, v, q=q)  # one prompt call: the same scores, so the same kept positions
    assert torch.equal(d2o.kept_positions(), h2o.kept_positions())
    idx = h2o.kept_positions()  # positions == indices after one call
    want_k, want_v, tau = merge_evicted(k, v, idx, None, torch.full((1, 2), float("nan")), 0.5)
    assert torch.equal(d2o.keys, want_k) and torch.equal(d2o.values, want_v)
    assert torch.equal(d2o.state_dict()["extra.threshold"], tau)
    assert not torch.equal(d2o.keys, h2o.keys), "some evicted entry must have been merged"


def test_d2o_calibration_gives_each_layer_its_budget():
    model = make_model("transformer", n_layers=3)
    ids = repeated_tokens(64, 8, 2, seed=0)
    maps = attention_maps(model, ids)
    assert len(maps) == 3 and maps[0].shape == (2, 4, 1, 16, 16)
    for p in maps:  # layer_variances against a loop
        rows = [(p[..., t, : t + 1] * (t + 1)).var(dim=-1, unbiased=False).mean().item() for t in range(1, 16)]
        want = sum(rows) / 15
        assert abs(layer_variances(p) - want) < 1e-6
    policy = D2O(6, recent=2, calibration_length=8, calibration_samples=2)
    with policy(model):
        _, cache = stream(model, ids_of(1, 30), [30])
    weights = tuple(1 / (1 + layer_variances(p)) for p in maps)
    assert policy.weights(3) == pytest.approx(weights)
    assert [c.num_stored for c in attn_caches(cache)] == layer_budgets(6, weights)


# ----------------------------------------------------------------------------------------------------------------------
# DuoAttention / RazorAttention-style per-head caches


def test_induction_scores_and_head_choice_equal_the_loops():
    g = torch.Generator().manual_seed(11)
    L = 6
    probs = torch.softmax(torch.randn(2, 3, 2, 2 * L, 2 * L, generator=g), -1)
    got = induction_scores(probs, L)
    for hk in range(3):
        total = sum(probs[bi, hk, m, L + i, i] + probs[bi, hk, m, L + i, i + 1]
                    for bi in range(2) for m in range(2) for i in range(L))
        assert abs(got[hk].item() - total.item() / (2 * 2 * L)) < 1e-6
    scores = [torch.tensor([0.1, 0.9, 0.3]), torch.tensor([0.5, 0.2, 0.8])]
    assert choose_retrieval_heads(scores, 0.5) == ((1,), (0, 2))  # the top 3 of 6: .9, .8, .5
    assert choose_retrieval_heads(scores, 0.0) == ((), ()) and choose_retrieval_heads(scores, 1.0) == ((0, 1, 2),) * 2


def test_duo_heads_keep_everything_or_sinks_and_recent():
    b, h, d = 2, 4, 8
    q, k, v = _data(b, 30, h, d, seed=12)
    policy = DuoAttention(sinks=2, recent=3, retrieval_heads=((1, 3),))
    cache = policy.make_cache(b, h, d, dtype=F64)
    s = 0
    for n in [6, 1, 4, 1, 1, 9, 1, 7]:
        cache.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        s += n
        for bi in range(b):
            for hi in range(h):
                want = list(range(s)) if hi in (1, 3) else sorted(set(range(min(2, s))) | set(range(max(0, s - 3), s)))
                assert _kept(cache, bi, hi) == want, f"head {hi} after {s} tokens"
    assert torch.equal(cache.state_dict()["kr"], k[:, :, [1, 3]]), "retrieval heads hold their keys bit-identical"
    assert torch.equal(cache.state_dict()["ks"], k[:, [0, 1, 27, 28, 29]][:, :, [0, 2]])
    assert cache.nbytes == b * (30 * 2 + 5 * 2) * d * 2 * 8, "keys and values of every head, nothing else"


@pytest.mark.parametrize("variant", ["transformer", "mag"])
def test_duo_ratio_one_is_the_full_cache_and_ratio_zero_is_streamingllm(variant):
    model = make_model(variant)
    ids = ids_of(2, 24)
    ref, _ = stream(model, ids, PIECES)
    with DuoAttention(1.0, sinks=2, recent=4, calibration_length=6, calibration_samples=1)(model):
        out, cache = stream(model, ids, PIECES)
    assert (out - ref).abs().max() <= 1e-12
    with StreamingLLM(6, sinks=2)(model):
        want, _ = stream(model, ids, PIECES)
    with DuoAttention(0.0, sinks=2, recent=4, calibration_length=6, calibration_samples=1)(model):
        out, cache = stream(model, ids, PIECES)
    assert (out - want).abs().max() <= 1e-12, "all streaming heads == StreamingLLM(sinks + recent)"
    policy = DuoAttention(0.5, sinks=2, recent=4, calibration_length=6, calibration_samples=1)
    with policy(model):
        _, cache = stream(model, ids, PIECES)
    scores = [induction_scores(p, 6) for p in attention_maps(model, repeated_tokens(64, 6, 1))]
    assert policy._heads == choose_retrieval_heads(scores, 0.5) and sum(map(len, policy._heads)) == 4


# ----------------------------------------------------------------------------------------------------------------------
# eviction + KIVI


def test_composition_without_eviction_is_kivis_cache():
    q, k, v = _data(2, 30, 2, 8, seed=13)
    kivi = KIVI(2, group_size=4, residual=8)
    both = compose(H2O(64), kivi).make_cache(2, 2, 8, dtype=F64)
    alone = kivi.make_cache(2, 2, 8, dtype=F64)
    s = 0
    for n in [11, 1, 1, 9, 1, 7]:
        for c in (both, alone):
            c.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        s += n
        for got, want in zip(both.dequantized(), alone.dequantized(), strict=True):
            assert torch.equal(got, want), f"after {s} tokens the composed cache is not KIVI's"
    for name in ("kq", "ks", "kz", "kr", "vq", "vs", "vz", "vr"):
        assert torch.equal(both.state_dict()[name], alone.state_dict()[name]), name


def test_composition_keeps_the_eviction_positions_in_kivis_layout():
    q, k, v = _data(1, 40, 2, 8, seed=14)
    G, R = 4, 8
    both = compose(StreamingLLM(14, sinks=2), KIVI(2, group_size=G, residual=R)).make_cache(1, 2, 8, dtype=F64)
    alone = StreamingLLM(14, sinks=2).make_cache(1, 2, 8, dtype=F64)
    s = 0
    for n in [10, 1, 12, 1, 1, 15]:
        for c in (both, alone):
            c.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        s += n
        assert torch.equal(both.kept_positions(), alone.kept_positions())
    n = 14
    sd = both.state_dict()
    n_k, n_v = n - n % R, n - R  # KIVI's residual rules over the kept entries: 8 keys and 6 values quantised
    assert sd["kq"].shape == (1, n_k, 2, 8 * 2 // 8) and sd["kr"].shape[1] == n - n_k
    assert sd["vq"].shape == (1, n_v, 2, 8 * 2 // 8) and sd["vr"].shape[1] == R
    want = 2 * (n_k * 2 + 2 * (n_k // G) * 8 * 8 + (n - n_k) * 8 * 8)  # keys: codes, scales + zeros, residual
    want += 2 * (n_v * 2 + 2 * n_v * (8 // G) * 8 + R * 8 * 8)  # values
    want += n * 2 * 4  # int32 positions
    assert both.nbytes == want and both.nbytes < alone.nbytes
    kept_v = alone.values  # the recent values are still full precision, and the oldest within their group's step
    got_v = both.dequantized()[1]
    assert torch.equal(got_v[:, n_v:], kept_v[:, n_v:])
    step = (kept_v[:, :n_v].reshape(1, n_v, 2, 2, G).amax(-1) - kept_v[:, :n_v].reshape(1, n_v, 2, 2, G).amin(-1)) / 3
    err = (got_v[:, :n_v] - kept_v[:, :n_v]).abs().reshape(1, n_v, 2, 2, G).amax(-1)
    assert (err <= step / 2 + 1e-9).all(), "a value entry is quantised once, within half its group's step"


def test_bad_compositions_and_specs_raise_value_error():
    with pytest.raises(ValueError, match="eviction"):
        compose(KIVI(2), KIVI(4))
    with pytest.raises(ValueError, match="must be KIVI or ThinK"):
        compose(H2O(8), SnapKV(8, window_size=4))
    compose(H2O(Bytes(4096)), KIVI(2))  # accepted: the composed cache counts its packed bytes
    with pytest.raises(ValueError, match="compose as EVICTION"):
        parse_policy_spec("kivi:bits=2+h2o:budget=8")
    (spec,) = parse_policy_spec("h2o:budget=8+kivi:bits=4,group_size=4,residual=8")
    assert isinstance(spec.policy, Composed) and spec.policy.kivi.key_bits == 4 and spec.name == "h2o+kivi"
    sweep = parse_policy_spec("scissorhands:budget=8,16,recent=2+kivi:group_size=4,residual=8")
    assert [s.text for s in sweep] == ["scissorhands:budget=8,recent=2+kivi:group_size=4,residual=8",
                                       "scissorhands:budget=16,recent=2+kivi:group_size=4,residual=8"]
    for make, arg in [(lambda: Scissorhands(4, recent=4), "budget"), (lambda: Scissorhands(8, drop=1.5), "drop"),
                      (lambda: Scissorhands(8, history=0), "history"), (lambda: D2O(8, beta=2), "beta"),
                      (lambda: D2O(8, layer_weights=(1, -1)), "layer_weights"),
                      (lambda: DuoAttention(1.5), "retrieval_ratio"), (lambda: DuoAttention(recent=0), "recent")]:
        with pytest.raises(ValueError, match=arg):
            make()
    model = make_model("transformer")
    with pytest.raises(ValueError, match="retrieval_heads"):
        with DuoAttention(retrieval_heads=((0,),))(model):  # one layer given, the model has two
            model.init_cache(1)


def test_hugging_face_models_calibrate_d2o_and_take_the_per_head_policies():
    """D2O's scoring pass runs on a Hugging Face model too (alone and composed): its layer weights are 1 / (1 +
    variance) of the model's own attention maps on the synthetic calibration ids."""
    pytest.importorskip("transformers")  # the optional [hf] extra; installed in CI with [test]
    from mnemos.kv.calibrate import synthetic_ids
    from mnemos.kv.hf import PolicyCache, attention_maps as hf_attention_maps

    model = tiny_llama(64)
    PolicyCache(model, DuoAttention(retrieval_heads=((0,), (1,))))  # accepted: per-head lengths are masked per head
    with torch.no_grad():
        maps = hf_attention_maps(model, synthetic_ids(model, 6, 1, 0))
    want = tuple(1.0 / (1.0 + layer_variances(p)) for p in maps)
    for policy in (D2O(8, calibration_length=6, calibration_samples=1),
                   compose(D2O(8, calibration_length=6, calibration_samples=1), KIVI(2, group_size=4, residual=8))):
        PolicyCache(model, policy)
        d2o = getattr(policy, "eviction", policy)
        assert d2o.weights(2) == pytest.approx(want) and want[0] != pytest.approx(want[1])
    PolicyCache(model, compose(Scissorhands(16, history=4), KIVI(2, group_size=4, residual=8)))  # accepted


# ----------------------------------------------------------------------------------------------------------------------
# the contract, for the new policies


def _lossless(context: int):
    return {
        "scissorhands": Scissorhands(context, history=4, recent=2),
        "d2o": D2O(context, calibration_length=6, calibration_samples=1),
        "duo": DuoAttention(0.5, sinks=2, recent=context, calibration_length=6, calibration_samples=1),
        "h2o+kivi": compose(H2O(context), KIVI(2, group_size=4, residual=context)),
    }


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_budget_covering_the_context_gives_identical_logits(variant):
    model = make_model(variant)
    ids = ids_of(2, sum(PIECES))
    ref, _ = stream(model, ids, PIECES)
    for name, policy in _lossless(32).items():
        with policy(model):
            out, _ = stream(model, ids, PIECES)
        err = (out - ref).abs().max().item()
        assert err <= 1e-12, f"{variant}/{name}: max |logits - full cache| = {err:.2e}"


def test_new_caches_serialise_and_reorder_mid_stream():
    model = make_model("transformer")
    ids = ids_of(2, 30)
    for policy in [Scissorhands(10, history=3, recent=2, drop=3), D2O(8, recent=2, calibration_length=6,
                   calibration_samples=1), DuoAttention(0.5, sinks=2, recent=3, calibration_length=6,
                   calibration_samples=1), compose(H2O(10), KIVI(2, group_size=4, residual=4))]:
        with policy(model):
            ref, _ = stream(model, ids, [14, 1, 15])
            _, cache = stream(model, ids[:, :15], [14, 1])
            restored = model.init_cache(2)
            restored.load_state_dict({k: v.clone() for k, v in cache.state_dict().items()})
            out, _ = model(ids[:, 15:], restored)
            assert (out - ref[:, 15:]).abs().max() <= 1e-12, f"{policy!r}: restored cache diverges"
            swapped = cache.reorder(torch.tensor([1, 0]))
            out, _ = model(ids.flip(0)[:, 15:], swapped)
            assert (out - ref.flip(0)[:, 15:]).abs().max() <= 1e-12, f"{policy!r}: reordered cache diverges"


@pytest.mark.parametrize("storage", [lambda: KIVI(2, group_size=4, residual=8), lambda: KIVI(4, group_size=8, residual=8),
                                     lambda: ThinK(0.5, window_size=3, recent=4)])
def test_a_composition_takes_a_byte_budget(storage):
    """A Bytes budget on a composition keeps the most entries whose stored form fits: the cache's measured bytes per
    sequence (its per-entry tensors: the fixed channel choice of ThinK aside) are ``stored_bytes(S)`` <= the budget,
    and S is the largest count that fits; the entries kept fall as the budget falls."""
    model = make_model("transformer")  # 4 kv heads of 8, float64
    ids = ids_of(2, 40)
    kept = []
    for budget in (9000, 6000, 3000):
        policy = compose(H2O(Bytes(budget)), storage())
        with policy(model):
            _, cache = stream(model, ids, [17, 9, 1, 1, 12])
        for kv in attn_caches(cache):
            s = kv.num_stored
            fixed = sum(t.numel() * t.element_size() for n, t in kv.state_dict().items()
                        if n == "channels" or n.startswith("extra."))
            assert (kv.nbytes - fixed) // 2 == kv.stored_bytes(s) <= budget  # 2 rows
            assert all(kv.stored_bytes(m) > budget for m in range(s + 1, s + 40)), f"{s} entries: more fit"
            assert s < 40  # the budget evicted
        kept.append(attn_caches(cache)[0].num_stored)
    assert kept[0] > kept[1] > kept[2]
