"""mnemos KV policies on a random-init Hugging Face ``LlamaForCausalLM`` (tiny config, GQA 4 query / 2 key-value
heads; nothing downloaded).

- budget >= context => greedy generation identical to transformers' own cache, for every policy, both as a
  ``PolicyCache`` passed to ``generate`` and through ``with policy(model):``; a prefill in two chunks gives the full
  forward's logits;
- the cache holds key/value heads only (never expanded to query heads) and small budgets bound it;
- H2O on the HF model keeps the same entries as on a mnemos cache fed the same queries / keys (the query hook
  recomputes the layer's rotated queries exactly);
- beam search reorders the compressed cache; bad input raises ValueError.
"""

from __future__ import annotations

import pytest
import torch

from mnemos.kv import H2O, KIVI, L2Norm, PyramidKV, SnapKV, StreamingLLM, ThinK, compose

transformers = pytest.importorskip("transformers")  # the optional [hf] extra; installed in CI with [test]
from mnemos.kv.hf import PolicyCache, cache_kwarg  # noqa: E402
from kv_helpers import tiny_llama  # noqa: E402

CTX, NEW = 20, 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(64)


def _ids(b=2, t=CTX, seed=1):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache=None, **kw):
    kw = {"max_new_tokens": NEW, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0, **kw}
    if cache is not None:
        kw[cache_kwarg(model)] = cache
    return model.generate(ids, **kw)


LOSSLESS = [StreamingLLM(64, sinks=2), H2O(64), SnapKV(64, window_size=4), PyramidKV(64, window_size=4),
            L2Norm(1.0), KIVI(2, group_size=4, residual=64), ThinK(0.0, window_size=4, recent=4),
            compose(SnapKV(64, window_size=4), ThinK(0.0, window_size=4, recent=4))]


@torch.no_grad()
def test_budget_covering_the_context_gives_identical_generation(model):
    ids = _ids()
    ref = _generate(model, ids)
    full_logits = model(ids).logits
    for policy in LOSSLESS:
        cache = PolicyCache(model, policy)
        assert torch.equal(_generate(model, ids, cache), ref), f"{policy!r}: generation differs"
        assert cache.layers[0].cache.seen_tokens == CTX + NEW - 1
        with policy(model):
            assert torch.equal(_generate(model, ids), ref), f"{policy!r}: generation differs under `with`"
        assert "generate" not in model.__dict__, "the context manager restores generate"
        chunked = PolicyCache(model, policy)
        a = model(ids[:, :12], **{cache_kwarg(model): chunked}).logits
        b = model(ids[:, 12:], **{cache_kwarg(model): chunked}).logits
        err = (torch.cat([a, b], 1) - full_logits).abs().max().item()
        assert err <= 1e-5, f"{policy!r}: chunked prefill logits differ by {err:.2e}"


@pytest.mark.parametrize("arch, window", [("qwen2", None), ("qwen2", 8), ("mistral", None), ("mistral", 8)])
@torch.no_grad()
def test_qwen2_and_mistral_take_the_same_hook(arch, window):
    """Qwen2 (biased q/k/v projections) and Mistral share Llama's attention module and RoPE: a covering budget gives
    their own cache's greedy tokens for every policy (the query hook recomputes their rotated queries), a small one
    bounds the cache. With a sliding window shorter than the context (Mistral's on every layer; Qwen2's on the layers
    its layer_types name) the policy's visibility applies it as transformers' own cache does."""
    extra = {} if window is None else ({"sliding_window": window} if arch == "mistral" else
                                       {"sliding_window": window, "use_sliding_window": True, "max_window_layers": 1})
    if window is None and arch == "mistral":
        extra = {"sliding_window": None}
    model = tiny_llama(64, arch=arch, **extra)
    from mnemos.kv.hf import layer_window
    windows = [layer_window(model.config, i) for i in range(2)]
    assert windows == ([None, None] if window is None else [window, window] if arch == "mistral" else [None, window])
    assert type(model).__name__.lower().startswith(arch)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = _ids()
    ref = _generate(model, ids)
    for policy in LOSSLESS:
        assert torch.equal(_generate(model, ids, PolicyCache(model, policy)), ref), f"{arch} {policy!r}"
        with policy(model):
            assert torch.equal(_generate(model, ids), ref), f"{arch} {policy!r} under `with`"
    for policy in (H2O(8), SnapKV(8, window_size=4, compress_decoding=True)):
        cache = PolicyCache(model, policy)
        out = _generate(model, ids, cache)
        assert out.shape == (2, CTX + NEW)
        # a sliding layer keeps no more than its window's live entries
        for layer, w in zip(cache.layers, windows, strict=True):
            b, s, h, d = layer.cache.keys.shape
            assert (b, h, d) == (2, 2, 8) and (s == 8 if w is None else s <= 8), f"{arch} {policy!r}: {s} entries"


