"""MiniCache: cross-layer SLERP merge of adjacent layers' KV caches (arXiv 2405.14366, sec. 4).

- SLERP equals the plain float64 formula on random directions, and the exact rotation on nearly parallel / nearly
  opposite pairs (where the plain formula loses digits); t = 0 / 1 give each layer's direction;
- norms are kept exactly; two identical layers restore their cache exactly (nothing retained);
- with every token retained, the model's logits equal the full cache's (Transformer++, SWA, MAG, MAL; streamed prefill
  and decoding); with none retained, the bytes are exactly the formula's and the pair's drop by ``S H (D - 2) e``
  (float64 norms) per K / V;
- a streamed prefill and decoding equal a reference that merges with plain formulas and a running d_min / d_max;
  the retention rule keeps exactly the tokens the brute-force threshold names;
- caches survive serialisation, ``reorder`` and ``select`` mid-stream; batch rows do not cross-talk; a
  sliding-window pair stays bounded;
- a Hugging Face Llama (GQA 4 / 2) through ``PolicyCache`` and ``with policy(model)``;
- bad arguments raise ValueError naming them.
"""

from __future__ import annotations

import math

import pytest
import torch
from kv_helpers import F64, attn_caches, ids_of, make_model, stream, tiny_llama

from mnemos.eval.stateful import state_size
from mnemos.kv import MiniCache, MiniCacheLower, MiniCacheUpper, apply_kv_policy, parse_policy_spec, slerp
from mnemos.kv.minicache import merge_pair
from mnemos.layers.kv_cache import FullKVCache, KVCache, KVPolicy

PIECES = [9, 4, 1, 1, 1, 6]  # a streamed prefill in uneven chunks, decoding steps, another chunk


class RetainAll(MiniCache):
    """MiniCache whose retention keeps every token unmerged (the threshold below every d)."""

    def retain_mask(self, d, stat):
        return torch.ones_like(d, dtype=torch.bool)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _plain_slerp(e0, e1, t):
    omega = torch.arccos((e0 * e1).sum(-1, keepdim=True).clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * e0 + torch.sin(t * omega) * e1) / torch.sin(omega)


def _pair(policy, b, h, d, dtype=F64, window=None):
    lower = policy.make_cache(b, h, d, window=window, layer_idx=0, n_layers=2, dtype=dtype)
    upper = policy.make_cache(b, h, d, window=window, layer_idx=1, n_layers=2, dtype=dtype)
    assert isinstance(lower, MiniCacheLower) and isinstance(upper, MiniCacheUpper)
    return lower, upper


def _upper_restored(lower, upper):
    return tuple(lower.restore(kind, upper.norms(kind), upper._ret[kind]) for kind in "kv")


# ----------------------------------------------------------------------------------------------------------------------
# the math


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.6, 1.0])
def test_slerp_equals_the_float64_formula_and_the_exact_rotation(t):
    g = torch.Generator().manual_seed(0)
    e0, e1 = _unit(torch.randn(200, 16, generator=g, dtype=F64)), _unit(torch.randn(200, 16, generator=g, dtype=F64))
    out = slerp(e0, e1, t)
    assert (out - _plain_slerp(e0, e1, t)).abs().max() <= 1e-12
    assert ((out.norm(dim=-1) - 1).abs() <= 1e-14).all()
    if t in (0.0, 1.0):
        assert (out - (e0 if t == 0 else e1)).abs().max() <= 1e-14
    # nearly parallel and nearly opposite: e1 is e0 rotated by omega in a random plane; SLERP rotates by t * omega
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=F64))
    for omega in (1e-9, 1e-5, math.pi - 1e-4, math.pi - 1e-7):
        a = torch.zeros(16, dtype=F64)
        a[0] = 1
        b = torch.zeros(16, dtype=F64)
        b[0], b[1] = math.cos(omega), math.sin(omega)
        want = torch.zeros(16, dtype=F64)
        want[0], want[1] = math.cos(t * omega), math.sin(t * omega)
        got = slerp(a, b, t)  # axis-aligned: exact inputs
        assert (got - want).abs().max() <= 1e-12, f"omega={omega}: {got[:2]} vs {want[:2]}"
        got = slerp(q @ a, q @ b, t)  # a random plane: the inputs carry 1e-16 errors, amplified near pi by 1/sin
        tol = 1e-12 if omega < 1 else 4e-16 / math.sin(omega)
        assert (got - q @ want).abs().max() <= tol, f"omega={omega} rotated"
        if 1e-6 < omega < 1e-4:  # the plain formula agrees where arccos still resolves the angle
            assert (got - _plain_slerp(q @ a, q @ b, t)).abs().max() <= 1e-9
    # exactly parallel and exactly opposite: finite, unit
    assert torch.equal(slerp(e0[:3], e0[:3].clone(), t), e0[:3])
    opp = slerp(e0[:3], -e0[:3], t)
    assert torch.isfinite(opp).all() and torch.allclose(opp, e0[:3] if t <= 0.5 else -e0[:3], atol=1e-15)


