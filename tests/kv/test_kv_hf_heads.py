"""Per-head and retrieval policies on a random-init Hugging Face ``LlamaForCausalLM`` (float64, GQA 4 query / 2
key-value heads; nothing downloaded): DuoAttention, SentenceKV and InfLLM through ``mnemos.kv.hf``.

- Covering budgets (every head a retrieval head, or a recent window covering the context; top-k covering every block /
  sentence) give transformers' own cache's logits in one prefill, a chunked prefill and decoding, and its greedy
  tokens (``PolicyCache`` and ``with policy(model)``).
- Non-covering budgets: the logits equal a plain float64 re-implementation of the Llama forward (its own RMSNorm,
  RoPE, MLP) whose attention reads, per row, key/value head and query, exactly the positions the cache's view
  reported, with keys and values it computes itself.
- Beam search reorders these caches without cross-talk between rows; the bytes reported equal the stored tensors.
- The HF scoring pass (DuoAttention's heads) reads the layers' own attention (checked against eager attention maps).
- The model's attention implementation is its own outside PolicyCache calls and after a ``with`` block.
"""

from __future__ import annotations

import pytest
import torch

from mnemos.kv import H2O, DuoAttention, InfLLM, PyramidKV, SentenceKV
from mnemos.kv.calibrate import induction_scores
from mnemos.kv.perhead import choose_retrieval_heads

transformers = pytest.importorskip("transformers")  # the optional [hf] extra; installed in CI with [test]
from mnemos.kv.hf import ATTN_IMPLEMENTATION, PolicyCache, attention_maps, cache_kwarg  # noqa: E402
from kv_helpers import tiny_llama  # noqa: E402

F64 = torch.float64
V, CTX, PIECES, STEPS = 64, 20, [9, 6, 5], 4


@pytest.fixture(scope="module")
def model():
    return tiny_llama(V, dtype=F64)


