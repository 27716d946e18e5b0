"""The KV-policy contract on mnemos models (docs/KV.md).

- budget >= context => logits identical to the default cache, for every policy on every attention variant
  (Transformer++, SWA, MAG, MAL), through a streamed prefill in uneven chunks and decoding steps;
- with a small budget the cache stays bounded call after call while the context streams in;
- reported bytes equal the bytes of the tensors the cache object holds and fall as the budget falls;
- batch > 1 with different content: each row equals that row run alone (logits and kept positions);
- policy caches survive Cache.state_dict / load_state_dict and reorder mid-stream;
- ``positional_attention`` equals ``causal_attention`` on contiguous positions and the dense reference on gaps;
- bad input raises ValueError naming the argument.
"""

from __future__ import annotations

import pytest
import torch
from kv_helpers import ATTENTION_VARIANTS, F64, attn_caches, ids_of, make_model, stream

from mnemos.eval.stateful import state_size
from mnemos.kv import (
    H2O,
    InfLLM,
    KIVI,
    Bytes,
    L2Norm,
    PyramidKV,
    SentenceKV,
    SnapKV,
    StreamingLLM,
    ThinK,
    apply_kv_policy,
    compose,
    pyramid_budgets,
    use_kv_policy,
)
from mnemos.layers import Attention, FullKVCache, RollingKVCache
from mnemos.layers.attention import causal_attention, causal_attention_reference, positional_attention

PIECES = [7, 1, 5, 2, 1, 1, 6, 1]  # 24 tokens: a streamed prefill then decoding steps


def lossless_policies(context: int):
    """Every policy, configured so that it must keep (or reproduce) everything of a ``context``-token stream."""
    return {
        "streamingllm": StreamingLLM(context, sinks=2),
        "streamingllm-rerotate": StreamingLLM(context, sinks=2, rerotate=True),
        "h2o": H2O(context),
        "h2o-ratio": H2O(1.0),
        "snapkv": SnapKV(context, window_size=4, kernel_size=3),
        "pyramidkv": PyramidKV(context, window_size=4, kernel_size=3),
        "l2norm": L2Norm(1.0),
        "kivi": KIVI(2, group_size=4, residual=context),  # nothing leaves the full-precision residual
        "think": ThinK(0.0, window_size=4, recent=4),  # lambda = 0 prunes nothing
    }


def test_byte_budgets_keep_what_fits():
    """``Bytes(n)``: per sequence and layer; an entry costs keys + values + int32 position (+ H2O's float32 score)
    over the key/value heads, so the cache keeps ``n // entry_bytes`` entries and holds at most n bytes per row."""
    model = make_model("transformer")  # 4 kv heads of 8, float64: 4 * (16 * 8 + 4) = 528 B per entry (+ 16 for H2O)
    ids = ids_of(2, 30)
    for policy, entry in [(StreamingLLM(Bytes(5000), sinks=2), 528), (H2O(Bytes(5000)), 544),
                          (SnapKV(Bytes(5000), window_size=3), 528)]:
        with policy(model):
            _, cache = stream(model, ids, [20, 10])
        for kv in attn_caches(cache):
            assert kv.entry_bytes == entry and kv.num_stored == 5000 // entry, f"{policy!r}: {kv.num_stored}"
            assert kv.nbytes == 2 * kv.num_stored * entry <= 2 * 5000
    with pytest.raises(ValueError, match="bytes"):
        Bytes(0)


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_budget_covering_the_context_gives_identical_logits(variant):
    model = make_model(variant)
    ids = ids_of(2, sum(PIECES))
    ref, _ = stream(model, ids, PIECES)
    for name, policy in lossless_policies(32).items():
        with policy(model):
            out, cache = stream(model, ids, PIECES)
        assert torch.equal(out.argmax(-1), ref.argmax(-1)), f"{variant}/{name}: greedy tokens differ"
        err = (out - ref).abs().max().item()
        assert err <= 1e-12, f"{variant}/{name}: max |logits - full cache| = {err:.2e}"
        assert type(attn_caches(cache)[0]) not in (FullKVCache, RollingKVCache), f"{name}: policy not applied"
    # the context manager restored the default caches
    assert all(type(c) in (FullKVCache, RollingKVCache) for c in attn_caches(model.init_cache(1)))