def test_merge_keeps_norms_and_distance_is_the_angle_over_pi():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(3, 5, 2, 8, generator=g, dtype=F64) * 3, torch.randn(3, 5, 2, 8, generator=g, dtype=F64)
    x0[0, 0, 0] = 0  # a zero vector restores to zero
    direction, n0, n1, d = merge_pair(x0, x1, 0.6)
    assert torch.equal(n0, x0.norm(dim=-1)) and torch.equal(n1, x1.norm(dim=-1)), "norms stored exactly"
    for x, n in ((x0, n0), (x1, n1)):
        assert ((direction * n[..., None]).norm(dim=-1) - x.norm(dim=-1)).abs().max() <= 1e-13, "restored norms"
    assert torch.equal(direction[0, 0, 0] * n0[0, 0, 0], torch.zeros(8, dtype=F64))
    cos = (_unit(x0[1:]) * _unit(x1[1:])).sum(-1)
    assert (d[1:] - torch.arccos(cos) / math.pi).abs().max() <= 1e-12
    assert torch.allclose(direction[1:], _plain_slerp(_unit(x0[1:]), _unit(x1[1:]), 0.6), atol=1e-12)


def test_identical_layers_restore_exactly_and_retain_nothing():
    g = torch.Generator().manual_seed(2)
    b, h, d, n = 2, 3, 8, 14
    k, v = torch.randn(b, n, h, d, generator=g, dtype=F64), torch.randn(b, n, h, d, generator=g, dtype=F64)
    lower, upper = _pair(MiniCache(0, t=0.6), b, h, d)
    s = 0
    for t in (7, 1, 6):
        lv = lower.update_view(k[:, s : s + t], v[:, s : s + t])
        uv = upper.update_view(k[:, s : s + t], v[:, s : s + t])
        assert torch.equal(lv.keys, uv.keys) and torch.equal(lv.keys[:, s:], k[:, s : s + t]), "new tokens full"
        s += t
        assert lower.num_stored == upper.num_stored == s and lower.retained_positions("k") == [[], []]
        for got in (lower.restored(), _upper_restored(lower, upper)):
            for x, ref in zip(got, (k[:, :s], v[:, :s]), strict=True):
                eps = torch.finfo(F64).eps
                assert ((x - ref).abs() <= 2 * eps * ref.abs()).all(), "exact up to x / |x| * |x| rounding"
                assert torch.equal(x.norm(dim=-1) > 0, ref.norm(dim=-1) > 0)
    assert torch.equal(lower.norms("k"), k.norm(dim=-1)) and torch.equal(upper.norms("v"), v.norm(dim=-1))
    assert (lower.directions("k") - _unit(k)).abs().max() == 0, "the shared direction is the common one"


