"""LM2 (mnemos.models.lm2) and the relay protocol of MnemosLM that runs it (mnemos.models.lm), in float64.

- The logits of a plain ``lm2`` stack and of a hybrid one (``[lm2, swa, lm2]``) equal a slow token-by-token reference
  written from the paper's equations (its own loops over tokens, slots and blocks), in one call, in pieces with the
  cache and token by token, over three segments; so do their gradients. The cache's carried bank is the reference's:
  the *last* LM2 block's updated bank, and a reference carrying the first block's own bank (which differs) does not
  match the model.
- Output gates closed (bias -inf): the sliding-window attention model with the same weights. Write gates closed
  (g_in = 0, g_f = 1): the identity bank carried unchanged.
- Strict causality, reach beyond the window through the bank (in a segment and across one), batch independence,
  generate == forward, the cache saved and restored mid-stream, left-padded batches and packed documents, the Hugging
  Face round trip, a training run resumed bit-exactly; segments of 4 so every test crosses several.
- A stack without a relay mixer never takes the segment-major path; bad relays are errors.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from mnemos.models import LM2Layer, MnemosConfig, MnemosLM
from mnemos.models.cache import PaddedCache
from model_helpers import check_training_resumes_bit_exactly, close, random_ids

torch.set_num_threads(1)
F64 = torch.float64
V, N = 32, 4  # vocabulary; slots = tokens per segment
TINY = dict(vocab_size=V, d_model=16, n_heads=2, window=3, init_std=0.5, tie_embeddings=False, lm2={"num_slots": N})
STACKS = {"lm2": dict(variant="lm2", n_layers=3), "hybrid": dict(variant="hybrid", n_layers=3,
                                                                   layers=["lm2", "swa", "lm2"])}


def make(stack: str = "lm2", seed: int = 0, **kw) -> MnemosLM:
    torch.manual_seed(seed)
    return MnemosLM(MnemosConfig.from_dict({**TINY, **STACKS[stack], **kw})).to(F64).eval()


def ids_of(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_ids(V, B, T, seed)


# ----------------------------------------------------------------------------------------------------------------------
# the reference: the paper's equations, token by token


def reference(model: MnemosLM, ids: torch.Tensor, carry: str = "last"):
    """Logits ``[B, T, V]`` by loops over tokens, blocks and slots, and the bank carried at each segment end.

    Per token (position r of its segment), per block: an LM2 block reads slots 0..r of its bank (the first LM2 block:
    the carried bank; a later one: the rows the previous LM2 block wrote in this segment), adds the gated row r to its
    attention's output, and writes its row r; any other block runs as it is. At a segment end the bank the next
    segment opens with is the ``carry`` ("last" or, wrongly, "first") LM2 block's. The attention of an LM2 block is
    its own layer, run token by token (tested elsewhere)."""
    B, T = ids.shape
    d = model.config.d_model
    blocks = model.blocks
    lm2 = [i for i, b in enumerate(blocks) if isinstance(b.mixer, LM2Layer)]
    states = [b.mixer.attn.init_state(B) if i in lm2 else b.init_state(B) for i, b in enumerate(blocks)]
    bank = list(torch.eye(N, d, dtype=F64).expand(B, N, d).unbind(1))  # rows [B, d] of the first LM2 block's bank
    logits, carried = [], []
    for t in range(T):
        r = t % N
        if r == 0:
            written = {i: [] for i in lm2}  # each LM2 block's updated rows of this segment
        h = model.embed(ids[:, t])  # [B, d]
        prev = None
        for i, block in enumerate(blocks):
            if i not in lm2:
                y, states[i] = block(h[:, None], states[i])
                h = y[:, 0]
                continue
            m = block.mixer
            e = block.mixer_norm(h)
            a, states[i] = m.attn(e[:, None], states[i])
            M = bank if prev is None else written[prev]
            q = e @ m.q_proj.weight.T
            scores = torch.stack([(q * (M[j] @ m.k_proj.weight.T)).sum(-1) / math.sqrt(d) for j in range(r + 1)], -1)
            p = torch.exp(scores - scores.max(-1, keepdim=True).values)
            p = p / p.sum(-1, keepdim=True)  # [B, r + 1]: slots 0..r only
            e_mem = sum(p[:, j, None] * (M[j] @ m.v_proj.weight.T) for j in range(r + 1))
            g_out = torch.sigmoid(e_mem @ m.out_gate.weight.T + m.out_gate.bias)
            g_in = torch.sigmoid(e @ m.in_gate.weight.T + m.in_gate.bias)
            g_f = torch.sigmoid(e_mem @ m.forget_gate.weight.T + m.forget_gate.bias)
            written[i].append(g_in * torch.tanh(e_mem) + g_f * M[r])
            h = h + a[:, 0] + g_out * M[r]
            h = h + block.mlp(block.mlp_norm(h))
            prev = i
        logits.append(model.lm_head(model.norm(h)))
        if r == N - 1:
            bank = written[lm2[-1] if carry == "last" else lm2[0]]
            carried.append((torch.stack(written[lm2[0]], 1), torch.stack(written[lm2[-1]], 1)))
    return torch.stack(logits, 1), carried


@pytest.mark.parametrize("stack", list(STACKS))
def test_logits_and_carried_bank_equal_the_reference(stack):
    model, ids = make(stack), ids_of(2, 11)  # two whole segments and part of a third
    first = [i for i, b in enumerate(model.blocks) if isinstance(b.mixer, LM2Layer)][0]
    with torch.no_grad():
        ref, carried = reference(model, ids)
        full, _ = model(ids)  # no cache: a transient one, segment-major
        close("one call", ref, full)
        cache, pieces = model.init_cache(2), []
        for a, b in ((0, 3), (3, 8), (8, 9), (9, 11)):  # ends inside a segment, at its end, past it
            logits, cache = model(ids[:, a:b], cache)
            pieces.append(logits)
            if b == 8:  # two segments done: the first LM2 block reads the last LM2 block's bank of segment 2
                own, last = carried[1]
                assert (own - last).abs().max() > 1e-3  # block 0's own bank differs: a wrong carry shows
                close("carried bank", last, cache.layers[first].bank)
        close("pieces", ref, torch.cat(pieces, 1))
        cache, steps = model.init_cache(2), []
        for t in range(11):
            logits, cache = model(ids[:, t : t + 1], cache)
            steps.append(logits)
        close("token by token", ref, torch.cat(steps, 1))
        wrong, _ = reference(model, ids, carry="first")
    close("first segment, either carry", wrong[:, :N], full[:, :N])
    assert (wrong[:, N:] - full[:, N:]).abs().max() > 1e-6, "carrying block 0's own bank gives the same logits"


def test_gradients_equal_the_reference():
    model, ids = make("hybrid"), ids_of(2, 9)
    w = torch.randn(2, 9, V, dtype=F64, generator=torch.Generator().manual_seed(2))
    (model(ids)[0] * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (reference(model, ids)[0] * w).sum().backward()
    for n, p in model.named_parameters():
        close(f"grad {n}", p.grad, grads[n])


# ----------------------------------------------------------------------------------------------------------------------
# closed gates


def test_closed_output_gates_give_the_sliding_window_model():
    lm2 = make("lm2")
    for b in lm2.blocks:
        b.mixer.close_output_gate()
    swa = make("lm2", seed=5, variant="swa")
    sd = {k.replace("mixer.attn.", "mixer."): v for k, v in lm2.state_dict().items()
          if "mixer." not in k or "mixer.attn." in k}
    swa.load_state_dict(sd)  # strict: every weight of the attention model mapped
    with torch.no_grad():
        for T in (N, 11):  # one piece (the stateless path), three
            ids = ids_of(2, T)
            a, b = lm2(ids)[0], swa(ids)[0]
            assert torch.equal(a, b) if T == N else (a - b).abs().max() < 1e-12
        assert (make("lm2")(ids)[0] - b).abs().max() > 1e-6  # open gates: the memory is in play


def test_closed_write_gates_carry_the_identity_bank():
    model = make("lm2")
    eye = torch.eye(N, 16, dtype=F64).expand(2, -1, -1)
    assert torch.equal(model.init_cache(2).layers[0].bank, eye)
    states = model.init_cache(2).layers
    assert [s.bank is None for s in states] == [False, True, True]
    # the state formula: (L + 1) N d for L blocks, besides the KV caches
    for b, s in zip(model.blocks, states, strict=True):
        assert b.mixer.state_numel() == sum(t[0].numel() for t in (s.bank, s.out) if t is not None)
    assert sum(b.mixer.state_numel() for b in model.blocks) == 4 * N * 16
    with torch.no_grad():
        for b in model.blocks:
            b.mixer.in_gate.bias.fill_(-math.inf)  # g_in = 0
            b.mixer.forget_gate.bias.fill_(math.inf)  # g_f = 1
        _, cache = model(ids_of(2, 2 * N + 1), model.init_cache(2))
    assert torch.equal(cache.layers[0].bank, eye)  # two segments written and carried: unchanged


# ----------------------------------------------------------------------------------------------------------------------
# causality and reach


def test_causality_and_reach_through_the_bank():
    model = make("lm2", window=1)  # attention sees each token alone: only the bank crosses tokens
    ids = ids_of(2, 11)
    with torch.no_grad():
        ref, _ = model(ids)
        for cut in (1, 4, 5, 10):
            changed = ids.clone()
            changed[:, cut:] = (changed[:, cut:] + 1) % V
            out, _ = model(changed)
            close(f"logits before {cut}", ref[:, :cut], out[:, :cut], 1e-12)
            assert (ref[:, cut] - out[:, cut]).abs().max() > 1e-6, f"token {cut} changed nothing"
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % V
        out, _ = model(changed)
        assert (ref[:, 2] - out[:, 2]).abs().max() > 1e-6  # in its segment, through the bank
        assert (ref[:, 9] - out[:, 9]).abs().max() > 1e-6  # two segments on, through the carried banks
        for b in model.blocks:
            b.mixer.close_output_gate()
        a, _ = model(ids)
        b, _ = model(changed)
    assert (a[:, 1:] - b[:, 1:]).abs().max() == 0.0  # no memory output, window 1: nothing crosses tokens


# ----------------------------------------------------------------------------------------------------------------------
# the invariants, segments crossed


@pytest.mark.parametrize("stack", list(STACKS))
def test_generate_batch_independence_and_cache_round_trip(stack):
    model, ids = make(stack), ids_of(3, 11)
    with torch.no_grad():
        full, _ = model(ids)
        for i in range(3):
            close(f"sample {i} alone", full[i : i + 1], model(ids[i : i + 1])[0], 1e-12)
        out = model.generate(ids[:, :3], 8)
        again, _ = model(out)
        assert torch.equal(out[:, 3:], again[:, 2:-1].argmax(-1)), "generate != forward's argmax"
        cache = model.init_cache(3)
        _, cache = model(ids[:, :6], cache)
        buf = io.BytesIO()
        torch.save(cache.state_dict(), buf)
        buf.seek(0)
        restored = model.init_cache(3)
        restored.load_state_dict(torch.load(buf, weights_only=True))
        rest, _ = model(ids[:, 6:], restored)
        again, _ = model(ids[:, 6:], cache)
    assert torch.equal(rest, again)
    close("restored continuation", full[:, 6:], rest)


@pytest.mark.parametrize("stack", list(STACKS))
def test_left_padded_batch_and_packed_documents(stack):
    model = make(stack)
    prompts = [ids_of(1, n, seed=n)[0] for n in (9, 2, 6)]
    T = 9
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    with torch.no_grad():
        logits, cache = model(ids, model.init_cache(3), attention_mask=mask)
        assert isinstance(cache, PaddedCache)
        step, _ = model(torch.full((3, 1), 5), cache)
        for i, p in enumerate(prompts):
            alone, c = model(p[None], model.init_cache(1))
            close(f"row {i}", alone[0], logits[i, T - len(p):])
            close(f"row {i} step", model(torch.full((1, 1), 5), c)[0][0], step[i])
        doc_ids = torch.tensor([[0] * 6 + [1] * 5, [2] * 11])
        docs = ids_of(2, 11, seed=3)
        out, _ = model(docs, document_ids=doc_ids)
        for b, s, e in ((0, 0, 6), (0, 6, 11), (1, 0, 11)):
            close(f"document ({b}, {s}:{e})", model(docs[b : b + 1, s:e])[0][0], out[b, s:e])


def test_hugging_face_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from mnemos.models.hf import MnemosHFConfig

    cfg = MnemosConfig.from_dict({**TINY, **STACKS["lm2"]})
    hf_cfg = MnemosHFConfig.from_mnemos(cfg)
    assert hf_cfg.lm2 == {"num_slots": N}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.to_mnemos() == cfg
    ids = ids_of(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    out = back.generate(ids[:, :3], do_sample=False, max_new_tokens=6)  # across two segment ends
    assert torch.equal(out, back.model.generate(ids[:, :3], 6))


def test_training_resumes_bit_exactly(tmp_path):
    check_training_resumes_bit_exactly(tmp_path, ["model.variant=lm2", "model.lm2.num_slots=4"],
                                       "model.lm2.num_slots=8", "model.lm2.num_slots")


# ----------------------------------------------------------------------------------------------------------------------
# the protocol


def test_a_stack_without_relays_takes_the_plain_path(monkeypatch):
    model = make("lm2", variant="swa")
    assert model._relays == ()
    monkeypatch.setattr(MnemosLM, "_run_segments", lambda *a: pytest.fail("segment-major path taken"))
    with torch.no_grad():
        model(ids_of(2, 11))
    assert make("hybrid")._relays == (0, 2)
    assert [b.mixer.relay_first for b in make("hybrid").blocks if isinstance(b.mixer, LM2Layer)] == [True, False]


def test_a_hybrid_with_mom_averages_its_aux_loss_over_the_pieces():
    torch.manual_seed(0)
    model = MnemosLM(MnemosConfig.from_dict({**TINY, "variant": "hybrid", "n_layers": 2, "layers": ["lm2", "mom"]}))
    ids = ids_of(2, 11)
    with torch.no_grad():
        model(ids)
        total = model.aux_loss()
        cache, parts = model.init_cache(2), []
        for a, b in ((0, 4), (4, 8), (8, 11)):  # the segments
            model(ids[:, a:b], cache)
            parts.append(model.aux_loss() * (b - a) / 11)
    close("aux loss", sum(parts), total, 1e-6)


def test_bad_relays_are_errors():
    model = make("lm2")
    layer, second = model.blocks[0].mixer, model.blocks[1].mixer
    x = torch.randn(1, 3, 16, dtype=F64)
    state = layer.init_state(1)
    _, state, handed = layer(x, state)
    with pytest.raises(ValueError, match="inside one segment of 4 tokens"):
        layer(x, state)  # positions 3..5 cross the segment's end
    with pytest.raises(ValueError, match="reads the bank the previous LM2 block handed on"):
        second(x)
    with pytest.raises(ValueError, match=r"handed must be .* \[B, >= 3, 16\]"):
        second(x, None, handed[:, :2])
    with pytest.raises(RuntimeError, match="only the first LM2 block"):
        second.carry(second.init_state(1), handed)