def small_policies():
    return {
        "streamingllm": StreamingLLM(8, sinks=2),
        "streamingllm-rerotate": StreamingLLM(8, sinks=2, rerotate=True),
        "h2o": H2O(8),
        "snapkv": SnapKV(8, window_size=3, kernel_size=3),
        "pyramidkv": PyramidKV(8, window_size=3, kernel_size=3),
        "l2norm": L2Norm(8),
    }


@pytest.mark.parametrize("variant", ["transformer", "mag"])
def test_small_budget_keeps_the_cache_bounded_while_streaming(variant):
    model = make_model(variant)
    ids = ids_of(2, 40)
    pieces = [6, 5, 7, 4, 6, 3, 1, 1, 1, 6]
    full, _ = stream(model, ids, pieces)
    for name, policy in small_policies().items():
        sizes = []
        with policy(model):
            out, cache = stream(model, ids, pieces, on_call=lambda c: sizes.append(
                [k.num_stored for k in attn_caches(c)]))
        seen, appended = 0, 0
        for i, (n, s) in enumerate(zip(pieces, sizes, strict=True)):
            seen += n
            # SnapKV / PyramidKV append at single-token (decoding) calls, as the paper does, and compress again at
            # the next call of two tokens or more
            appended = appended + 1 if (n == 1 and name in ("snapkv", "pyramidkv")) else 0
            for layer, stored in enumerate(s):
                bound = pyramid_budgets(8, seen - appended, 3, 2)[layer] if name == "pyramidkv" else 8
                if variant == "mag":
                    bound = min(bound, model.config.window - 1)  # a sliding window never needs more than W - 1
                assert stored <= bound + appended, f"{variant}/{name}: call {i} layer {layer} stores {stored}"
        assert torch.isfinite(out).all()
        if variant == "transformer":
            assert (out - full).abs().max() > 1e-6, f"{name}: evicting 32 of 40 tokens changed nothing"


def _holds_exactly(cache) -> int:
    """Bytes of every tensor reachable from the cache object (what the eval harness weighs)."""
    return state_size(cache).nbytes


def test_reported_bytes_are_the_stored_tensors_and_fall_with_the_budget():
    model = make_model("transformer")
    ids = ids_of(1, 40)
    pieces = [20, 10, 1, 1, 8]
    series = {
        "streamingllm": [StreamingLLM(b, sinks=2) for b in (40, 20, 10)],
        "h2o": [H2O(b) for b in (1.0, 0.5, 0.25)],
        "snapkv": [SnapKV(b, window_size=4) for b in (40, 20, 10)],
        "pyramidkv": [PyramidKV(b, window_size=4) for b in (40, 20, 10)],
        "l2norm": [L2Norm(b) for b in (40, 20, 10)],
        "kivi": [KIVI(b, group_size=4, residual=8) for b in (8, 4, 2)],
        "think": [ThinK(lam, window_size=4, recent=4) for lam in (0.0, 0.25, 0.5)],
    }
    full_bytes = sum(c.nbytes for c in attn_caches(stream(model, ids, pieces)[1]))
    for name, policies in series.items():
        totals = []
        for policy in policies:
            with policy(model):
                _, cache = stream(model, ids, pieces)
            for kv in attn_caches(cache):
                held = _holds_exactly(kv)
                listed = sum(t.numel() * t.element_size() for t in kv.state_dict().values() if t.ndim)
                assert kv.nbytes == held == listed, f"{name}: nbytes {kv.nbytes}, held {held}, state_dict {listed}"
            totals.append(sum(kv.nbytes for kv in attn_caches(cache)))
        assert totals[0] > totals[1] > totals[2], f"{name}: bytes {totals} do not fall with the budget"
        if name in ("kivi", "think"):
            assert totals[-1] < full_bytes, f"{name}: {totals[-1]} bytes, not below the full cache's {full_bytes}"