def test_retention_follows_the_running_threshold_and_restores_retained_tokens_exactly():
    g = torch.Generator().manual_seed(3)
    b, h, d, n = 2, 2, 8, 20
    k0, k1 = torch.randn(b, n, h, d, generator=g, dtype=F64), torch.randn(b, n, h, d, generator=g, dtype=F64)
    k1[:, ::2] = k0[:, ::2] + 0.05 * k1[:, ::2]  # half the tokens nearly parallel, half far apart
    v0, v1 = torch.randn(b, n, h, d, generator=g, dtype=F64), torch.randn(b, n, h, d, generator=g, dtype=F64)
    gamma = 0.3
    lower, upper = _pair(MiniCache(0, t=0.5, gamma=gamma), b, h, d)
    s, want = 0, set()
    dist = merge_pair(k0, k1, 0.5)[3].float()  # [B, n, H]
    for t in (8, 1, 1, 10):
        lower.update_view(k0[:, s : s + t], v0[:, s : s + t])
        upper.update_view(k1[:, s : s + t], v1[:, s : s + t])
        for bi in range(b):
            for hi_ in range(h):
                seen = dist[bi, : s + t, hi_]
                lo_, hi2 = float(seen.min()), float(seen.max())
                thr = torch.tensor(lo_, dtype=torch.float32) + (torch.tensor(hi2) - lo_) * gamma
                want |= {(bi, p, hi_) for p in range(s, s + t) if dist[bi, p, hi_] > thr}
        s += t
        got = {(bi, p, hh) for bi, row in enumerate(lower.retained_positions("k")) for p, hh in row}
        assert got == want, f"after {s} tokens"
    assert 0 < len(want) < b * n * h
    kl, _ = lower.restored()
    ku, _ = _upper_restored(lower, upper)
    for bi, p, hh in want:
        assert torch.equal(kl[bi, p, hh], k0[bi, p, hh]) and torch.equal(ku[bi, p, hh], k1[bi, p, hh])
    merged = torch.ones(b, n, h, dtype=torch.bool)
    for bi, p, hh in want:
        merged[bi, p, hh] = False
    direction, n0, n1, _ = merge_pair(k0, k1, 0.5)
    assert torch.allclose(kl[merged], (direction * n0[..., None])[merged], rtol=0, atol=1e-14)
    assert torch.allclose(ku[merged], (direction * n1[..., None])[merged], rtol=0, atol=1e-14)
    # bytes: per K / V, the lower holds S H D e + S H n + R 8 + 8 H, the upper S H n + R D e (R: widest row)
    lower_b = upper_b = 0
    for kind in "kv":
        r = max(len(row) for row in lower.retained_positions(kind))
        lower_b += b * (n * h * d * 8 + n * h * 8 + r * 8 + h * 2 * 4)
        upper_b += b * (n * h * 8 + r * d * 8)
    assert (lower.nbytes, upper.nbytes) == (lower_b, upper_b)
    assert lower.nbytes + upper.nbytes == state_size([lower, upper]).nbytes


# ----------------------------------------------------------------------------------------------------------------------
# on models


@pytest.mark.parametrize("variant", ["transformer", "swa", "mag", "mal"])
def test_every_token_retained_gives_the_full_cache_logits(variant):
    model = make_model(variant, n_layers=3)
    ids = ids_of(2, sum(PIECES))
    ref, _ = stream(model, ids, PIECES)
    policy = RetainAll(1)  # pair (1, 2); layer 0 keeps its default cache
    with policy(model):
        out, cache = stream(model, ids, PIECES)
    assert torch.equal(out, ref)
    kinds = [type(kv) for kv in attn_caches(cache)]
    assert kinds[1:] == [MiniCacheLower, MiniCacheUpper] and not issubclass(kinds[0], (MiniCacheLower, MiniCacheUpper))
    assert not policy._mailbox and not attn_caches(cache)[1]._pend["k"].shape[1], "nothing left pending"
    # every token retained: the full pair's bytes plus S H (2 n + 8) + 8 H per row and K / V (n = 8: float64 norms)
    lower, upper = attn_caches(cache)[1:]
    s, h, d = lower.num_stored, 4, 8
    assert lower.nbytes + upper.nbytes == 2 * 2 * (2 * s * h * d * 8 + s * h * (2 * 8 + 8) + 8 * h)


