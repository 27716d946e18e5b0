"""The retrieval tier (``mnemos.kv.retrieval``): InfLLM's blocks and SentenceKV's sentences in an offload store.

- top-k covering every block / sentence => logits equal the full cache's (float64, Transformer++, SWA, MAG, MAL, a
  windowed layer whose store is used, streamed prefill and decoding; GQA at the cache level; a Hugging Face Llama);
- the store is read only for retrieved units (its read path is traced): a block / sentence never retrieved is never
  read, and the retrieved ones equal a brute-force top-k of the resident vectors (representatives: brute-force
  means of the most attended keys; sentence vectors: brute-force means over a brute-force segmentation);
- resident K/V + offloaded K/V bytes == the full cache's bytes (nothing dropped); nbytes == the tensors held; the
  harness records resident bytes as ``state_bytes`` and the offloaded ones beside them;
- batch rows do not cross-talk; serialisation and beam-search reorder mid-stream; bad arguments raise ValueError.
"""

from __future__ import annotations

import pytest
import torch

from kv_helpers import ATTENTION_VARIANTS, F64, attn_caches, ids_of, make_model, stream, tiny_llama
from mnemos.eval.runner import per_sequence_state
from mnemos.eval.stateful import state_size
from mnemos.kv import InfLLM, SentenceKV
from mnemos.kv.base import attention_probs
from mnemos.layers import FullKVCache
from mnemos.layers.attention import causal_attention, positional_attention

PIECES = [13, 9, 1, 1, 16]  # a streamed prefill in uneven chunks, then decoding steps, then a chunk


def _ids(b=2, t=40, seed=1):
    ids = ids_of(b, t, seed)
    ids[:, 7], ids[:, 15] = 46, 10  # '.' and '\n': sentence boundaries of the byte tokenizer
    ids[0, 22] = 46
    return ids


def _covering():
    return [InfLLM(3, n_init=2, n_local=2, topk=100, repr_topk=2),
            InfLLM(3, n_init=2, n_local=2, topk=100, repr_topk=1, per_head=True),
            SentenceKV(sinks=2, recent=2, max_tokens=None, threshold=0, max_len=5)]


@pytest.mark.parametrize("variant,window", [(v, None) for v in ATTENTION_VARIANTS] + [("swa", 12), ("mag", 12)])
def test_topk_covering_everything_gives_the_full_logits(variant, window):
    model = make_model(variant, **({} if window is None else {"window": window}))
    ids = _ids()
    ref, _ = stream(model, ids, PIECES)
    for policy in _covering():
        used = []
        with policy(model):
            out, cache = stream(model, ids, PIECES, on_call=lambda c: used.append(len(attn_caches(c)[0].store)))
        err = (out - ref).abs().max().item()
        assert err <= 1e-12, f"{variant}/{window} {policy!r}: logits differ by {err:.2e}"
        if variant == "transformer" or window == 12:  # the store is really used (on W = 5 nothing visible leaves)
            assert max(used) > 0, f"{policy!r}: nothing was offloaded"


def _data(b, t, h, d, hq, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, n, d, generator=g, dtype=F64) for n in (hq, h, h)]


@pytest.mark.parametrize("make", [lambda: InfLLM(4, n_init=2, n_local=3, topk=50, repr_topk=2, per_head=True),
                                  lambda: SentenceKV(sinks=2, recent=3, max_tokens=None, threshold=0, max_len=4)])
def test_gqa_cache_level_equals_full_attention(make):
    q, k, v = _data(2, 30, 2, 8, 4, seed=5)
    cache = make().make_cache(2, 2, 8, dtype=F64)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(2))
    s = 0
    for n in (11, 1, 1, 9, 8):
        if hasattr(cache, "set_token_ids"):
            cache.set_token_ids(ids[:, s : s + n])
        view = cache.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        got = positional_attention(q[:, s : s + n], view.keys, view.values, torch.arange(s, s + n), view.positions)
        want = causal_attention(q[:, s : s + n], k[:, : s + n], v[:, : s + n])
        assert (got - want).abs().max() <= 1e-12
        s += n
    assert len(cache.store) > 0


