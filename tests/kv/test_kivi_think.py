"""KIVI (packed 2/4/8-bit quantisation) and ThinK (key-channel pruning, stored narrower).

KIVI: per-group |x - x^| <= scale / 2 (+ rounding) with the group's min reproduced exactly; constant groups give no
NaN; pack / unpack round trip; the number of full-precision keys / values follows the residual-window rule
(n mod R keys, min(n, R) values) however the stream is cut; the cache's dequantised keys equal per-channel
quantisation of G-token groups and its values per-token quantisation of G-channel groups; packed bytes are real.
ThinK: exactly floor(lambda * D) channels pruned per row and head, the brute-force lowest of
||Q_obs[:, i]||^2 ||K[:, i]||^2; kept channels and values bit-identical; the recent keys full width; bytes drop.
"""

from __future__ import annotations

import pytest
import torch
from kv_helpers import F64, attn_caches, ids_of, make_model, stream

from mnemos.kv import KIVI, ThinK, dequantize, pack, quantize, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantisation_error_is_at_most_half_a_step_per_group(bits):
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(bits), dtype=torch.float32) * 3
    codes, scale, zero = quantize(x, bits, dim=2)  # groups of 16 along the last dim
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    xh = dequantize(codes, scale, zero)
    err = (x - xh).abs()
    assert (err <= scale / 2 + 1e-5 * x.abs().amax(dim=2, keepdim=True)).all(), f"max err / s = {(err / scale).max()}"
    assert torch.equal(zero, x.amin(dim=2, keepdim=True)), "z is the group min"
    assert (xh.amin(dim=2) == x.amin(dim=2)).all(), "the min is reproduced exactly"
    assert (xh.amax(dim=2) - x.amax(dim=2)).abs().max() <= 1e-5, "the max is reproduced"