@pytest.mark.parametrize("variant", ["transformer", "swa"])
def test_no_cross_talk_between_batch_rows(variant):
    model = make_model(variant)
    ids = torch.cat([ids_of(1, 30, seed=3), ids_of(1, 30, seed=4)])
    pieces = [12, 9, 1, 1, 7]
    for policy in [H2O(8), SnapKV(8, window_size=3), PyramidKV(8, window_size=3), L2Norm(8),
                   StreamingLLM(8, sinks=2), KIVI(2, group_size=4, residual=4), ThinK(0.5, window_size=4, recent=2)]:
        with policy(model):
            both, cache = stream(model, ids, pieces)
            for i in range(2):
                one, c1 = stream(model, ids[i : i + 1], pieces)
                err = (both[i : i + 1] - one).abs().max().item()
                assert err <= 1e-10, f"{policy!r}: row {i} differs from running it alone by {err:.2e}"
                for kv, kv1 in zip(attn_caches(cache), attn_caches(c1), strict=True):
                    assert torch.equal(kv.kept_positions()[i : i + 1], kv1.kept_positions())
                    for key, t in kv.state_dict().items():
                        if t.ndim:
                            t1 = kv1.state_dict()[key]
                            tol = 1e-10 if t.dtype == F64 else 1e-5  # H2O's scores are float32
                            same = torch.allclose(t[i : i + 1], t1, rtol=0, atol=tol) if t.is_floating_point() \
                                else torch.equal(t[i : i + 1], t1)
                            assert same, f"{policy!r}: {key} row {i}"


def test_policy_caches_serialise_and_reorder_mid_stream():
    model = make_model("transformer")
    ids = ids_of(2, 30)
    for policy in [H2O(8), StreamingLLM(8, sinks=2, rerotate=True), SnapKV(8, window_size=3), KIVI(4, group_size=4,
                   residual=4), ThinK(0.5, window_size=4, recent=2), InfLLM(3, n_init=2, n_local=2, topk=1, repr_topk=2),
                   SentenceKV(sinks=2, recent=2, max_tokens=4, max_len=5),
                   compose(SnapKV(8, window_size=3), ThinK(0.5, window_size=4, recent=2))]:
        with policy(model):
            ref, _ = stream(model, ids, [14, 16])
            _, cache = stream(model, ids[:, :14], [14])
            restored = model.init_cache(2)
            restored.load_state_dict({k: v.clone() for k, v in cache.state_dict().items()})
            out, _ = model(ids[:, 14:], restored)
            assert (out - ref[:, 14:]).abs().max() <= 1e-12, f"{policy!r}: restored cache diverges"
            swapped = cache.reorder(torch.tensor([1, 0]))
            out, _ = model(ids.flip(0)[:, 14:], swapped)
            assert (out - ref.flip(0)[:, 14:]).abs().max() <= 1e-12, f"{policy!r}: reordered cache diverges"
            out, _ = model(ids[:, 14:], cache)  # the original is untouched by its reordered copy
            assert (out - ref[:, 14:]).abs().max() <= 1e-12, f"{policy!r}: reorder changed the original"


