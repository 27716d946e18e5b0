"""StreamingLLM with ``rerotate=True`` on a random-init Hugging Face ``LlamaForCausalLM`` (float64, GQA 4 query / 2
key-value heads; nothing downloaded), through ``mnemos.kv.hf``.

- The oracle: a plain float64 Llama forward (``test_kv_hf_heads._Oracle``) whose attention follows StreamingLLM's rule
  with in-cache positions: after n tokens the cache holds ``[0, s) ∪ [n - (budget - s), n)``; a call's T tokens read
  the kept entries followed by themselves, the entry at index c of that list rotated at position c (sinks keep
  theirs, the recent window sits at s, s + 1, ...), the queries at the new tokens' indices. Logits within 1e-9 over a
  chunked prefill (a chunk longer than the budget) and decoding steps, for the default RoPE, llama3 (frequencies not
  derived from the base) and YaRN (an attention scaling on cos / sin).
- A budget covering the context: transformers' own cache's logits and greedy tokens (nothing evicted, nothing moved).
- ``generate`` (greedy, ``PolicyCache`` or ``with policy(model)``) gives the oracle-checked step-by-step tokens; beam
  search runs, and a row's beams equal those of the row alone (no cross-talk).
- Refused with a ValueError naming the reason: a RoPE whose frequencies change with the sequence length (dynamic),
  a call with position_ids other than the absolute ones.
"""

from __future__ import annotations

import pytest
import torch

from mnemos.kv import KIVI, StreamingLLM, compose

transformers = pytest.importorskip("transformers")  # the optional [hf] extra; installed in CI with [test]
from test_kv_hf_heads import _Oracle  # noqa: E402  (the float64 Llama forward written out)

from mnemos.kv.hf import ATTN_IMPLEMENTATION, PolicyCache, cache_kwarg  # noqa: E402
from kv_helpers import tiny_llama  # noqa: E402

F64 = torch.float64
V, CTX, PIECES, STEPS, BUDGET, SINKS = 64, 20, [9, 6, 5], 4, 8, 2

ROPES = {
    "default": None,
    # low / high frequency wavelengths 8 / 2: three of the four frequencies are rescaled (not base ** (-2i / D))
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    # attention_scaling != 1 on cos / sin: a re-rotation must not apply it again
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
}


def _model(rope=None, seed=0):
    kw = {} if rope is None else {"rope_parameters": rope}
    return tiny_llama(V, seed=seed, dtype=F64, initializer_range=0.2, **kw)


@pytest.fixture(scope="module")
def model():
    return _model()


def _ids(b=2, t=CTX, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _kw(model, cache):
    return {cache_kwarg(model): cache} if cache is not None else {}


def _generate(model, ids, cache=None, **kw):
    kw = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0, **kw}
    return model.generate(ids, **kw, **_kw(model, cache))