def test_bytes_drop_by_the_formula_when_nothing_is_retained():
    model = make_model("transformer")  # 2 layers, 4 kv heads of 8, float64
    ids = ids_of(2, sum(PIECES))
    _, full = stream(model, ids, PIECES)
    with MiniCache(gamma=1.0)(model):  # gamma = 1: the threshold is d_max, nothing exceeds it
        out, cache = stream(model, ids, PIECES)
    assert torch.isfinite(out).all()
    lower, upper = attn_caches(cache)
    b, s, h, d, e = 2, sum(PIECES), 4, 8, 8
    assert lower.retained_positions("k") == [[], []] and lower.retained_positions("v") == [[], []]
    assert lower.nbytes == 2 * (b * s * h * d * e + b * s * h * 8 + b * h * 2 * 4)  # directions, norms, d_min / d_max
    assert upper.nbytes == 2 * b * s * h * 8  # its norms
    full_pair = sum(kv.nbytes for kv in attn_caches(full))
    assert full_pair == 2 * 2 * b * s * h * d * e
    saved = full_pair - lower.nbytes - upper.nbytes
    assert saved == 2 * (b * s * h * (d - 2) * e - b * h * 8) > 0  # per K / V: the upper's vectors less two norms
    assert lower.nbytes + upper.nbytes == state_size(cache).nbytes  # what the harness weighs
    for kv in (lower, upper):
        assert kv.nbytes == sum(t.numel() * t.element_size() for t in kv.state_dict().values() if t.ndim)


class _RefPolicy(KVPolicy):
    """A reference MiniCache for the pair (1, 2) of a 3-layer model, in plain formulas: each call's tokens are stored
    in their restored form (arccos angle, eq. 2 SLERP, retention against the running float32 d_min / d_max)."""

    def __init__(self, t, gamma):
        self.t, self.gamma, self.shared = t, gamma, {}

    def make_cache(self, batch_size, n_heads, head_dim, *, window, layer_idx, n_layers, rope, device, dtype):
        if layer_idx == 0:
            return FullKVCache(batch_size, n_heads, head_dim, device=device, dtype=dtype)
        return _RefCache(self, layer_idx)