def test_positional_attention_matches_the_contiguous_op_and_the_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=g, dtype=F64)
    k = torch.randn(2, 3 + 12, 2, 8, generator=g, dtype=F64)  # 3 prefix entries, 12 sequence keys, GQA 4 / 2
    v = torch.randn(2, 3 + 12, 2, 8, generator=g, dtype=F64)
    pos = torch.arange(12)[None, :, None].expand(2, 12, 2)
    q_pos = torch.arange(7, 12)
    for window in (None, 4):
        ref = causal_attention(q, k, v, window=window, prefix=3)
        out = positional_attention(q, k, v, q_pos, pos, window=window, prefix=3)
        assert (ref - out).abs().max() <= 1e-12, f"window {window}: contiguous positions differ from the op"
    # gaps: drop keys 2..5 of head 0 only; the dense reference on head 0 / head 1 separately must agree
    keep0 = torch.tensor([0, 1, 6, 7, 8, 9, 10, 11])
    keep1 = torch.tensor([0, 1, 2, 3, 4, 9, 10, 11])
    kk = torch.stack([k[:, 3:][:, keep0, 0], k[:, 3:][:, keep1, 1]], dim=2)
    vv = torch.stack([v[:, 3:][:, keep0, 0], v[:, 3:][:, keep1, 1]], dim=2)
    pp = torch.stack([keep0, keep1], dim=1)[None].expand(2, -1, -1)
    out = positional_attention(q, kk, vv, q_pos, pp)  # [B, 5, 4, 8]
    for h, keep in ((0, keep0), (1, keep1)):
        for i in range(5):  # query at position 7 + i sees kept keys <= 7 + i
            vis = keep <= 7 + i
            ki = k[:, 3:][:, keep[vis], h : h + 1].expand(-1, -1, 2, -1)
            vi = v[:, 3:][:, keep[vis], h : h + 1].expand(-1, -1, 2, -1)
            r = causal_attention_reference(q[:, i : i + 1, 2 * h : 2 * h + 2], ki[:, :, :1], vi[:, :, :1])
            assert (r - out[:, i : i + 1, 2 * h : 2 * h + 2]).abs().max() <= 1e-12, f"head {h} query {i}"


@pytest.mark.parametrize("make,arg", [
    (lambda: H2O(0), "budget"), (lambda: H2O(-3), "budget"), (lambda: SnapKV(1.5), "budget"),
    (lambda: StreamingLLM(0.0), "budget"), (lambda: L2Norm(True), "budget"), (lambda: KIVI(3), "bits"),
    (lambda: KIVI(2, key_bits=1), "key_bits"), (lambda: KIVI(2, group_size=3, residual=8), "residual"),
    (lambda: SnapKV(64, kernel_size=4), "kernel_size"), (lambda: SnapKV(64, pooling="mean"), "pooling"),
    (lambda: SnapKV(16, window_size=32), "budget"), (lambda: StreamingLLM(4, sinks=4), "budget"),
    (lambda: ThinK(1.0), "pruning_ratio"), (lambda: ThinK(-0.1), "pruning_ratio"),
    (lambda: H2O(8, recent=1.5), "recent"), (lambda: PyramidKV(64, beta=0.5), "beta"),
])
def test_bad_policy_arguments_raise_value_error_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_bad_models_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="no attention layer"):
        apply_kv_policy(make_model("lmm"), H2O(8))
    with pytest.raises(ValueError, match="MAC mixer.*rerotate"):  # MAC takes most policies (test_kv_mac.py)
        apply_kv_policy(make_model("mac"), StreamingLLM(8, sinks=2, rerotate=True))
    with pytest.raises(ValueError, match="model must be"):
        apply_kv_policy("not a model", H2O(8))
    with pytest.raises(ValueError, match="group_size"):  # head dim 8 (d_model 32 / 4 heads)
        apply_kv_policy(make_model("transformer"), KIVI(2, group_size=16, residual=16))
    with pytest.raises(ValueError, match="policy must be"):
        Attention(16, 2).set_kv_policy("h2o")
    with pytest.raises(ValueError, match="update_view needs q"):
        H2O(8).make_cache(1, 2, 8).update(torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8))


def test_use_kv_policy_restores_previous_policies_even_on_error():
    model = make_model("swa")
    apply_kv_policy(model, L2Norm(8))
    with pytest.raises(RuntimeError):
        with use_kv_policy(model, H2O(8)):
            assert isinstance(model.blocks[0].mixer.kv_policy, H2O)
            raise RuntimeError("boom")
    assert isinstance(model.blocks[0].mixer.kv_policy, L2Norm)
    assert [b.mixer.kv_layer for b in model.blocks] == [(0, 2), (1, 2)]
    apply_kv_policy(model, None)
    assert isinstance(attn_caches(model.init_cache(1))[0], RollingKVCache)