def _rotate(x, angle):
    """``x`` ``[B, S, H, D]`` rotated by ``angle`` ``[S, D/2]`` (float64; channel i with i + D/2)."""
    emb = torch.cat((angle, angle), dim=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    return x * emb.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * emb.sin()


class _InCacheOracle(_Oracle):
    """StreamingLLM(budget, sinks, rerotate=True) written out over the plain Llama forward (module docstring).

    transformers computes RoPE's angles in float32 (``position * inv_freq``), so a key rotated at position a and moved
    later by a float64 rotation by c - a is R(c) up to that rounding (~1e-6), which 1e-9 would see: a kept key is
    rotated here exactly so (transformers' float32 rotation at the in-cache position a where it arrived, then a float64
    rotation by c - a). With ``float32_angles=False`` every rotation is a float64 one at its in-cache position (the
    textbook R(c); equal up to the float32 angle rounding)."""

    def __init__(self, model, budget, sinks, float32_angles=True):
        super().__init__(model)
        self.budget, self.sinks, self.float32_angles = budget, sinks, float32_angles
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.float()  # the frequencies its forward uses
        self.scaling = rotary.attention_scaling
        self.kept: list[int] = []  # original positions in the cache, in order (every row, head and layer alike)
        self.arrival: dict[int, int] = {}  # original position -> the in-cache position it was first rotated at

    def __call__(self, ids):
        t = ids.shape[1]
        new = list(range(self.seen, self.seen + t))
        self.visible = self.kept + new  # what the call's queries read, in order: index = in-cache position
        self.arrival.update({p: len(self.kept) + j for j, p in enumerate(new)})
        out = super().__call__(ids, [None] * self.cfg.num_hidden_layers)
        n, w = self.seen, self.budget - self.sinks
        self.kept = [p for p in range(n) if p < self.sinks or p >= n - w]  # StreamingLLM's rule
        return out

    def _rope(self, x, positions):
        """RoPE at ``positions`` (a list), with the model's frequencies and attention scaling."""
        pos = torch.tensor(positions)
        if self.float32_angles:  # as LlamaRotaryEmbedding: float32 angles, cos / sin scaled in float32
            f = pos[:, None].float() * self.inv_freq[None, :]
            emb = torch.cat((f, f), dim=-1)
            cos, sin = (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)
            half = x.shape[-1] // 2
            return x * cos[None, :, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[None, :, None]
        return _rotate(x, pos[:, None].double() * self.inv_freq.double()[None, :]) * self.scaling

    def entries(self, i, q, k, v, pos, inv_freq, mask):
        self.k[i] = k if self.k[i] is None else torch.cat((self.k[i], k), dim=1)  # raw (pre-RoPE) keys, every position
        self.v[i] = v if self.v[i] is None else torch.cat((self.v[i], v), dim=1)
        vis = torch.tensor(self.visible)
        c = list(range(len(self.visible)))  # in-cache positions
        t = q.shape[1]
        q = self._rope(q, c[-t:])
        raw = self.k[i][:, vis]
        if self.float32_angles:
            arrived = [self.arrival[p] for p in self.visible]
            shift = torch.tensor(c, dtype=F64) - torch.tensor(arrived, dtype=F64)
            keys = _rotate(self._rope(raw, arrived), shift[:, None] * self.inv_freq.double()[None, :])
        else:
            keys = self._rope(raw, c)
        b, hkv = k.shape[0], k.shape[2]
        causal = vis[None, :] <= torch.tensor(self.visible[-t:])[:, None]  # [T, S] by original position
        return q, keys, self.v[i][:, vis], causal[None, None].expand(b, hkv, t, len(self.visible))


@torch.no_grad()
def _run(model, ids, cache, pieces=PIECES, steps=STEPS, oracles=()):
    """Logits of a prefill in ``pieces`` then ``steps`` greedy steps with ``cache``; each call also fed to
    ``oracles`` (their logits returned alongside)."""
    outs, refs, s = [], [[] for _ in oracles], 0
    for n in list(pieces) + [1] * steps:
        step = ids[:, s : s + n] if s < ids.shape[1] else outs[-1][:, -1:].argmax(-1)
        outs.append(model(step, use_cache=True, **_kw(model, cache)).logits)
        for r, o in zip(refs, oracles, strict=True):
            r.append(o(step))
        s += n
    return torch.cat(outs, 1), [torch.cat(r, 1) for r in refs]


@pytest.mark.parametrize("rope", list(ROPES))
def test_rerotated_logits_equal_the_in_cache_position_oracle(rope):
    model = _model(ROPES[rope])
    ids = _ids()
    policy = StreamingLLM(BUDGET, sinks=SINKS, rerotate=True)
    cache = PolicyCache(model, policy)
    exact, textbook = _InCacheOracle(model, BUDGET, SINKS), _InCacheOracle(model, BUDGET, SINKS, False)
    out, (want, want64) = _run(model, ids, cache, oracles=(exact, textbook))
    err = (out - want).abs().max().item()
    assert err <= 1e-9, f"{rope}: logits differ from the in-cache oracle by {err:.2e}"
    err64 = (out - want64).abs().max().item()
    assert err64 <= 1e-5, f"{rope}: logits differ from float64 RoPE at in-cache positions by {err64:.2e}"
    n = CTX + STEPS
    for layer in cache.layers:
        kv = layer.cache
        assert kv.kept_positions().eq(torch.tensor(exact.kept)[None, :, None]).all()
        assert exact.kept == [0, 1] + list(range(n - BUDGET + SINKS, n))
        assert kv.rope_offset == BUDGET and kv.seen_tokens == n
    # the same stream without re-rotation (original positions kept) is another model: the oracle sees positions
    plain, _ = _run(model, ids, PolicyCache(model, StreamingLLM(BUDGET, sinks=SINKS)))
    assert (plain - want).abs().max() > 1e-6, f"{rope}: the oracle does not tell re-rotation from none"
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION


@torch.no_grad()
def test_budget_covering_the_context_equals_the_models_own_cache(model):
    ids = _ids()
    ref, _ = _run(model, ids, transformers.DynamicCache(config=model.config))
    policy = StreamingLLM(64, sinks=SINKS, rerotate=True)
    for pieces in ([CTX], PIECES):
        cache = PolicyCache(model, policy)
        out, _ = _run(model, ids, cache, pieces)
        err = (out - ref).abs().max().item()
        assert err <= 1e-10, f"{pieces}: logits differ from transformers' cache by {err:.2e}"
        assert cache.layers[0].cache.rope_offset == CTX + STEPS
    greedy = _generate(model, ids)
    assert torch.equal(_generate(model, ids, PolicyCache(model, policy)), greedy)
    with policy(model):
        assert torch.equal(_generate(model, ids), greedy)
    # composed with KIVI (8-bit, residual covering): a composition takes the same path (in-cache position_ids)
    composed = compose(StreamingLLM(64, sinks=SINKS, rerotate=True), KIVI(8, group_size=4, residual=64))
    assert torch.equal(_generate(model, ids, PolicyCache(model, composed)), greedy)


@torch.no_grad()
def test_generate_and_beam_search_under_the_policy(model):
    """generate passes its own (absolute) position_ids, and beam search reorders the cache between steps: both must
    give what the oracle-checked step-by-step path gives (logits, and each beam's summed log-probabilities)."""
    ids, new = _ids(t=14), 6
    policy = StreamingLLM(BUDGET, sinks=SINKS, rerotate=True)
    stepped, _ = _run(model, ids, PolicyCache(model, policy), pieces=[14], steps=new - 1)  # oracle-checked path
    want = torch.cat((ids, stepped[:, 13:].argmax(-1)), dim=1)
    cache = PolicyCache(model, policy)
    out = _generate(model, ids, cache, max_new_tokens=new, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, want), "greedy generate with the cache"
    got = torch.stack(out.logits, 1)  # transformers hands them out in float32
    err = (got - stepped[:, 13:].to(got.dtype)).abs().max().item()
    assert err <= 1e-9, f"generate's logits differ from the step-by-step path by {err:.2e}"
    assert cache.layers[0].cache.rope_offset == BUDGET
    with policy(model):
        assert torch.equal(_generate(model, ids, max_new_tokens=new), want), "greedy generate under `with`"
    assert "generate" not in model.__dict__ and model.config._attn_implementation != ATTN_IMPLEMENTATION
    kw = {"num_beams": 3, "max_new_tokens": new, "num_return_sequences": 3, "length_penalty": 0.0,
          "eos_token_id": None}
    beams = _generate(model, ids, PolicyCache(model, policy), return_dict_in_generate=True, output_scores=True, **kw)
    for r, seq in enumerate(beams.sequences):  # each beam, re-run alone: its summed log-probabilities
        logits, _ = _run(model, seq[None], PolicyCache(model, policy), pieces=[14] + [1] * (new - 1), steps=0)
        lp = torch.log_softmax(logits[0, 13:], -1).gather(1, seq[14:, None]).sum()
        err = abs(lp.item() - beams.sequences_scores[r].item())  # transformers keeps beam scores in float32
        assert err <= 1e-5, f"beam {r}: score differs from the beam re-run alone by {err:.2e}"
    for r in range(2):
        alone = _generate(model, ids[r : r + 1], PolicyCache(model, policy), **kw)
        assert torch.equal(beams.sequences[3 * r : 3 * r + 3], alone), f"row {r} differs in a batch (cross-talk)"
    with policy(model):
        assert torch.equal(_generate(model, ids, **kw), beams.sequences), "beam search under `with`"


@torch.no_grad()
def test_refusals(model):
    dynamic = _model({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    policy = StreamingLLM(BUDGET, sinks=SINKS, rerotate=True)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        PolicyCache(dynamic, policy)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        with policy(dynamic):
            pass
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        PolicyCache(dynamic, compose(policy, KIVI(8, group_size=4, residual=64)))
    PolicyCache(dynamic, StreamingLLM(BUDGET, sinks=SINKS))  # without re-rotation the RoPE type does not matter
    ids = _ids()
    cache = PolicyCache(model, policy)
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(1, CTX + 1)[None], **_kw(model, cache))
    assert model.config._attn_implementation == before
    model(ids[:, :12], position_ids=torch.arange(12)[None], **_kw(model, cache))  # the absolute ones are taken
    with pytest.raises(ValueError, match="position_ids"):  # in-cache positions are the hook's to set, not the caller's
        model(ids[:, 12:], position_ids=torch.arange(BUDGET, BUDGET + CTX - 12)[None], **_kw(model, cache))