class _RefCache(KVCache):
    window = None

    def __init__(self, policy, layer):
        self.p, self.layer, self.k, self.v, self.n = policy, layer, None, None, 0

    seen_tokens = property(lambda self: self.n)
    num_stored = property(lambda self: self.n)

    def update(self, k_new, v_new):
        t = k_new.shape[1]
        keys = k_new if self.k is None else torch.cat((self.k, k_new), 1)
        values = v_new if self.v is None else torch.cat((self.v, v_new), 1)
        sh = self.p.shared
        if self.layer == 1:
            sh["new"] = (k_new, v_new)
        else:
            low = sh["low"]
            pieces = []
            for x0, x1, kind in ((sh["new"][0], k_new, "k"), (sh["new"][1], v_new, "v")):
                n0, n1 = x0.norm(dim=-1, keepdim=True), x1.norm(dim=-1, keepdim=True)
                e0, e1 = x0 / n0, x1 / n1
                omega = torch.arccos((e0 * e1).sum(-1, keepdim=True).clamp(-1, 1))
                e = (torch.sin((1 - self.p.t) * omega) * e0 + torch.sin(self.p.t * omega) * e1) / torch.sin(omega)
                dist = (omega[..., 0] / math.pi).float()  # [B, T, H]
                lo, hi = sh.get(kind, (dist.amin(1), dist.amax(1)))
                lo, hi = torch.minimum(lo, dist.amin(1)), torch.maximum(hi, dist.amax(1))
                sh[kind] = (lo, hi)
                keep = (dist > (lo + (hi - lo) * self.p.gamma)[:, None])[..., None]
                pieces.append((torch.where(keep, x0, e * n0), torch.where(keep, x1, e * n1)))
            (k0, k1), (v0, v1) = pieces
            low.k = torch.cat((low.k[:, : low.n - t], k0), 1)  # the lower layer's call stored its tokens in full
            low.v = torch.cat((low.v[:, : low.n - t], v0), 1)
            k_new, v_new = k1, v1
        self.k = k_new if self.k is None else torch.cat((self.k, k_new), 1)
        self.v = v_new if self.v is None else torch.cat((self.v, v_new), 1)
        if self.layer == 1:
            sh["low"] = self
        self.n += t
        return keys, values

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("variant", ["transformer", "swa"])
def test_streamed_prefill_and_decoding_equal_a_reference_that_merges_the_same_way(variant):
    model = make_model(variant, n_layers=3)
    ids = ids_of(2, sum(PIECES), seed=5)
    full, _ = stream(model, ids, PIECES)
    for gamma in (0.05, 0.6):
        apply_kv_policy(model, _RefPolicy(0.6, gamma))
        ref, _ = stream(model, ids, PIECES)
        with MiniCache(1, gamma=gamma)(model):
            out, cache = stream(model, ids, PIECES)
        apply_kv_policy(model, None)
        err = (out - ref).abs().max().item()
        assert err <= 1e-10, f"gamma={gamma}: max |logits - reference| = {err:.2e}"
        assert (out - full).abs().max() > 1e-3, "merging changed nothing"
        lower = attn_caches(cache)[1]
        n_ret = sum(len(r) for r in lower.retained_positions("k"))
        assert 0 < n_ret < 2 * lower.num_stored * 4, f"gamma={gamma}: {n_ret} retained"
        if variant == "swa":
            assert lower.num_stored == attn_caches(cache)[2].num_stored == model.config.window - 1


def test_caches_serialise_select_and_reorder_mid_stream():
    model = make_model("transformer", n_layers=3)
    ids = ids_of(2, 24)
    with MiniCache(1, gamma=0.2)(model):
        ref, _ = stream(model, ids, [14, 1, 9])
        _, cache = stream(model, ids[:, :15], [14, 1])
        restored = model.init_cache(2)
        restored.load_state_dict({k: v.clone() for k, v in cache.state_dict().items()})
        out, _ = model(ids[:, 15:], restored)
        assert (out - ref[:, 15:]).abs().max() <= 1e-12, "restored cache diverges"
        swapped = cache.reorder(torch.tensor([1, 0]))
        out, _ = model(ids.flip(0)[:, 15:], swapped)
        assert (out - ref.flip(0)[:, 15:]).abs().max() <= 1e-12, "reordered cache diverges"
        one = cache.select(torch.tensor([1]))
        out, _ = model(ids[1:, 15:], one)
        assert (out - ref[1:, 15:]).abs().max() <= 1e-12, "selected row diverges"
        out, _ = model(ids[:, 15:], cache)  # the original is untouched by its copies
        assert (out - ref[:, 15:]).abs().max() <= 1e-12


def test_batch_rows_do_not_cross_talk():
    model = make_model("transformer", n_layers=3)
    ids = torch.cat([ids_of(1, 20, seed=3), ids_of(1, 20, seed=4)])
    with MiniCache(1, gamma=0.3)(model):
        both, cache = stream(model, ids, [9, 1, 1, 9])
        alone = [stream(model, ids[i : i + 1], [9, 1, 1, 9]) for i in range(2)]
    assert (both - torch.cat([o for o, _ in alone])).abs().max() <= 1e-12
    for kind in "kv":
        rows = attn_caches(cache)[1].retained_positions(kind)
        assert rows == [attn_caches(c)[1].retained_positions(kind)[0] for _, c in alone]
        assert len(rows[0]) != len(rows[1]), "rows of different widths: the padding is exercised"