def _ids(b=2, t=CTX, seed=1):
    """Random tokens with a sentence boundary (5 or 9) every few tokens, different per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, V, (b, t), generator=g)
    for r in range(b):
        for p in range(3 + r, t, 4 + r):
            ids[r, p] = 5 if (p + r) % 2 else 9
    return ids


def _kw(model, cache):
    return {cache_kwarg(model): cache} if cache is not None else {}


def _stream(model, ids, pieces, cache, steps=STEPS):
    """Logits of a prefill in ``pieces`` and ``steps`` greedy decoding steps, with ``cache`` carried."""
    outs, s = [], 0
    for n in pieces:
        outs.append(model(ids[:, s : s + n], use_cache=True, **_kw(model, cache)).logits)
        s += n
    for _ in range(steps):
        nxt = outs[-1][:, -1:].argmax(-1)
        outs.append(model(nxt, use_cache=True, **_kw(model, cache)).logits)
    return torch.cat(outs, dim=1)


def _generate(model, ids, cache=None, **kw):
    kw = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0, **kw}
    return model.generate(ids, **kw, **_kw(model, cache))


# covering budgets: every head retrieves / streams over a window covering everything, top-k covers every unit
COVERING = {
    "duo-all-retrieval": lambda: DuoAttention(retrieval_heads=((0, 1), (0, 1)), sinks=2, recent=3),
    "duo-streaming-covering": lambda: DuoAttention(retrieval_heads=((), (1,)), sinks=2, recent=64),
    "infllm": lambda: InfLLM(3, n_init=2, n_local=4, topk=100, repr_topk=2),
    "infllm-per-head": lambda: InfLLM(3, n_init=2, n_local=4, topk=100, repr_topk=2, per_head=True),
    "sentencekv": lambda: SentenceKV(sinks=2, recent=4, topk=None, max_tokens=None, boundary_ids=(5, 9), max_len=6,
                                     threshold=0),
}

# non-covering: streaming heads with a short window, top-1 blocks / sentences
LOSSY = {
    "duo": lambda: DuoAttention(retrieval_heads=((0,), (1,)), sinks=2, recent=3),
    "infllm": lambda: InfLLM(3, n_init=2, n_local=4, topk=1, repr_topk=2),
    "infllm-per-head": lambda: InfLLM(3, n_init=2, n_local=3, topk=1, repr_topk=2, per_head=True),
    "sentencekv": lambda: SentenceKV(sinks=2, recent=4, topk=1, max_tokens=4, boundary_ids=(5, 9), max_len=6,
                                     threshold=0),
}
# eviction with per-layer budgets (layers of different lengths) and per-head choices, through the same mask
EVICTING = {
    "pyramidkv": lambda: PyramidKV(8, window_size=2, kernel_size=3),
    "h2o": lambda: H2O(6, recent=2),
}


@torch.no_grad()
def test_covering_budgets_give_transformers_logits_and_tokens(model):
    ids = _ids()
    full = model(ids).logits
    ref = _stream(model, ids, [CTX], transformers.DynamicCache(config=model.config))
    ref_chunked = _stream(model, ids, PIECES, transformers.DynamicCache(config=model.config))
    assert (ref_chunked - ref).abs().max() <= 1e-10 and (ref[:, :CTX] - full).abs().max() <= 1e-10
    greedy = _generate(model, ids)
    for name, make in COVERING.items():
        for pieces in ([CTX], PIECES):
            cache = PolicyCache(model, make())
            out = _stream(model, ids, pieces, cache)
            err = (out - ref).abs().max().item()
            assert err <= 1e-10, f"{name} {pieces}: logits differ from transformers' cache by {err:.2e}"
        kv = cache.layers[0].cache
        if name.startswith("infllm") or name == "sentencekv":
            assert len(kv.store) > 0, f"{name}: the store is used"
        if name == "duo-streaming-covering":
            assert kv.ks.shape[1] == CTX + STEPS and cache.layers[1].cache.kr.shape[1] == CTX + STEPS
        assert torch.equal(_generate(model, ids, PolicyCache(model, make())), greedy), f"{name}: greedy tokens"
        with make()(model):
            assert torch.equal(_generate(model, ids), greedy), f"{name}: greedy tokens under `with`"
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION


def _rms(x, weight, eps):
    """LlamaRMSNorm, written out (float32 statistics, as transformers computes them)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, pos, inv_freq):
    """``x`` ``[B, T, H, D]`` rotated at ``pos`` ``[T]`` (cos / sin computed in float32, as transformers does)."""
    f = pos[:, None].float() * inv_freq.float()[None, :]
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[None, :, None, :], emb.sin().to(x.dtype)[None, :, None, :]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class _Oracle:
    """A float64 Llama forward with its own K/V of every position, whose attention reads given position sets."""

    def __init__(self, model):
        self.m, self.cfg = model, model.config
        self.k = [None] * self.cfg.num_hidden_layers
        self.v = [None] * self.cfg.num_hidden_layers
        self.seen = 0

    def __call__(self, ids, masks):
        """``masks[layer]``: ``[B, Hkv, T, seen]`` bool, which positions each row / head / query reads."""
        m, cfg = self.m.model, self.cfg
        b, t = ids.shape
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        d = cfg.hidden_size // hq
        g = hq // hkv
        pos = torch.arange(self.seen, self.seen + t)
        inv_freq = 1.0 / (m.rotary_emb.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).double() / d))
        h = m.embed_tokens.weight[ids]
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            x = _rms(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q = (x @ at.q_proj.weight.T).view(b, t, hq, d)
            k = (x @ at.k_proj.weight.T).view(b, t, hkv, d)
            v = (x @ at.v_proj.weight.T).view(b, t, hkv, d)
            q, keys, values, mask = self.entries(i, q, k, v, pos, inv_freq, masks[i])
            s = torch.einsum("bthgd,bshd->bhgts", q.view(b, t, hkv, g, d), keys) / d**0.5
            s = s.masked_fill(~mask[:, :, None], float("-inf"))
            o = torch.einsum("bhgts,bshd->bthgd", torch.softmax(s, dim=-1), values).reshape(b, t, hq * d)
            h = h + o @ at.o_proj.weight.T
            x = _rms(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            mlp = layer.mlp
            h = h + (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ \
                mlp.down_proj.weight.T
        self.seen += t
        return _rms(h, m.norm.weight, m.norm.variance_epsilon) @ self.m.lm_head.weight.T

    def entries(self, i, q, k, v, pos, inv_freq, mask):
        """Layer ``i``'s rotated queries ``[B, T, Hq, D]``, the keys / values ``[B, S, Hkv, D]`` they read and the mask
        ``[B, Hkv, T, S]``, from the call's raw ``q`` / ``k`` / ``v`` at positions ``pos`` (here: every position so
        far, rotated at its absolute position; ``mask`` as given)."""
        q, k = _rope(q, pos, inv_freq), _rope(k, pos, inv_freq)
        self.k[i] = k if self.k[i] is None else torch.cat((self.k[i], k), dim=1)
        self.v[i] = v if self.v[i] is None else torch.cat((self.v[i], v), dim=1)
        return q, self.k[i], self.v[i], mask


def _record_views(cache, log):
    """Wrap each layer's mnemos cache (made at its first update) to log every view's positions ``[B, S, Hkv]``."""
    for i, layer in enumerate(cache.layers):
        def lazy(k, v, _layer=layer, _lazy=layer.lazy_initialization, _i=i):
            _lazy(k, v)
            c = _layer.cache
            update_view = c.update_view

            def logged(k_new, v_new, q=None):
                view = update_view(k_new, v_new, q=q)
                b, s, h = view.keys.shape[:3]
                seen = c.seen_tokens
                pos = view.positions if view.positions is not None else \
                    torch.arange(seen - s, seen)[None, :, None].expand(b, s, h)
                log[_i].append(pos.clone())
                return view

            c.update_view = logged
        layer.lazy_initialization = lazy


def _masks(views, seen, t):
    """The views' positions ``[B, S, Hkv]`` -> which of ``seen`` positions each row / head / query reads."""
    out = []
    for pos in views:
        b, s, h = pos.shape
        q_pos = torch.arange(seen - t, seen)
        vis = pos.permute(0, 2, 1)[:, :, None, :] <= q_pos[None, None, :, None]  # [B, H, T, S]
        real = pos.clamp(max=seen - 1).permute(0, 2, 1)[:, :, None, :].expand(b, h, t, s)
        mask = torch.zeros(b, h, t, seen, dtype=torch.int64).scatter_add_(3, real, vis.long())
        assert int(mask.max()) <= 1, "a view holds one position twice"
        out.append(mask.bool())
    return out


@torch.no_grad()
def test_non_covering_budgets_equal_a_plain_llama_over_the_reported_entries(model):
    ids = _ids()
    ref = _stream(model, ids, PIECES, transformers.DynamicCache(config=model.config))
    for name, make in {**LOSSY, **EVICTING}.items():
        log = {i: [] for i in range(model.config.num_hidden_layers)}
        cache = PolicyCache(model, make())
        _record_views(cache, log)
        oracle = _Oracle(model)
        outs, s, partial, uneven, per_head = [], 0, False, False, False
        pieces = PIECES + [1] * STEPS
        for n in pieces:
            step = ids[:, s : s + n] if s < CTX else outs[-1][:, -1:].argmax(-1)
            out = model(step, use_cache=True, **_kw(model, cache)).logits
            masks = _masks([log[i][-1] for i in log], oracle.seen + n, n)
            want = oracle(step, masks)
            err = (out - want).abs().max().item()
            assert err <= 1e-9, f"{name}: call at {s}: logits differ from the oracle by {err:.2e}"
            full = torch.ones_like(masks[0][0, 0]).tril(oracle.seen - n)
            partial |= any(bool((mk != full).any()) for mk in masks)
            counts = torch.stack([mk.sum(-1) for mk in masks])  # [L, B, H, T]
            uneven |= bool((counts != counts[:, :, :1]).any()) if name != "pyramidkv" else \
                bool((counts != counts[:1]).any())
            per_head |= any(bool((mk != mk[:, :1]).any()) for mk in masks)
            outs.append(out)
            s += n
        assert partial, f"{name}: the budget never left anything out (the test would not see a masking error)"
        if name in ("duo", "infllm-per-head", "sentencekv", "pyramidkv"):  # (InfLLM's default: one set per row)
            assert per_head, f"{name}: the heads of a row never read different entries"
        if name in ("duo", "sentencekv", "pyramidkv"):  # pyramidkv: layers of different lengths
            assert uneven, f"{name}: heads never read different numbers of entries"
        assert (torch.cat(outs, 1) - ref).abs().max() > 1e-6, f"{name}: lossy logits equal the full cache's"


@torch.no_grad()
def test_sentencekv_reads_the_generated_token_ids(model):
    ids = _ids(b=2, t=14)
    policy = SentenceKV(sinks=2, recent=3, topk=1, max_tokens=4, boundary_ids=(5, 9), max_len=6, threshold=0)
    cache = PolicyCache(model, policy)
    out = _generate(model, ids, cache, max_new_tokens=8)
    kv = cache.layers[1].cache
    seq = out[:, : kv.seen_tokens]  # the last generated token was never fed back
    for r in range(2):  # brute-force segmentation of the row's tokens: a sentence's start for every position
        starts, o = [], 2
        for p, tok in enumerate(seq[r].tolist()):
            if p < 2:
                o = p + 1
                starts.append(-1)
                continue
            starts.append(o)
            if tok in (5, 9) or p - o + 1 >= 6:
                o = p + 1
        n_off = len(kv.store)
        want = sorted({st for st in starts[2 : 2 + n_off]})
        got = sorted(int(x) for x, c in zip(kv.sstart[r], kv.scount[r], strict=True) if c > 0)
        assert got == want, f"row {r}: offloaded sentences {got}, the ids give {want}"
        assert kv.rstart[r].tolist() == starts[2 + n_off :], f"row {r}: tail sentence starts"


@torch.no_grad()
def test_beam_search_reorders_without_cross_talk(model):
    ids = _ids(b=2, t=14)
    kw = {"num_beams": 3, "max_new_tokens": 5}
    ref = _generate(model, ids, **kw)
    for name, make in COVERING.items():
        assert torch.equal(_generate(model, ids, PolicyCache(model, make()), **kw), ref), f"{name}: beams (covering)"
    for name, make in LOSSY.items():
        both = _generate(model, ids, PolicyCache(model, make()), **kw)
        for r in range(2):
            alone = _generate(model, ids[r : r + 1], PolicyCache(model, make()), **kw)
            assert torch.equal(both[r : r + 1], alone), f"{name}: row {r} differs in a batch (cross-talk)"


def _tensor_bytes(state):
    return sum(t.numel() * t.element_size() for t in state.values() if t.ndim)


@torch.no_grad()
def test_bytes_reported_equal_the_stored_tensors(model):
    from mnemos.eval import state_size

    ids = _ids()
    for name, make in {**COVERING, **LOSSY}.items():
        cache = PolicyCache(model, make())
        _stream(model, ids, PIECES, cache)
        total = 0
        for layer in cache.layers:
            kv = layer.cache
            assert kv.nbytes == _tensor_bytes(kv.state_dict()) > 0, name
            tiers = kv.tier_nbytes()
            assert tiers["resident"] + tiers["offloaded"] == kv.nbytes, name
            if hasattr(kv, "store"):
                assert tiers["offloaded"] == kv.store.k.nbytes + kv.store.v.nbytes > 0, name
            if isinstance(make(), DuoAttention):  # keys and values only: [B, S, H_r, D] + [B, <= s + r, H_s, D]
                assert kv.nbytes == sum(t.nbytes for t in (kv.kr, kv.vr, kv.ks, kv.vs)), name
            total += kv.nbytes
            assert layer.visible is None and layer.pending_q is None and layer.pending_ids is None, name
        assert cache.nbytes == total == sum(cache.tier_nbytes().values()), name
        assert state_size(cache).nbytes == total, f"{name}: the cache holds tensors it does not report"
    lossy = PolicyCache(model, LOSSY["duo"]())
    _stream(model, ids, PIECES, lossy)
    full = PolicyCache(model, COVERING["duo-all-retrieval"]())
    _stream(model, ids, PIECES, full)
    assert lossy.nbytes < full.nbytes  # streaming heads hold sinks + recent: real bytes saved


@torch.no_grad()
def test_duoattention_scores_heads_on_the_hf_model(model):
    eager = transformers.LlamaForCausalLM(model.config.__class__(**model.config.to_dict())).to(F64).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(3))
    ours = attention_maps(model, ids)
    theirs = eager(ids, output_attentions=True).attentions  # [B, Hq, T, T] per layer
    for a, b in zip(ours, theirs, strict=True):
        assert (a.reshape(b.shape) - b.float()).abs().max() <= 1e-6
    policy = DuoAttention(0.5, sinks=2, recent=3, calibration_length=8, calibration_samples=2)
    cache = PolicyCache(model, policy)
    from mnemos.kv.calibrate import synthetic_ids

    scores = [induction_scores(p, 8) for p in attention_maps(model, synthetic_ids(model, 8, 2, 0))]
    heads = tuple(policy.heads_of(i, 2, 2) for i in range(2))
    assert heads == choose_retrieval_heads(scores, 0.5) and sum(map(len, heads)) == 2
    _generate(model, _ids(), cache)
    kv = cache.layers[0].cache
    assert kv.kr.shape[2] + kv.ks.shape[2] == 2 and kv.ks.shape[1] <= 5


@torch.no_grad()
def test_attention_implementation_is_the_models_own_outside_policy_calls(model):
    ids = _ids()
    before = model.config._attn_implementation
    ref = model(ids).logits
    cache = PolicyCache(model, LOSSY["duo"]())  # installs the hooks
    _stream(model, ids, PIECES, cache)
    assert model.config._attn_implementation == before
    assert torch.equal(model(ids).logits, ref), "a plain call after a PolicyCache call changed"
    with LOSSY["sentencekv"]()(model):
        _generate(model, ids)
        assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="pads"):
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        model(ids, attention_mask=mask, **_kw(model, PolicyCache(model, LOSSY["duo"]())))
    assert model.config._attn_implementation == before
