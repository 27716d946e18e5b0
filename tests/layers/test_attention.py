"""Tests for short-term memory: causal attention (full / sliding window / prefix), RoPE, KV caches, the layer.

Invariants checked (docs: DESIGN.md "Invariants every fast path must keep"):
- the blocked SDPA op equals the dense reference (outputs and gradients, float64), for odd lengths and windows
  1, 3, 16 and wider than T, with and without a visible prefix, with grouped-query heads;
- decoding with a cache (full or rolling), one token at a time or in uneven pieces, equals the parallel forward;
- strict causality and batch independence;
- RoPE scores depend only on position differences;
- the rolling cache holds at most W - 1 entries, and the sliding-window op builds O(T * W) masks, not O(T^2);
- bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import io
import itertools

import pytest
import torch

from mnemos.layers import attention as attention_mod
from mnemos.layers.attention import Attention, causal_attention, causal_attention_reference
from mnemos.layers.kv_cache import FullKVCache, KVCache, RollingKVCache
from mnemos.layers.rope import RotaryEmbedding

F64 = torch.float64


def assert_max_err(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (ref - out).abs().max().item() if ref.numel() else 0.0
    assert err <= tol, f"{name}: max |ref - out| = {err:.3e} > {tol:.1e}"


def _qkv(b, n_q, n_k, h, h_kv, d, dv=None, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n_q, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, n_k, h_kv, d, generator=g, dtype=dtype)
    v = torch.randn(b, n_k, h_kv, dv or d, generator=g, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------------------------------
# the reference's own mask, checked by hand once
# ---------------------------------------------------------------------------------------------------------------------
def test_reference_mask_by_hand():
    # 3 queries at the end of 4 sequence keys, prefix of 2, window 2
    got = attention_mod._reference_mask(3, 6, window=2, prefix=2).int()
    want = torch.tensor(
        [
            # P P s0 s1 s2 s3
            [1, 1, 1, 1, 0, 0],  # query at s1 sees s0, s1
            [1, 1, 0, 1, 1, 0],  # query at s2 sees s1, s2
            [1, 1, 0, 0, 1, 1],  # query at s3 sees s2, s3
        ]
    )
    assert torch.equal(got, want)
    full = attention_mod._reference_mask(3, 3, window=None, prefix=0).int()
    assert torch.equal(full, torch.tril(torch.ones(3, 3, dtype=torch.int)))


# ---------------------------------------------------------------------------------------------------------------------
# fast op == dense reference
# ---------------------------------------------------------------------------------------------------------------------
CASES = [
    (t, w, p, hkv)
    for t, w, p, hkv in itertools.product([1, 7, 63, 100], [None, 1, 3, 16, 1000], [0, 4], [4, 2])
    if not (hkv == 2 and p == 4 and t in (7, 63))  # keep the grid small; GQA + prefix still covered at T=1, 100
]


@pytest.mark.parametrize("t,window,prefix,h_kv", CASES, ids=[f"T{t}-W{w}-P{p}-Hkv{h}" for t, w, p, h in CASES])
def test_matches_reference(t, window, prefix, h_kv):
    q, k, v = _qkv(2, t, prefix + t, 4, h_kv, 8, dv=6, seed=t)
    ref = causal_attention_reference(q, k, v, window=window, prefix=prefix)
    out = causal_attention(q, k, v, window=window, prefix=prefix)
    assert_max_err("o", ref, out, 1e-12)


@pytest.mark.parametrize("n_q,n_seq", [(1, 40), (5, 40), (17, 40)])
@pytest.mark.parametrize("window", [None, 3, 16])
def test_matches_reference_with_past_keys(n_q, n_seq, window):
    """Fewer queries than keys: the queries are the last n_q positions (decoding with a cache)."""
    q, k, v = _qkv(2, n_q, 3 + n_seq, 4, 4, 8, seed=n_q)
    ref = causal_attention_reference(q, k, v, window=window, prefix=3)
    out = causal_attention(q, k, v, window=window, prefix=3)
    assert_max_err("o", ref, out, 1e-12)


@pytest.mark.parametrize("block_size", [1, 7, 64, 500])
def test_block_size_does_not_change_result(block_size):
    q, k, v = _qkv(1, 100, 102, 2, 2, 8, seed=3)
    ref = causal_attention_reference(q, k, v, window=9, prefix=2)
    out = causal_attention(q, k, v, window=9, prefix=2, block_size=block_size)
    assert_max_err("o", ref, out, 1e-12)


@pytest.mark.parametrize(
    "window,prefix", [(None, 0), (None, 3), (4, 0), (4, 3)], ids=["full", "full-P3", "W4", "W4-P3"]
)
def test_gradients_match_reference(window, prefix):
    q, k, v = _qkv(2, 37, prefix + 37, 4, 2, 8, seed=5, requires_grad=True)
    g = torch.randn(2, 37, 4, 8, dtype=F64, generator=torch.Generator().manual_seed(9))
    ref = causal_attention_reference(q, k, v, window=window, prefix=prefix)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    out = causal_attention(q, k, v, window=window, prefix=prefix, block_size=8)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for name, a, b in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_max_err(name, a, b, 1e-11)


def test_gradcheck_sliding_window_small():
    q, k, v = _qkv(1, 6, 8, 2, 1, 4, seed=11, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: causal_attention(q, k, v, window=2, prefix=2, block_size=4), (q, k, v)
    )


def test_segment_local_mask_mac_style():
    """MAC: keys [persistent (3) || h (2) || segment (5)], queries = the segment; prefix visible, segment causal."""
    n_p, n_h, n = 3, 2, 5
    q, k, v = _qkv(2, n, n_p + n_h + n, 4, 4, 8, seed=21)
    out = causal_attention(q, k, v, prefix=n_p + n_h)
    assert_max_err("o", causal_attention_reference(q, k, v, prefix=n_p + n_h), out, 1e-12)
    # query 0 of the segment sees exactly the prefix and itself
    k2, v2 = k.clone(), v.clone()
    k2[:, n_p + n_h + 1 :] += 10.0
    v2[:, n_p + n_h + 1 :] -= 10.0
    out2 = causal_attention(q, k2, v2, prefix=n_p + n_h)
    assert_max_err("o[:, 0] with later segment keys changed", out[:, 0], out2[:, 0], 0.0)
    k3 = k.clone()
    k3[:, 0] += 1.0  # a persistent key: every query sees it
    out3 = causal_attention(q, k3, v, prefix=n_p + n_h)
    assert ((out3 - out).abs().amax(dim=(0, 2, 3)) > 1e-6).all(), "every query must see the prefix"
    # all segments at once by folding them into the batch: [B, 2N, H, D] -> [B * 2, N, H, D]
    qs, ks, vs = _qkv(2, 2 * n, 2 * n, 4, 4, 8, seed=22)
    pk, pv = _qkv(4, 1, n_p, 4, 4, 8, seed=23)[1:]  # per-(batch, segment) prefix, [B * 2, P, H, D]
    folded = causal_attention(
        qs.reshape(4, n, 4, 8),  # [B * 2, N, H, D]
        torch.cat((pk, ks.reshape(4, n, 4, 8)), dim=1),  # [B * 2, P + N, H, D]
        torch.cat((pv, vs.reshape(4, n, 4, 8)), dim=1),
        prefix=n_p,
    ).reshape(2, 2 * n, 4, 8)  # [B, 2N, H, D]
    for seg in range(2):
        sl = slice(seg * n, (seg + 1) * n)
        one = causal_attention_reference(
            qs[:, sl], torch.cat((pk[seg::2], ks[:, sl]), 1), torch.cat((pv[seg::2], vs[:, sl]), 1), prefix=n_p
        )
        assert_max_err(f"segment {seg}", one, folded[:, sl], 1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# O(T * W) memory on the sliding-window path: instrument the single SDPA call site
# ---------------------------------------------------------------------------------------------------------------------
def _record_sdpa(monkeypatch):
    calls = []
    real = attention_mod._sdpa

    def recording(q, k, v, mask, is_causal, scale):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "mask": None if mask is None else tuple(mask.shape)})
        return real(q, k, v, mask, is_causal, scale)

    monkeypatch.setattr(attention_mod, "_sdpa", recording)
    return calls


@pytest.mark.parametrize("window,block_size", [(16, None), (16, 32), (100, None)])
def test_sliding_window_builds_o_t_w_blocks(monkeypatch, window, block_size):
    calls = _record_sdpa(monkeypatch)
    bq = block_size or max(64, min(window, 1024))
    peak, totals = {}, {}
    for t in (1024, 4096):
        calls.clear()
        q, k, v = (torch.randn(1, t, 1, 4) for _ in range(3))
        causal_attention(q, k, v, window=window, block_size=block_size)
        assert calls, "no SDPA call recorded"
        for c in calls:
            n_q, n_k = c["mask"]
            assert n_q <= bq and n_k <= bq + window - 1, f"T={t}: block mask {c['mask']} wider than Bq + W - 1"
            assert c["k"][2] == n_k, "keys gathered must match the mask's columns"
        total = sum(c["mask"][0] * c["mask"][1] for c in calls)
        assert total <= t * (bq + window - 1), f"T={t}: {total} mask entries, not O(T * W)"
        totals[t] = total
        peak[t] = max(c["mask"][0] * c["mask"][1] for c in calls)
    assert peak[1024] == peak[4096], f"the largest block grew with T: {peak}"
    # 4x the tokens -> ~4x the mask entries (linear in T), where a T x T mask would grow 16x
    assert totals[4096] <= 4.2 * totals[1024], f"mask entries grew faster than T: {totals}"
    assert totals[4096] < 4096 * 4096 // 8, f"{totals[4096]} mask entries at T=4096 is O(T^2)"


def test_full_causal_self_attention_builds_no_mask(monkeypatch):
    calls = _record_sdpa(monkeypatch)
    q, k, v = _qkv(1, 50, 50, 2, 2, 4)
    causal_attention(q, k, v)
    causal_attention(q, k, v, window=50)  # a window covering everything is full attention
    assert [c["mask"] for c in calls] == [None, None]


# ---------------------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------------------
def test_rope_scores_depend_only_on_position_difference():
    rope = RotaryEmbedding(16)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)

    def score(m, n):
        return (rope(q, offset=m) * rope(k, offset=n)).sum().item()

    for m, n in [(0, 0), (5, 2), (2, 5), (17, 0)]:
        base = score(m, n)
        for shift in (1, 13, 1000, 123456):
            assert abs(score(m + shift, n + shift) - base) <= 1e-9 * max(1.0, abs(base)), (m, n, shift)
    assert abs(score(5, 2) - score(2, 5)) > 1e-6, "scores must depend on the sign of the difference"
    assert abs(score(0, 0) - (q * k).sum().item()) <= 1e-12, "position difference 0 leaves the score unrotated"


def test_rope_offset_matches_slice_and_preserves_norm():
    rope = RotaryEmbedding(8, base=500.0)
    x = torch.randn(2, 30, 3, 8, dtype=F64)
    full = rope(x, offset=0)
    assert_max_err("offset 11", full[:, 11:20], rope(x[:, 11:20], offset=11), 0.0)
    assert_max_err("norm", x.norm(dim=-1), full.norm(dim=-1), 1e-12)
    x32 = x.float()
    assert_max_err("float32", full.float(), rope(x32), 1e-5)
    assert rope(x.to(torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# the layer: streaming with a cache == parallel forward
# ---------------------------------------------------------------------------------------------------------------------
LAYERS = {
    "full": dict(),
    "W1": dict(window=1),
    "W4": dict(window=4),
    "W16-persist3-gqa": dict(window=16, num_persistent=3, n_kv_heads=2),
    "full-persist2-gqa": dict(num_persistent=2, n_kv_heads=1),
}


def _layer(dtype=F64, seed=0, **kw):
    torch.manual_seed(seed)
    return Attention(32, 4, **kw).to(dtype)


def _stream(layer, x, pieces, cache, prefix_kv=None):
    ys, s = [], 0
    for n in pieces:
        y, cache = layer(x[:, s : s + n], cache, prefix_kv=prefix_kv)
        ys.append(y)
        s += n
    assert s == x.shape[1]
    return torch.cat(ys, dim=1), cache


UNEVEN = [3, 1, 5, 2, 1, 8, 1, 4, 6]  # 31 tokens


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("pieces", ["ones", "uneven"])
def test_decoding_matches_parallel(name, dtype, tol, pieces):
    layer = _layer(dtype, **LAYERS[name])
    x = torch.randn(2, 31, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y_par, none = layer(x)
    assert none is None
    sizes = [1] * 31 if pieces == "ones" else UNEVEN
    cache = layer.init_state(2, x.device, dtype)
    y_seq, cache = _stream(layer, x, sizes, cache)
    assert_max_err(f"{name} y", y_par, y_seq, tol)
    assert cache.seen_tokens == 31
    if layer.window is not None:
        assert isinstance(cache, RollingKVCache) and cache.num_stored == layer.window - 1
        # a full cache works for a windowed layer too (it just keeps more than it needs)
        full = FullKVCache(2, layer.n_kv_heads, layer.head_dim, dtype=dtype)
        y_full, full = _stream(layer, x, sizes, full)
        assert_max_err(f"{name} y (FullKVCache)", y_par, y_full, tol)
        assert full.num_stored == 31


def test_decoding_with_prefix_kv_matches_parallel():
    layer = _layer(window=5, num_persistent=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 20, 32, dtype=F64, generator=g)
    prefix = (torch.randn(2, 3, 4, 8, dtype=F64, generator=g), torch.randn(2, 3, 4, 8, dtype=F64, generator=g))
    y_par, _ = layer(x, prefix_kv=prefix)
    y_seq, _ = _stream(layer, x, [7, 1, 1, 11], layer.init_state(2, x.device, F64), prefix_kv=prefix)
    assert_max_err("y", y_par, y_seq, 1e-10)
    y_no_prefix, _ = layer(x)
    assert (y_par - y_no_prefix).abs().max() > 1e-6, "prefix_kv must be attended to"


def test_persistent_tokens_are_attended_to_and_learned():
    layer = _layer(window=3, num_persistent=2)
    assert layer.init_state(1).dtype == F64, "init_state's dtype follows the parameters"
    x = torch.randn(1, 9, 32, dtype=F64)
    y, _ = layer(x)
    y.square().sum().backward()
    assert layer.persistent_k.grad is not None and layer.persistent_k.grad.abs().sum() > 0
    assert layer.persistent_v.grad is not None and layer.persistent_v.grad.abs().sum() > 0
    with torch.no_grad():
        layer.persistent_v.add_(1.0)
    y2, _ = layer(x)
    assert ((y2 - y).abs().amax(dim=(0, 2)) > 1e-8).all(), "every position must see the persistent tokens"


def test_cache_state_dict_round_trip():
    layer = _layer(window=6)
    x = torch.randn(2, 25, 32, dtype=F64)
    y_par, _ = layer(x)
    cache = layer.init_state(2, x.device, F64)
    y1, cache = layer(x[:, :13], cache)
    buf = io.BytesIO()
    torch.save(cache.state_dict(), buf)
    buf.seek(0)
    fresh = layer.init_state(2, x.device, F64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.seen_tokens == 13 and fresh.num_stored == 5
    y2, _ = layer(x[:, 13:], fresh)
    assert_max_err("y", y_par, torch.cat([y1, y2], 1), 1e-10)
    with pytest.raises(ValueError, match="state\\['k'\\]"):
        FullKVCache(3, 4, 8, dtype=F64).load_state_dict(cache.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# the rolling cache stays O(W)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 2, 7])
def test_rolling_cache_never_holds_more_than_window(window):
    cache = RollingKVCache(window, 2, 3, 4, dtype=F64)
    assert isinstance(cache, KVCache) and cache.window == window
    entry_bytes = 2 * 3 * 4 * 8  # one token: B * H * D float64
    stream = torch.randn(2, 200, 3, 4, dtype=F64)
    s = 0
    for n in [1, 1, 50, 3, 1, 100, 2, 1, 41]:
        new = stream[:, s : s + n]
        k_all, v_all = cache.update(new, new * 2)
        s += n
        assert cache.seen_tokens == s
        assert cache.num_stored == min(window - 1, s) <= window
        assert k_all.shape[1] == min(window - 1, s - n) + n
        assert torch.equal(k_all, stream[:, s - k_all.shape[1] : s]), "returned keys must be the most recent run"
        assert torch.equal(v_all, 2 * k_all)
        # the stored tensors own their memory: no view pinning a long prefill's storage
        assert cache.keys.untyped_storage().nbytes() <= window * entry_bytes
        assert cache.values.untyped_storage().nbytes() <= window * entry_bytes
    assert s == 200


# ---------------------------------------------------------------------------------------------------------------------
# causality and batch independence
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "W4", "W16-persist3-gqa"])
def test_strict_causality(name):
    layer = _layer(**LAYERS[name])
    x = torch.randn(2, 40, 32, dtype=F64)
    y, _ = layer(x)
    for t in (0, 17, 38):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 5
        y2, _ = layer(x2)
        assert_max_err(f"y[:, :{t + 1}]", y[:, : t + 1], y2[:, : t + 1], 1e-12)
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-6, "the perturbation must reach later outputs"


@pytest.mark.parametrize("name", ["full", "W4", "W16-persist3-gqa"])
def test_batch_independence(name):
    layer = _layer(**LAYERS[name])
    x = torch.randn(3, 40, 32, dtype=F64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    y2, _ = layer(x2)
    assert_max_err("y[0]", y[0], y2[0], 1e-12)
    assert_max_err("y[2]", y[2], y2[2], 1e-12)
    y_alone, _ = layer(x[2:3])
    assert_max_err("y[2] alone", y[2:3], y_alone, 1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_value_error_naming_them():
    q, k, v = _qkv(1, 5, 5, 4, 2, 8)
    bad_calls = [
        ("window", lambda: causal_attention(q, k, v, window=0)),
        ("window", lambda: causal_attention(q, k, v, window=-3)),
        ("window", lambda: causal_attention_reference(q, k, v, window=0)),
        ("prefix", lambda: causal_attention(q, k, v, prefix=-1)),
        ("prefix", lambda: causal_attention(q, k, v, prefix=2)),  # 5 keys - 2 prefix < 5 queries
        ("block_size", lambda: causal_attention(q, k, v, window=2, block_size=0)),
        ("q must be", lambda: causal_attention(q[0], k, v)),
        ("k must be", lambda: causal_attention(q, k[0], v)),
        ("v must", lambda: causal_attention(q, k, v[:, :4])),
        ("heads", lambda: causal_attention(q[:, :, :3], k, v)),
        ("dtype", lambda: causal_attention(q.float(), k, v)),
        ("head_dim", lambda: RotaryEmbedding(7)),
        ("offset", lambda: RotaryEmbedding(8)(q, offset=-1)),
        ("x must be", lambda: RotaryEmbedding(8)(q[0])),
        ("window", lambda: RollingKVCache(0, 1, 1, 2)),
        ("k_new", lambda: FullKVCache(1, 2, 8).update(q, q)),  # 4 heads into a 2-head cache
        ("n_heads", lambda: Attention(30, 4)),  # 4 does not divide 30
        ("head_dim", lambda: Attention(32, 4, head_dim=5)),
        ("n_kv_heads", lambda: Attention(32, 4, n_kv_heads=3)),
        ("window", lambda: Attention(32, 4, window=0)),
        ("num_persistent", lambda: Attention(32, 4, num_persistent=-1)),
        ("x must be", lambda: Attention(32, 4)(torch.randn(2, 32))),
        ("x must be", lambda: Attention(32, 4)(torch.randn(2, 3, 16))),
        ("window", lambda: Attention(32, 4, window=8)(torch.randn(1, 3, 32), RollingKVCache(4, 1, 4, 8))),
        ("window", lambda: Attention(32, 4)(torch.randn(1, 3, 32), RollingKVCache(4, 1, 4, 8))),
        ("cache", lambda: Attention(32, 4)(torch.randn(1, 3, 32), {"k": q})),
        ("prefix_kv", lambda: Attention(32, 4)(torch.randn(1, 3, 32), prefix_kv=(q, q[:, :, :1]))),
    ]
    for name, call in bad_calls:
        with pytest.raises(ValueError, match=name):
            call()