def test_upper_without_its_lower_and_bad_arguments_raise():
    for kw, name in [(dict(t=1.5), "t"), (dict(t=-0.1), "t"), (dict(gamma=1.01), "gamma"), (dict(gamma=-0.5), "gamma"),
                     (dict(start=-1), "start"), (dict(start=1.5), "start")]:
        with pytest.raises(ValueError, match=name):
            MiniCache(**kw)
    model = make_model("transformer")  # 2 attention layers: the only pair starts at 0
    with pytest.raises(ValueError, match=r"start \(1\) is beyond the model"):
        apply_kv_policy(model, MiniCache(1))
    with pytest.raises(ValueError, match="start"):
        with MiniCache(start=2)(model):
            pass
    with pytest.raises(ValueError, match="t must lie"):
        parse_policy_spec("minicache:t=2")
    (spec,) = parse_policy_spec("minicache:start=0,t=0.5,gamma=0.05")
    assert isinstance(spec.policy, MiniCache) and spec.text == "minicache:start=0,t=0.5,gamma=0.05"
    assert spec.policy.start == 0 and spec.policy.t == 0.5 and spec.policy.gamma == 0.05
    assert MiniCache().first_layer(32) == 16 and MiniCache().first_layer(2) == 0
    _, upper = _pair(MiniCache(0), 1, 2, 4)
    with pytest.raises(RuntimeError, match="without its pair's lower"):
        upper.update_view(torch.zeros(1, 1, 2, 4, dtype=F64), torch.zeros(1, 1, 2, 4, dtype=F64))


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face


def test_hugging_face_llama():
    pytest.importorskip("transformers")
    from mnemos.kv.hf import PolicyCache, cache_kwarg

    model = tiny_llama(64, layers=3)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        full = model(ids).logits
        cache = PolicyCache(model, RetainAll(1))
        assert torch.equal(model.generate(ids, **kw, **{cache_kwarg(model): cache}), ref)
        assert [type(layer.cache).__name__ for layer in cache.layers] == ["FullKVCache", "MiniCacheLower",
                                                                         "MiniCacheUpper"]
        beams = model.generate(ids, **kw, num_beams=2)
        with RetainAll(1)(model):
            assert torch.equal(model.generate(ids, **kw), ref)
            assert torch.equal(model.generate(ids, **kw, num_beams=2), beams)
        chunked = PolicyCache(model, RetainAll(1))
        a = model(ids[:, :9], **{cache_kwarg(model): chunked}).logits
        b = model(ids[:, 9:], **{cache_kwarg(model): chunked}).logits
        assert (torch.cat([a, b], 1) - full).abs().max() <= 1e-5
        # merging for real: GQA (the pair holds [B, S, Hkv = 2, D = 8]), fewer bytes than the two full layers
        merged = PolicyCache(model, MiniCache(1, gamma=1.0))
        out = model.generate(ids, **kw, **{cache_kwarg(model): merged})
        assert out.shape == ref.shape
        lower, upper = merged.layers[1].cache, merged.layers[2].cache
        s = lower.num_stored
        assert lower.directions("k").shape == (2, s, 2, 8) and upper.norms("k").shape == (2, s, 2)
        full_pair = 2 * 2 * 2 * s * 2 * 8 * 4  # two layers, K and V, float32
        assert lower.nbytes + upper.nbytes == full_pair - 2 * (2 * s * 2 * (8 - 2) * 4 - 2 * 2 * 8)
        with MiniCache(1)(model):
            beams = model.generate(ids, **kw, num_beams=2)
        assert beams.shape == ref.shape
        with pytest.raises(ValueError, match="start"):
            PolicyCache(model, MiniCache(2))