def test_constant_groups_give_no_nan():
    x = torch.full((2, 4, 8), 1.25)
    x[1] = -3.0
    codes, scale, zero = quantize(x, 2, dim=2)
    xh = dequantize(codes, scale, zero)
    assert torch.isfinite(xh).all() and torch.equal(xh, x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_byte_count(bits):
    codes = torch.randint(0, 2**bits, (2, 5, 3, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 5, 3, 16 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("pieces", [[37], [5, 1, 1, 20, 3, 1, 6], [16, 16, 1, 4]])
def test_full_precision_counts_follow_the_residual_rule(pieces):
    g = torch.Generator().manual_seed(1)
    b, h, d, G, R = 2, 2, 8, 4, 8
    k = torch.randn(b, sum(pieces), h, d, generator=g)
    v = torch.randn(b, sum(pieces), h, d, generator=g)
    cache = KIVI(2, group_size=G, residual=R).make_cache(b, h, d)
    n = 0
    for t in pieces:
        cache.update_view(k[:, n : n + t], v[:, n : n + t])
        n += t
        assert cache.num_full_precision == (n % R, min(n, R)), f"after {n} tokens"
        assert cache.num_stored == n
    kh, vh = cache.dequantized()
    nq_k, nq_v = n - n % R, max(0, n - R)
    # keys: per channel, groups of G consecutive tokens; values: per token, groups of G consecutive channels
    ck, sk, zk = quantize(k[:, :nq_k].reshape(b, nq_k // G, G, h, d), 2, dim=2)
    assert torch.allclose(kh[:, :nq_k], dequantize(ck, sk, zk).reshape(b, nq_k, h, d), atol=1e-6)
    cv, sv, zv = quantize(v[:, :nq_v].reshape(b, nq_v, h, d // G, G), 2, dim=4)
    assert torch.allclose(vh[:, :nq_v], dequantize(cv, sv, zv).reshape(b, nq_v, h, d), atol=1e-6)
    assert torch.equal(kh[:, nq_k:], k[:, nq_k:]) and torch.equal(vh[:, nq_v:], v[:, nq_v:]), "residual is exact"
    # the bytes: packed codes (D * b / 8 per token and head), scales and zeros, the residual
    want = b * h * (nq_k * d // 4 + 2 * (nq_k // G) * d * 4 + (n - nq_k) * d * 4
                    + nq_v * d // 4 + 2 * nq_v * (d // G) * 4 + (n - nq_v) * d * 4)
    assert cache.nbytes == want


def test_kivi_on_a_model_is_close_at_8_bits_and_exact_without_quantisation():
    model = make_model("transformer")
    ids = ids_of(2, 24)
    ref, _ = stream(model, ids, [10, 1, 1, 12])
    with KIVI(8, group_size=4, residual=4)(model):
        out8, cache = stream(model, ids, [10, 1, 1, 12])
    with KIVI(2, group_size=4, residual=4)(model):
        out2, _ = stream(model, ids, [10, 1, 1, 12])
    e8, e2 = (out8 - ref).abs().max().item(), (out2 - ref).abs().max().item()
    assert 0 < e8 < 0.05 and e8 < e2, f"8-bit error {e8:.3e}, 2-bit error {e2:.3e}"
    assert attn_caches(cache)[0].kq.dtype == torch.uint8


def test_kivi_on_a_sliding_window_layer_stays_bounded():
    model = make_model("swa")  # window 5
    ids = ids_of(1, 40)
    with KIVI(4, group_size=2, residual=2)(model):
        _, cache = stream(model, ids, [11, 1, 1, 1, 9, 17], on_call=lambda c: [
            kv.num_stored <= 4 + 1 or pytest.fail(f"{kv!r}") for kv in attn_caches(c)])


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam,hq", [(0.4, 2), (0.5, 4), (0.25, 2)])
def test_think_prunes_exactly_the_brute_force_lowest_channels(lam, hq):
    g = torch.Generator().manual_seed(2)
    b, t, h, d, w, recent = 2, 20, 2, 8, 4, 3
    q = torch.randn(b, t, hq, d, generator=g, dtype=F64)
    k = torch.randn(b, t, h, d, generator=g, dtype=F64)
    v = torch.randn(b, t, h, d, generator=g, dtype=F64)
    cache = ThinK(lam, window_size=w, recent=recent).make_cache(b, h, d, dtype=F64)
    view = cache.update_view(k[:, :14], v[:, :14], q=q[:, :14])
    assert torch.equal(view.keys, k[:, :14]), "the first call attends with its own full keys"
    for s in range(14, t):  # decoding steps
        cache.update_view(k[:, s : s + 1], v[:, s : s + 1], q=q[:, s : s + 1])
    n_pruned = int(lam * d)
    assert cache.kp.shape == (b, t - recent, h, d - n_pruned) and cache.kf.shape == (b, recent, h, d)
    wide = cache.widened_keys()
    group = hq // h
    for bi in range(b):
        for hi in range(h):
            score = []
            for i in range(d):  # brute force: ||Q_obs[:, i]||^2 (mean over the group) * ||K[:, i]||^2
                qn = sum(float((q[bi, 14 - w : 14, hi * group + m, i] ** 2).sum()) for m in range(group)) / group
                score.append(qn * float((k[bi, :14, hi, i] ** 2).sum()))
            pruned = sorted(sorted(range(d), key=lambda i: score[i])[:n_pruned])
            kept = [i for i in range(d) if i not in pruned]
            assert cache.channels[bi, hi].tolist() == kept, f"row {bi} head {hi}"
            assert (wide[bi, : t - recent, hi][:, pruned] == 0).all(), "pruned channels read as zero"
            assert torch.equal(wide[bi, : t - recent, hi][:, kept], k[bi, : t - recent, hi][:, kept])
    assert torch.equal(wide[:, t - recent :], k[:, t - recent :]), "the recent keys stay full width"
    assert torch.equal(cache.v, v), "values untouched"
    full_bytes = 2 * b * t * h * d * 8
    assert cache.nbytes == full_bytes - b * (t - recent) * h * n_pruned * 8 + b * h * (d - n_pruned) * 2
    assert cache.nbytes < full_bytes


def test_think_on_models_keeps_values_and_window_and_changes_logits():
    for variant in ("transformer", "mal"):
        model = make_model(variant)
        ids = ids_of(2, 24)
        ref, _ = stream(model, ids, [12, 1, 1, 10])
        with ThinK(0.5, window_size=4, recent=2)(model):
            out, cache = stream(model, ids, [12, 1, 1, 10])
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-6, f"{variant}: pruning changed nothing"
        for kv in attn_caches(cache):
            assert kv.kp.shape[-1] == 4 and kv.channels.shape[-1] == 4
            if variant == "mal":
                assert kv.num_stored == model.config.window - 1


def test_snapkv_plus_think_keeps_snapkvs_entries_at_thinks_channels():
    """compose(SnapKV, ThinK): after the prompt, the entries SnapKV keeps alone with their values untouched, their keys
    (all but the last `recent` kept) at the channels ThinK alone chooses, zeros elsewhere; fewer bytes than SnapKV
    alone; decoding on; with a budget over the context and nothing pruned, the full cache's logits."""
    from mnemos.kv import SnapKV, ThinKComposedCache, compose, parse_policy_spec

    model, ids = make_model("transformer"), ids_of(2, 24)
    snap, think = SnapKV(10, window_size=4), ThinK(0.5, window_size=4, recent=3)
    with snap(model):
        ref, c_snap = stream(model, ids[:, :16], [16])
    with think(model):
        _, c_think = stream(model, ids[:, :16], [16])
    with compose(snap, think)(model):
        out, c_both = stream(model, ids[:, :16], [16])
        assert torch.equal(out, ref)  # the prompt's own keys are read at full width
        more, _ = stream(model, ids[:, 16:], [1, 1, 6], cache=c_both)
    assert torch.isfinite(more).all()
    for s, t, b in zip(attn_caches(c_snap), attn_caches(c_think), attn_caches(c_both), strict=True):
        assert isinstance(b, ThinKComposedCache)
        assert torch.equal(b.channels, t.channels)  # ThinK's choice, from the first call
    with compose(snap, think)(model):
        _, c_both = stream(model, ids[:, :16], [16])
    for s, b in zip(attn_caches(c_snap), attn_caches(c_both), strict=True):
        assert torch.equal(b.kept_positions(), s.kept_positions()) and torch.equal(b.values, s.values)
        n_old = b.num_stored - 3
        assert b.kp.shape == (2, n_old, s.n_heads, 4) and b.kf.shape[1] == 3 and b.nbytes < s.nbytes
        kept = torch.zeros(2, s.n_heads, 8, dtype=torch.bool).scatter(2, b.channels.long(), True)  # [B, H, D]
        want = torch.where(kept[:, None], s.keys[:, :n_old], torch.zeros(()))  # SnapKV's keys, pruned channels 0
        assert torch.equal(b.keys[:, :n_old], want) and torch.equal(b.keys[:, n_old:], s.keys[:, n_old:])
    (spec,) = parse_policy_spec("snapkv:budget=10,window_size=4+think:pruning_ratio=0.5,window_size=4,recent=3")
    assert spec.policy.think.pruning_ratio == 0.5 and spec.name == "snapkv+think"
    full, _ = stream(model, ids, [16, 1, 1, 6])
    with compose(SnapKV(64, window_size=4), ThinK(0.0, window_size=4, recent=3))(model):
        same, _ = stream(model, ids, [16, 1, 1, 6])
    assert (same - full).abs().max() <= 1e-12