def _brute_reps(k, mass, start, bs, r, nb):
    """Block representatives by loops: per block and head, the mean of the r keys of largest mass."""
    b, _, h, d = k.shape
    out = torch.zeros(b, nb, h, d, dtype=k.dtype)
    for bi in range(b):
        for j in range(nb):
            for hh in range(h):
                ms = [(float(mass[bi, start + j * bs + i, hh]), i) for i in range(bs)]
                top = [i for _, i in sorted(ms, reverse=True)[:r]]
                out[bi, j, hh] = torch.stack([k[bi, start + j * bs + i, hh] for i in top]).mean(0)
    return out


@pytest.mark.parametrize("per_head", [False, True])
def test_infllm_reads_only_the_brute_force_top_blocks(per_head):
    bs, n_init, n_local, topk, rt = 3, 2, 3, 2, 2
    q, k, v = _data(2, 40, 2, 8, 4, seed=7)
    cache = InfLLM(bs, n_init=n_init, n_local=n_local, topk=topk, repr_topk=rt, per_head=per_head).make_cache(
        2, 2, 8, dtype=F64)
    cache.store.trace, cache.selections = [], []
    mass = torch.zeros(2, 40, 2, dtype=torch.float32)  # brute-force attention received per token
    s, never = 0, None
    for n in [12] + [1] * 14 + [14]:
        nb = cache.num_blocks
        cache.store.trace.clear()
        reps = cache.rep.clone()
        tail_lo = max(cache.store_start + len(cache.store), n_init)  # resident, not yet in a block
        view = cache.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        p = attention_probs(q[:, s : s + n], view.keys, torch.arange(s, s + n), view.positions, None)
        got = p.sum(dim=(2, 3)).permute(0, 2, 1)  # attention received, over the group's heads and the queries
        for bi in range(2):
            for j, pos in enumerate(view.positions[bi, :, 0].tolist()):
                if pos >= tail_lo:  # a block's mass stops growing once it is offloaded
                    mass[bi, pos] += got[bi, j]
        if nb:
            assert torch.allclose(reps, _brute_reps(k, mass, n_init, bs, rt, nb), rtol=0, atol=1e-12)
            qbar = q[:, s : s + n].mean(1).reshape(2, 2, 2, 8).sum(2)  # [B, Hkv, D]: group sums of mean queries
            sc = torch.einsum("bnhd,bhd->bnh", reps, qbar)
            if not per_head:
                sc = sc.sum(2, keepdim=True).expand_as(sc)
            chosen = cache.selections[-1]
            reads = {}
            for bi, idx, hh in cache.store.trace:
                reads.setdefault((bi, hh), set()).add(idx // bs)
            for bi in range(2):
                for hh in range(2):
                    want = sorted(sc[bi, :, hh].topk(min(topk, nb)).indices.tolist())
                    assert chosen[bi][hh] == want
                    assert reads[(bi, hh)] == set(want), "read a block not retrieved (or missed one)"
                    if nb > topk:
                        never = set(range(nb)) - set(want)
            # each retrieved block is read whole, once
            assert len(cache.store.trace) == 2 * 2 * min(topk, nb) * bs
        else:
            assert cache.store.trace == []
        s += n
    assert never, "some block was never retrieved in the last call"
    assert cache.num_blocks == (40 - n_local - n_init) // bs  # InfLLM's #blocks formula


def _segment(row, s0, bound, max_len):
    """Sentences as (start, end) over positions >= s0, by loops."""
    out, o = [], s0
    for p in range(s0, len(row)):
        if row[p] in bound or p - o + 1 >= max_len:
            out.append((o, p + 1))
            o = p + 1
    if o < len(row):
        out.append((o, len(row)))
    return out


def test_sentencekv_segments_averages_and_reads_only_the_chosen_sentences():
    s0, r, m, max_len = 2, 3, 7, 6
    q, k, v = _data(2, 40, 2, 8, 4, seed=9)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(4))
    ids[0, [5, 9, 20]] = 46
    ids[1, [13, 14, 30]] = 10
    cache = SentenceKV(sinks=s0, recent=r, max_tokens=m, max_len=max_len, threshold=0).make_cache(2, 2, 8, dtype=F64)
    cache.store.trace, cache.selections = [], []
    s = 0
    for n in [15] + [1] * 10 + [15]:
        cache.store.trace.clear()
        cache.set_token_ids(ids[:, s : s + n])
        had = cache.rep.shape[1] > 0
        cache.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
        s += n
        if had:
            starts = cache.selections[-1]
            for bi in range(2):
                sents = _segment(ids[bi].tolist(), s0, {46, 33, 63, 10}, max_len)
                for hh in range(2):
                    read = sorted(idx for b_, idx, h_ in cache.store.trace if (b_, h_) == (bi, hh))
                    pos = [cache.store_start + i for i in read]
                    assert len(pos) <= m
                    owner = {next(a for a, e in sents if a <= p_ < e) for p_ in pos}
                    assert owner <= set(starts[bi][hh]), "read a sentence that was not chosen"
        # the offloaded sentences and their mean keys equal the brute force
        for bi in range(2):
            sents = _segment(ids[bi, :s].tolist(), s0, {46, 33, 63, 10}, max_len)
            hi = cache.store_start + len(cache.store)
            want = [(a, min(e, hi)) for a, e in sents if a < hi]
            nv = int((cache.scount[bi] > 0).sum())
            spans = zip(cache.sstart[bi, :nv], cache.scount[bi, :nv], strict=True)
            assert [(int(a), int(a) + int(c)) for a, c in spans] == want
            for j, (a, e) in enumerate(want):
                assert torch.allclose(cache.rep[bi, j], k[bi, a:e].mean(0), rtol=0, atol=1e-12)
    assert s == 40 and len(cache.store) == 40 - s0 - r


