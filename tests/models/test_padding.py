"""Left-padded batches and packed documents (issue 17): ``MnemosLM(..., attention_mask=... | document_ids=...)`` and
the Hugging Face wrapper.

The design (``mnemos.models.lm``): the rows are grouped by their number of left pads and each group runs without its
pads, with one sub-cache per group (``PaddedCache``), so every row is computed as if it were alone: chunk anchors,
MAC segments, RoPE positions, windows and KV caches all count from the row's first real token. Checked, float64:

- for every registered variant and a hybrid stack: a left-padded batch of prompts of different lengths (two rows
  sharing a length, so a group holds several rows) gives each row the logits of its prompt alone, zeros at the pads,
  and the same decoding steps and greedy tokens, through the cache and through ``MnemosLM.generate``;
- an all-ones mask is the plain path (a plain ``Cache``, bit-identical logits);
- the padded cache's ``reorder``, ``select``, ``state_dict`` / ``load_state_dict``, ``detach`` and ``to``;
- Hugging Face ``generate`` with left padding (greedy, beam search, without the cache) per prompt equal to the prompt
  alone; the ``labels`` loss ignores the pads;
- right padding, holes, empty rows, pads after the first call, bad shapes and values: ``ValueError`` naming
  ``attention_mask``;
- packed documents (``document_ids``, training): for every variant each document's logits equal the document alone,
  gradients equal the sum over the documents alone, and the HF ``labels`` loss skips each document's first token.

Kept tiny (the whole file runs in seconds on one thread): prompts of at most 9 tokens, 3 generated tokens.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from mnemos.models import VARIANTS, Cache
from mnemos.models.cache import PaddedCache

from test_models import V, make_model  # noqa: E402  (tests/models is on sys.path: the invariant harness's tiny sizes)

torch.set_num_threads(1)

# lengths around the tiny configs' window 5, segment 6 and memory chunk 4: the pads (0, 7, 3, 7) are not multiples of
# any of them, so a row run with its pads in place would see its chunks / segments / window shifted; rows 1 and 3
# share a length (one group of two rows)
LENGTHS = (9, 2, 6, 2)
STEPS = 3


def prompts_of(lengths=LENGTHS, vocab: int = V, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return ids, mask


def decode(model, ids, cache, steps: int = STEPS, **kw):
    """Prompt logits, then ``steps`` greedy steps through the cache: (logits of each call, tokens [B, steps])."""
    logits, cache = model(ids, cache, **kw)
    calls, tokens = [logits], []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits, cache = model(nxt, cache)
        calls.append(logits)
    return calls, torch.cat(tokens, 1), cache


def close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float = 1e-10) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (ref - out).abs().max().item()
    assert err <= tol, f"{name}: max |alone - padded| = {err:.3e} > {tol:.0e}"


def hybrid_model():
    from test_hybrid import config, make  # every kind of state in one stack: recurrent, window, routed, full

    return make(config(tie_embeddings=False)), config().vocab_size


# ----------------------------------------------------------------------------------------------------------------------
# MnemosLM, every variant


@pytest.mark.parametrize("variant", [*VARIANTS, "hybrid"])
def test_left_padded_batch_equals_each_prompt_alone(variant):
    if variant == "hybrid":
        model, vocab = hybrid_model()
    else:  # untied head: a tied random model's argmax mostly repeats the last token whatever the state
        model, vocab = make_model(variant, tie_embeddings=False), V
    prompts = prompts_of(vocab=vocab)
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    with torch.no_grad():
        calls, tokens, cache = decode(model, ids, model.init_cache(len(prompts)), attention_mask=mask)
        assert isinstance(cache, PaddedCache) and cache.position == T + STEPS
        assert sorted(cache.pads) == [0, 3, 7] and cache.row_pads().tolist() == [0, 7, 3, 7]
        for i, p in enumerate(prompts):
            pads = T - len(p)
            alone, alone_tokens, alone_cache = decode(model, p[None], model.init_cache(1))
            close(f"{variant} row {i} prompt logits", alone[0][0], calls[0][i, pads:])
            assert torch.equal(calls[0][i, :pads], torch.zeros_like(calls[0][i, :pads])), "logits at the pads"
            for s in range(1, STEPS + 1):
                close(f"{variant} row {i} step {s} logits", alone[s][0], calls[s][i])
            assert torch.equal(tokens[i], alone_tokens[0]), f"{variant} row {i}: greedy tokens"
            assert alone_cache.position == len(p) + STEPS
        out = model.generate(ids, STEPS, attention_mask=mask)
    assert torch.equal(out[:, :T], ids) and torch.equal(out[:, T:], tokens)


def test_no_padding_is_the_plain_path():
    model = make_model("mac")
    ids, _ = left_pad(prompts_of((7, 7)))
    with torch.no_grad():
        ref, ref_cache = model(ids, use_cache=True)
        out, cache = model(ids, use_cache=True, attention_mask=torch.ones_like(ids))
        nxt, cache = model(ids[:, :2], cache, attention_mask=torch.ones(2, 9, dtype=torch.bool))  # HF style [B, P+T]
    assert type(cache) is Cache and cache.position == 9
    assert torch.equal(ref, out)


def test_padded_cache_operations():
    """reorder / select move whole rows with their pads (rows from different groups end in different groups);
    state_dict round-trips; detach / to copy. Checked by continuing the streams against the prompts alone."""
    model = make_model("mag", tie_embeddings=False)
    prompts = prompts_of((9, 2, 6))
    ids, mask = left_pad(prompts)
    nxt = torch.tensor([[5], [6], [7]])
    with torch.no_grad():
        _, cache = model(ids, attention_mask=mask, use_cache=True)
        saved = {k: v.clone() for k, v in cache.state_dict().items()}
        swapped = cache.reorder(torch.tensor([2, 2, 0]))  # row 1 dropped, row 2 twice
        assert swapped.batch_size == 3 and swapped.row_pads().tolist() == [3, 3, 0]
        got, _ = model(nxt, swapped)
        picked, _ = model(nxt[:1], cache.select(torch.tensor([1])))
        copy = cache.detach().to(dtype=torch.float64)
        a, cache = model(nxt, cache)  # advances cache in place
        cache.load_state_dict(saved)  # back to the prompt's end
        b, _ = model(nxt, cache)
        c, _ = model(nxt, copy)
        for j, (i, tok) in enumerate([(2, 5), (2, 6), (0, 7)]):
            want, _ = model(torch.cat([prompts[i], torch.tensor([tok])])[None])
            close(f"reordered row {j}", want[0, -1], got[j, -1])
        want, _ = model(torch.cat([prompts[1], torch.tensor([5])])[None])
        close("selected row", want[0, -1], picked[0, -1])
    close("state_dict round trip", a, b, 0.0)
    close("detached copy", a, c, 0.0)
    assert cache.num_elements() == sum(g.num_elements() for g in cache.groups) > 0
    with pytest.raises(ValueError, match="index must be a 1-D integer tensor of 3"):
        cache.reorder(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index values must lie in"):
        cache.select(torch.tensor([3]))
    other_ids, other_mask = left_pad(prompts_of((9, 9, 2)))
    with torch.no_grad():
        _, other = model(other_ids, attention_mask=other_mask, use_cache=True)
    with pytest.raises(ValueError, match=r"pad groups \[0, 3, 7\], this cache has 3 with \[0, 7\]"):
        other.load_state_dict(saved)  # a template padded otherwise


@pytest.mark.parametrize(
    "mask,match",
    [
        ([[1, 1, 0], [1, 1, 1]], r"attention_mask row 0 has a 0 after a 1 \(right padding or a hole\).*left padding"),
        ([[1, 1, 1], [0, 1, 0]], r"attention_mask row 1 has a 0 after a 1"),
        ([[0, 1, 1], [1, 0, 1]], r"attention_mask row 1 has a 0 after a 1"),
        ([[0, 0, 0], [1, 1, 1]], r"attention_mask row 0 has no real token"),
        ([[0, 2, 1], [1, 1, 1]], r"attention_mask must hold only 0 and 1"),
        ([[1, 1], [1, 1]], r"attention_mask must be a tensor \[B, T\] of 0/1 with B = 2 and T = 3"),
    ],
)
def test_bad_masks_are_errors(mask, match):
    model = make_model("lmm")
    ids, _ = left_pad(prompts_of((3, 3)))
    with pytest.raises(ValueError, match=match):
        model(ids, attention_mask=torch.tensor(mask))


def test_pads_after_the_first_call_are_errors():
    model = make_model("swa")
    ids, mask = left_pad(prompts_of((4, 2)))
    with torch.no_grad():
        _, plain = model(ids, use_cache=True)
        with pytest.raises(ValueError, match=r"attention_mask pads tokens after the cache's 4.*left padding only"):
            model(ids[:, :2], plain, attention_mask=torch.tensor([[1, 1], [0, 1]]))
        with pytest.raises(ValueError, match=r"attention_mask's first 4 columns do not match"):
            model(ids[:, :1], plain, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        _, padded = model(ids, use_cache=True, attention_mask=mask)
        with pytest.raises(ValueError, match=r"attention_mask's first 4 columns do not match"):
            model(ids[:, :1], padded, attention_mask=torch.ones(2, 5))
        model(ids[:, :1], padded, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face


def hf_model(variant: str, seed: int = 0):
    pytest.importorskip("transformers")
    from test_hf import build  # the HF tests' tiny config

    return build(variant, seed=seed, tie_embeddings=False).to(torch.float64)


@pytest.mark.parametrize("variant", ["lmm", "mac", "transformer", "gated_deltanet"])
def test_hf_generate_left_padded_equals_each_prompt_alone(variant):
    model = hf_model(variant)
    prompts = prompts_of((9, 2, 6))
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    kw = dict(do_sample=False, max_new_tokens=STEPS, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    out = model.generate(ids, attention_mask=mask, **kw)
    assert isinstance(out.cache, PaddedCache) and out.cache.position == T + STEPS - 1
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], **kw)
        assert torch.equal(out.sequences[i, T - len(p):], alone.sequences[0]), f"{variant} row {i}"
        for s in range(STEPS):
            close(f"{variant} row {i} step {s}", alone.logits[s][0], out.logits[s][i])


@pytest.mark.parametrize("variant", ["mac", "transformer"])
def test_hf_beam_search_and_no_cache_left_padded(variant):
    """Beam search reorders the padded cache every step (group by group); use_cache=False reruns the padded prompt
    every step. Each must give per prompt what it gives the prompt alone."""
    model = hf_model(variant, seed=1)
    prompts = prompts_of((7, 3))
    ids, mask = left_pad(prompts)
    beam = dict(do_sample=False, num_beams=3, max_new_tokens=6, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, **beam)
    fresh = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=STEPS, pad_token_id=0,
                           use_cache=False)
    for i, p in enumerate(prompts):
        pads = ids.shape[1] - len(p)
        assert torch.equal(out[i, pads:], model.generate(p[None], **beam)[0]), f"{variant} beam row {i}"
        greedy = model.generate(p[None], do_sample=False, max_new_tokens=STEPS, pad_token_id=0)
        assert torch.equal(fresh[i, pads:], greedy[0]), f"{variant} no-cache row {i}"


def test_hf_labels_loss_ignores_the_pads():
    model = hf_model("lmm")
    prompts = prompts_of((6, 3))
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        loss = model(ids, attention_mask=mask, labels=ids).loss
        per_row = [model(p[None], labels=p[None]).loss * (len(p) - 1) for p in prompts]
    close("padded loss", sum(per_row) / sum(len(p) - 1 for p in prompts), loss, 1e-12)
    with pytest.raises(ValueError, match="attention_mask row 1 has a 0 after a 1"):
        model(ids, attention_mask=mask.flip(1))


# ----------------------------------------------------------------------------------------------------------------------
# packed documents (training rows holding several documents, the state reset at each boundary)

# row 0: documents of 5, 1 and 4 tokens (a one-token document, boundaries off the chunk / segment / window grid);
# row 1: two documents that reuse an id (a boundary is wherever the id changes); row 2: one document of 10
DOC_IDS = torch.tensor([[0] * 5 + [1] + [2] * 4, [3] * 7 + [0] * 3, [9] * 10])


def documents(ids: torch.Tensor, doc_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document."""
    out = []
    for b in range(ids.shape[0]):
        cuts = [0] + [t for t in range(1, ids.shape[1]) if doc_ids[b, t] != doc_ids[b, t - 1]] + [ids.shape[1]]
        out += [(b, s, e) for s, e in pairwise(cuts)]
    return out