@torch.no_grad()
def test_small_budgets_bound_the_cache_and_keep_kv_heads_only(model):
    ids = _ids()
    for policy in [StreamingLLM(8, sinks=2), H2O(8), L2Norm(8), SnapKV(8, window_size=4, compress_decoding=True)]:
        cache = PolicyCache(model, policy)
        _generate(model, ids, cache)
        for layer in cache.layers:
            assert layer.cache.keys.shape == (2, 8, 2, 8), f"{policy!r}: [B, S, Hkv, D] = {layer.cache.keys.shape}"
        assert cache.nbytes == sum(layer.cache.nbytes for layer in cache.layers) > 0


@torch.no_grad()
def test_h2o_on_llama_scores_the_layers_own_queries(model):
    """Record layer 0's rotated queries / keys through transformers' own cache, replay them into a mnemos H2O cache
    and compare kept positions and scores with the HF run (the hook must recompute the queries exactly)."""
    ids = _ids(b=1)
    attn = model.model.layers[0].self_attn
    seen = {}

    def grab(module, args, kwargs, out):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        q = module.q_proj(h).view(*h.shape[:-1], -1, 8).transpose(1, 2)
        k = module.k_proj(h).view(*h.shape[:-1], -1, 8).transpose(1, 2)
        q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        seen.setdefault("q", []).append(q.transpose(1, 2))
        seen.setdefault("k", []).append(k.transpose(1, 2))

    handle = attn.register_forward_hook(grab, with_kwargs=True)
    try:
        cache = PolicyCache(model, H2O(10, recent=3))
        _generate(model, ids, cache)
    finally:
        handle.remove()
    replay = H2O(10, recent=3).make_cache(1, 2, 8)
    for q, k in zip(seen["q"], seen["k"], strict=True):
        replay.update_view(k, k, q=q)
    hf = cache.layers[0].cache
    assert torch.equal(hf.kept_positions(), replay.kept_positions())
    assert torch.allclose(hf.entry_state["score"], replay.entry_state["score"], atol=1e-5)


@torch.no_grad()
def test_beam_search_reorders_the_compressed_cache(model):
    ids = _ids(b=1)
    ref = _generate(model, ids, num_beams=3)
    out = _generate(model, ids, PolicyCache(model, H2O(64)), num_beams=3)
    assert torch.equal(out, ref), "beam search with a lossless policy must match transformers' cache"
    small = _generate(model, ids, PolicyCache(model, H2O(8)), num_beams=3)
    assert small.shape == ref.shape


def test_bad_input_raises_value_error(model):
    with pytest.raises(ValueError, match="group_size"):
        PolicyCache(model, KIVI(2, group_size=16, residual=16))
    with pytest.raises(ValueError, match="policy must be"):
        PolicyCache(model, "h2o")
    with pytest.raises(ValueError, match=r"sliding-window attention \(sliding_window=8\).*use rerotate=False"):
        PolicyCache(tiny_llama(64, arch="mistral", sliding_window=8), StreamingLLM(8, sinks=2, rerotate=True))