def test_tier_bytes_add_up_to_the_full_cache_and_the_harness_records_them():
    q, k, v = _data(1, 40, 2, 8, 4, seed=3)
    full = FullKVCache(1, 2, 8, dtype=F64)
    full.update(k, v)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    for policy in [InfLLM(4, n_init=2, n_local=5, topk=1, repr_topk=2), SentenceKV(sinks=2, recent=5, max_len=4)]:
        cache = policy.make_cache(1, 2, 8, dtype=F64)
        s = 0
        for n in (17, 1, 1, 21):
            if hasattr(cache, "set_token_ids"):
                cache.set_token_ids(ids[:, s : s + n])
            cache.update_view(k[:, s : s + n], v[:, s : s + n], q=q[:, s : s + n])
            s += n
        tiers = cache.tier_nbytes()
        assert tiers["offloaded"] > 0 and tiers["resident"] + tiers["offloaded"] == cache.nbytes
        assert tiers["resident"] - cache.index_nbytes + tiers["offloaded"] == full.nbytes, repr(policy)
        listed = sum(t.numel() * t.element_size() for t in cache.state_dict().values() if t.ndim)
        assert cache.nbytes == listed == state_size(cache).nbytes, repr(policy)
        assert cache.num_stored == 40 and torch.equal(cache.kept_positions()[0, :, 0], torch.arange(40))
        assert cache.num_resident <= 2 + 5 + 4
        rec = per_sequence_state([cache], 1)
        assert rec["kv_offloaded_bytes"] == tiers["offloaded"]
        assert rec["state_bytes"] == rec["kv_cache_bytes"] == tiers["resident"]
        assert rec["state_numel"] == state_size(cache).numel - cache.store.k.numel() - cache.store.v.numel()