@pytest.mark.parametrize("variant", [*VARIANTS, "hybrid"])
def test_packed_documents_equal_each_document_alone(variant):
    model, vocab = hybrid_model() if variant == "hybrid" else (make_model(variant), V)
    ids = torch.randint(0, vocab, DOC_IDS.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, cache = model(ids, document_ids=DOC_IDS)
        assert cache is None
        for b, s, e in documents(ids, DOC_IDS):
            alone, _ = model(ids[b : b + 1, s:e])
            close(f"{variant} document ({b}, {s}:{e})", alone[0], out[b, s:e])


def test_packed_documents_gradients_and_errors():
    """The gradient of a loss over packed rows is the sum of the documents' alone; one document per row is the plain
    path; document_ids with a cache or a mask, or of the wrong shape or dtype, are errors."""
    model = make_model("mac")
    ids = torch.randint(0, V, DOC_IDS.shape, generator=torch.Generator().manual_seed(4))
    w = torch.randn(*ids.shape, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (model(ids, document_ids=DOC_IDS)[0] * w).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for b, s, e in documents(ids, DOC_IDS):
        (model(ids[b : b + 1, s:e])[0] * w[b : b + 1, s:e]).sum().backward()
    for n, p in model.named_parameters():
        close(f"grad {n}", p.grad, packed[n])
    with torch.no_grad():
        one = torch.zeros_like(ids)
        assert torch.equal(model(ids, document_ids=one)[0], model(ids)[0])
        with pytest.raises(ValueError, match="document_ids .* is for training without a cache"):
            model(ids, use_cache=True, document_ids=DOC_IDS)
        with pytest.raises(ValueError, match="attention_mask .* or document_ids .*, not both"):
            model(ids, attention_mask=torch.ones_like(ids), document_ids=DOC_IDS)
        with pytest.raises(ValueError, match=r"document_ids must be an integer tensor shaped like input_ids \(3, 10\)"):
            model(ids, document_ids=DOC_IDS.float())
        with pytest.raises(ValueError, match=r"document_ids must be an integer tensor shaped like input_ids"):
            model(ids, document_ids=DOC_IDS[:, :5])


def test_hf_packed_documents_loss():
    """The labels loss over packed rows skips each document's first token (predicted from the previous document):
    it is the token-weighted mean of the documents' losses alone."""
    model = hf_model("lmm")
    ids = torch.randint(0, V, DOC_IDS.shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss = model(ids, labels=ids, document_ids=DOC_IDS).loss
        docs = [ids[b : b + 1, s:e] for b, s, e in documents(ids, DOC_IDS) if e - s > 1]
        per_doc = [model(d, labels=d).loss * (d.shape[1] - 1) for d in docs]
    close("packed loss", sum(per_doc) / sum(d.shape[1] - 1 for d in docs), loss, 1e-12)