@pytest.mark.parametrize("policy", [InfLLM(3, n_init=2, n_local=2, topk=1, repr_topk=2),
                                    InfLLM(3, n_init=1, n_local=2, topk=2, repr_topk=1, per_head=True),
                                    SentenceKV(sinks=2, recent=2, max_tokens=4, max_len=5)],
                         ids=["infllm", "infllm-per-head", "sentencekv"])
def test_no_cross_talk_between_batch_rows(policy):
    model = make_model("transformer")
    ids = torch.cat([_ids(1, 30, seed=3), _ids(1, 30, seed=4)])
    ids[1, [3, 11, 19]] = 33  # different sentences in each row
    with policy(model):
        both, cache = stream(model, ids, [12, 9, 1, 1, 7])
        for i in range(2):
            one, c1 = stream(model, ids[i : i + 1], [12, 9, 1, 1, 7])
            err = (both[i : i + 1] - one).abs().max().item()
            assert err <= 1e-10, f"{policy!r}: row {i} differs from running it alone by {err:.2e}"
            for kv, kv1 in zip(attn_caches(cache), attn_caches(c1), strict=True):
                assert torch.equal(kv.kept_positions()[i : i + 1], kv1.kept_positions())
                assert torch.allclose(kv.store.k[i : i + 1], kv1.store.k, rtol=0, atol=1e-10)
                nv = kv1.rep.shape[1]
                assert torch.allclose(kv.rep[i : i + 1, :nv], kv1.rep, rtol=0, atol=1e-10)


def test_sentencekv_without_token_ids_is_a_clear_error():
    cache = SentenceKV().make_cache(1, 2, 8)
    x = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="token ids"):
        cache.update_view(x, x, q=x)


def test_hugging_face_llama_infllm_equals_the_full_cache():
    pytest.importorskip("transformers")
    from mnemos.kv.hf import PolicyCache, cache_kwarg

    model = tiny_llama(64)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        cache = PolicyCache(model, InfLLM(3, n_init=2, n_local=4, topk=100, repr_topk=2))
        assert torch.equal(model.generate(ids, **kw, **{cache_kwarg(model): cache}), ref)
        kv = cache.layers[0].cache
        assert len(kv.store) > 0 and cache.nbytes == sum(layer.cache.nbytes for layer in cache.layers)
        sent = PolicyCache(model, SentenceKV(sinks=2, recent=4))  # accepted: the model's hook hands it the token ids
        with pytest.raises(ValueError, match="token ids"):  # ... which a call with embeddings does not have
            model(inputs_embeds=model.get_input_embeddings()(ids), **{cache_kwarg(model): sent})


def test_eval_records_resident_bytes_as_state_bytes_and_offloaded_beside_them():
    from mnemos.data import MQARConfig
    from mnemos.eval import EvalOptions, MnemosLMAdapter, evaluate
    from mnemos.eval.harness import with_kv_policies

    mq = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=4)
    specs = ["infllm:block_size=4,n_init=2,n_local=4,topk=1,repr_topk=2",
             "sentencekv:sinks=2,recent=4,boundary_ids=5;9,max_len=6", "none"]  # ids of any vocabulary
    models = with_kv_policies([MnemosLMAdapter(make_model("transformer"), name="t")], specs)
    res = evaluate(models, mq, options=EvalOptions(progress=False, raise_errors=True, stream_chunk=8))
    cells = {c.model["kv_policy"]: c.metrics for c in res.cells}
    full = cells[None]["state_bytes"]
    assert full == 32 * 1024 and "kv_offloaded_bytes" not in cells[None]
    for spec in specs[:2]:
        m = cells[spec]
        assert m["state_bytes"] == m["kv_cache_bytes"] < full, spec
        assert m["kv_offloaded_bytes"] > 0 and m["state_bytes"] + m["kv_offloaded_bytes"] > full, spec
