"""MoM (Mixture-of-Memories, mnemos.models.mom), in float64 at tiny sizes: its reduction to Gated DeltaNet, the
untouched memories, the symmetry of its memories, the load-balancing loss against a brute force, the chunked delta
rule against the token loop, its config section, and the training loop adding the auxiliary loss.

The registry-driven invariants (decode == forward, pieces == one call, causality, batch independence, cache round
trip, HF round trip) run on ``mom`` in test_models.py, test_registry.py and test_hf.py like every variant.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mnemos.models import LinearRecurrence, MixtureOfMemories, MnemosConfig, MnemosLM, MoMState
from mnemos.models.config import variant_reads
from mnemos.models.mom import load_balancing_loss

F64 = torch.float64
D_MODEL, HEADS = 8, 2


def mixer(seed: int = 0, **kw) -> MixtureOfMemories:
    torch.manual_seed(seed)
    kw = {"chunk_size": 4, **kw}  # chunks of 4 over T = 11..23: routed and unrouted tokens share chunks
    return MixtureOfMemories(D_MODEL, HEADS, **kw).to(F64)


def inputs(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D_MODEL, dtype=F64, generator=torch.Generator().manual_seed(seed))


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float = 1e-12) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (ref - out).abs().max().item()
    assert err <= tol, f"{name}: max |ref - out| = {err:.3e} > {tol:.0e}"


# ----------------------------------------------------------------------------------------------------------------------
# reductions and exactness


def test_one_memory_top_one_without_shared_memory_is_gated_deltanet():
    """M = 1, k = 1, no shared memory: the router's softmax is 1, every token is routed with weight 1, and the layer is
    Gated DeltaNet with the same weights (same q|k|v layout, conv, gates, output stage), outputs and states."""
    mom = mixer(num_memories=1, top_k=1, shared_memory=False, chunk_size=64)
    torch.manual_seed(5)
    gdn = LinearRecurrence(D_MODEL, HEADS, "gated_deltanet").to(F64)
    with torch.no_grad():
        for name in ("to_qkv.weight", "conv.weight", "to_beta.weight", "to_beta.bias", "to_decay.weight",
                     "to_out_gate.weight", "out_norm.weight", "out_proj.weight"):
            mom.get_parameter(name).copy_(gdn.get_parameter(name))
        mom.A_log.copy_(gdn.A_log[None])
        mom.dt_bias.copy_(gdn.dt_bias[None])
    x = inputs(2, 23)
    with torch.no_grad():
        ref, ref_state = gdn(x)
        out, state = mom(x)
        assert_close("output", ref, out)
        assert_close("state", ref_state.memory.weights[0], state.memories[:, 0])
        assert state.shared is None
        # carried across calls too
        a, s = mom(x[:, :9], mom.init_state(2))
        b, s = mom(x[:, 9:], s)
        assert_close("pieces", ref, torch.cat([a, b], 1))
        assert_close("conv state", ref_state.conv, s.conv)


def test_unrouted_memories_are_bit_identical_after_a_step():
    """Decoding one token at a time: every memory the token was not routed to is bit-for-bit what it was; the
    routed ones and the shared one change."""
    mom = mixer(num_memories=4, top_k=2)
    x = inputs(3, 12)
    with torch.no_grad():
        _, state = mom(x[:, :5], mom.init_state(3))  # non-zero memories
        unrouted = changed = 0
        for t in range(5, 12):
            _, routed, _ = mom.route(x[:, t : t + 1])  # [B, 1, M]
            _, new = mom(x[:, t : t + 1], state)
            for b, m in itertools.product(range(3), range(4)):
                same = torch.equal(new.memories[b, m], state.memories[b, m])
                was = bool(routed[b, 0, m])
                assert same != was, f"token {t}, stream {b}, memory {m}: routed {was}, unchanged {same}"
                unrouted += same
            changed += not torch.equal(new.shared, state.shared)
            state = new
    assert unrouted == 3 * 7 * 2 and changed == 7


def test_a_memory_no_token_is_routed_to_is_bit_identical_through_chunks():
    """A routing that never picks memory 0 over 23 tokens (chunks of 4): memory 0 comes back bit-identical from the
    chunked delta rule, the others do not."""
    mom = mixer(num_memories=3, top_k=2)
    x = inputs(2, 23)
    with torch.no_grad():
        _, state = mom(x[:, :6], mom.init_state(2))
        probs = torch.full((2, 17, 3), 1 / 3, dtype=F64)
        routed = torch.tensor([False, True, True]).expand(2, 17, 3)
        weights = torch.tensor([0.0, 0.3, 0.7], dtype=F64).expand(2, 17, 3)
        mom.route = lambda _: (weights, routed, probs)  # a constructed routing
        _, new = mom(x[:, 6:], state)
    assert torch.equal(new.memories[:, 0], state.memories[:, 0])
    assert not torch.equal(new.memories[:, 1], state.memories[:, 1])
    assert not torch.equal(new.memories[:, 2], state.memories[:, 2])


# (num_memories, top_k, shared_memory, T, cut, chunk_size): chunks that hold routed and unrouted tokens, cuts inside
# chunks, every memory routed (k = M), a single token
CONFIGS = [(4, 2, True, 13, 6, 4), (3, 1, False, 17, 5, 3), (2, 2, True, 9, 4, 2), (5, 3, True, 11, 1, 64),
           (1, 1, True, 7, 3, 4), (4, 1, False, 1, 0, 4)]


@pytest.mark.parametrize("M,k,shared,T,cut,chunk", CONFIGS, ids=lambda v: str(v))
def test_chunked_equals_the_token_loop_with_gradients(M, k, shared, T, cut, chunk):
    """The memories as extra heads of the chunked delta rule == the token-by-token reference, the stream cut in two
    calls: outputs, states and every parameter's gradient."""
    x = inputs(2, T)
    results = []
    for impl in ("chunked", "reference"):
        mom = mixer(num_memories=M, top_k=k, shared_memory=shared, chunk_size=chunk, impl=impl)
        ys, state = [], mom.init_state(2)
        for part in (x[:, :cut], x[:, cut:]):
            if part.shape[1]:
                y, state = mom(part, state)
                ys.append(y)
        (torch.cat(ys, 1) * inputs(2, T, seed=7)).sum().backward()
        results.append((torch.cat(ys, 1), state, {n: p.grad for n, p in mom.named_parameters()}))
    (y_c, s_c, g_c), (y_r, s_r, g_r) = results
    assert_close("output", y_r, y_c)
    assert_close("memories", s_r.memories, s_c.memories)
    if shared:
        assert_close("shared", s_r.shared, s_c.shared)
    for name in g_r:
        assert g_c[name] is not None, f"{name} gets no gradient"
        assert_close(f"grad {name}", g_r[name], g_c[name], 1e-11)
    if T > 1 and k < M:
        assert g_c["router.weight"].abs().sum() > 0, "the router gets no gradient from the output"


def test_gradcheck():
    mom = mixer(num_memories=3, top_k=2, chunk_size=2)
    x = inputs(1, 5).requires_grad_()
    state = mom.init_state(1)
    assert torch.autograd.gradcheck(lambda x: mom(x, state)[0], (x,), eps=1e-6, atol=1e-6)


def test_permuting_the_memories_with_the_router_columns_leaves_the_outputs_unchanged():
    M, S, H, D = 4, 5, HEADS, D_MODEL // HEADS
    mom, perm = mixer(num_memories=M), [2, 0, 3, 1]  # new memory j is old memory perm[j]; the shared one stays last
    other = mixer(num_memories=M, seed=3)
    slots = perm + [M]
    qkv = mom.to_qkv.weight.view(1 + 2 * S, H * D, D_MODEL)  # [q | k_1..k_S | v_1..v_S] blocks
    rows = [0] + [1 + m for m in slots] + [1 + S + m for m in slots]
    conv = mom.conv.weight.view(1 + 2 * S, H * D, 1, -1)
    with torch.no_grad():
        other.load_state_dict(mom.state_dict())
        other.router.weight.copy_(mom.router.weight[perm])
        other.to_qkv.weight.copy_(qkv[rows].reshape_as(mom.to_qkv.weight))
        other.conv.weight.copy_(conv[rows].reshape_as(mom.conv.weight))
        for name in ("to_beta.weight", "to_beta.bias", "to_decay.weight"):
            p = mom.get_parameter(name)
            other.get_parameter(name).copy_(p.view(S, H, *p.shape[1:])[slots].reshape_as(p))
        other.A_log.copy_(mom.A_log[slots])
        other.dt_bias.copy_(mom.dt_bias[slots])
        x = inputs(2, 19)
        y, s = mom(x)
        y_p, s_p = other(x)
    assert (y - mixer(num_memories=M, seed=3)(x)[0]).abs().max() > 1e-3  # the check can fail: other weights differ
    assert_close("output", y, y_p)
    assert_close("memories", s.memories[:, perm], s_p.memories)
    assert_close("shared", s.shared, s_p.shared)
    assert_close("aux loss", mom.aux_loss, other.aux_loss)


def test_the_output_is_the_routing_weighted_sum_of_the_reads_plus_the_shared_read():
    """After a decoding step: y = out_proj(RMSNorm(sum_m g^m S^m q + S^s q) * silu(W_o x)), from the new states."""
    mom = mixer(num_memories=4, top_k=2)
    x = inputs(2, 8)
    with torch.no_grad():
        _, state = mom(x[:, :7], mom.init_state(2))
        y, new = mom(x[:, 7:], state)
        weights, _, _ = mom.route(x[:, 7:])  # [B, 1, M]
        q = mom.features(x[:, 7:], state.conv)[0][:, 0]  # [B, H, D]
        reads = torch.einsum("bmhvk,bhk->bmhv", new.memories, q)  # [B, M, H, D]
        o = torch.einsum("bm,bmhv->bhv", weights[:, 0], reads) + torch.einsum("bhvk,bhk->bhv", new.shared, q)
        gate = mom.to_out_gate(x[:, 7:]).view(2, 1, HEADS, -1)
        expected = mom.out_proj(mom.out_norm(o[:, None], gate).reshape(2, 1, D_MODEL))
    assert_close("output", expected, y)


def test_routing_weights():
    mom = mixer(num_memories=5, top_k=3)
    weights, routed, probs = mom.route(inputs(2, 9))
    assert torch.equal(routed.sum(-1), torch.full((2, 9), 3))
    assert bool((weights[routed] > 0).all()) and bool((weights[~routed] == 0).all())
    assert_close("weights sum", torch.ones(2, 9, dtype=F64), weights.sum(-1))
    top = probs.topk(3, -1).values
    assert_close("renormalised", top / top.sum(-1, keepdim=True), weights.sort(-1, descending=True).values[..., :3])


# ----------------------------------------------------------------------------------------------------------------------
# the load-balancing loss


def brute_force_balance(probs: list[list[float]], k: int) -> float:
    """M * sum_m (tokens routed to m / N) * (mean probability of m), routing each token to its k largest."""
    N, M = len(probs), len(probs[0])
    counts = [0] * M
    for row in probs:
        for m in sorted(range(M), key=lambda j: -row[j])[:k]:
            counts[m] += 1
    return M * sum(counts[m] / N * sum(row[m] for row in probs) / N for m in range(M))


def test_load_balancing_loss_on_a_constructed_routing():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.1, 0.4], [0.7, 0.1, 0.15, 0.05],
                          [0.26, 0.2, 0.3, 0.24], [0.05, 0.05, 0.1, 0.8]], dtype=F64)  # no ties at the k-th
    routed = torch.zeros(6, 4, dtype=torch.bool).scatter(-1, probs.topk(2, -1).indices, True)
    expected = brute_force_balance(probs.tolist(), 2)
    assert abs(load_balancing_loss(probs, routed).item() - expected) < 1e-14
    # by hand: memory counts (4, 2, 4, 2) / 6, mean probabilities (2.01, 1.35, 0.95, 1.69) / 6 -> 4 * 17.92 / 36
    assert abs(expected - 4 * 17.92 / 36) < 1e-12
    # a uniform routing costs k
    uniform = torch.full((4, 4), 0.25, dtype=F64)
    balanced = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(2.0, abs=1e-14)


def test_the_layer_stores_its_scaled_aux_loss_and_the_router_learns_from_it():
    mom = mixer(num_memories=4, top_k=2, aux_loss_scale=0.5)
    x = inputs(3, 7)
    mom(x)
    probs = torch.softmax(x @ mom.router.weight.T, -1)  # [B, T, M]
    expected = 0.5 * brute_force_balance(probs.detach().reshape(-1, 4).tolist(), 2)
    assert abs(mom.aux_loss.item() - expected) < 1e-13
    mom.aux_loss.backward()
    assert mom.router.weight.grad.abs().sum() > 0
    off = mixer(aux_loss_scale=0.0)
    assert off.aux_loss is None  # before the first call
    off(x)
    assert off.aux_loss.item() == 0.0


def test_the_model_sums_its_layers_aux_losses():
    cfg = dict(vocab_size=32, d_model=16, n_layers=3, n_heads=2)
    model = MnemosLM(MnemosConfig(variant="mom", **cfg)).to(F64)
    assert model.aux_loss() is None  # no forward yet
    model(torch.randint(0, 32, (2, 9)))
    parts = [b.mixer.aux_loss for b in model.blocks]
    assert_close("aux loss", torch.stack(parts).sum(), model.aux_loss())
    assert 1e-3 <= model.aux_loss().item() <= 3 * 4 * 1e-3  # per layer: scale * [k, M] (k = 2 at balance)
    gdn = MnemosLM(MnemosConfig(variant="gated_deltanet", **cfg))
    gdn(torch.randint(0, 32, (2, 9)))
    assert gdn.aux_loss() is None


def test_the_training_loop_adds_the_aux_loss(tmp_path):
    """The loop backpropagates loss + aux: the logged loss of step 1 is the language-model loss alone (the same
    whatever the aux scale), the step-2 loss differs with a large scale."""
    from mnemos.train.config import load_config
    from mnemos.train.loop import train

    base = ["model.variant=mom", "model.vocab_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
            "task.vocab_size=32", "task.seq_len=16", "task.num_kv_pairs=2", "task.train_examples=32",
            "task.eval_examples=8", "run.batch_size=4", "run.eval_every=1000", "run.progress=false",
            "run.steps=2", "optim.lr=1e-2", "optim.warmup_steps=0"]
    losses = [train(load_config(None, base + [f"model.mom.aux_loss_scale={s}", f"run.out_dir={tmp_path / str(i)}"]))
              .train_losses for i, s in enumerate((0.0, 10.0))]
    assert losses[1][0] == losses[0][0] and losses[1][1] != losses[0][1]


def test_the_hugging_face_loss_adds_the_aux_loss():
    pytest.importorskip("transformers")
    from mnemos.models.hf import MnemosForCausalLM, MnemosHFConfig

    torch.manual_seed(0)
    model = MnemosForCausalLM(MnemosHFConfig(variant="mom", vocab_size=32, d_model=16, n_layers=2, n_heads=2))
    ids = torch.randint(0, 32, (2, 9))
    out = model(ids, labels=ids, use_cache=False)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert model.model.aux_loss() > 0
    assert_close("loss", lm + model.model.aux_loss(), out.loss, 1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# config


def test_config_section_and_reads():
    cfg = MnemosConfig(variant="mom", vocab_size=32, mom={"num_memories": 3, "top_k": 3, "shared_memory": False})
    assert MnemosConfig.from_dict(cfg.to_dict()) == cfg
    small = MnemosConfig.from_dict({**cfg.to_dict(), "d_model": 16, "n_heads": 2, "n_layers": 1})
    mixer_ = MnemosLM(small).blocks[0].mixer
    assert (mixer_.num_memories, mixer_.top_k, mixer_.shared_memory) == (3, 3, False)
    with pytest.raises(ValueError, match=r"model\.mom\.top_k \(5\) must be at most model\.mom\.num_memories \(4\)"):
        MnemosConfig(variant="mom", mom={"top_k": 5})
    with pytest.raises(ValueError, match=r"model\.mom\.aux_loss_scale"):
        MnemosConfig(variant="mom", mom={"aux_loss_scale": -1.0})
    with pytest.raises(ValueError, match=r"unknown MoMConfig keys \['model\.mom\.topk'\]"):
        MnemosConfig(variant="mom", mom={"topk": 1})
    for key in ("mom.num_memories", "mom.top_k", "mom.shared_memory", "mom.aux_loss_scale"):
        assert variant_reads("mom", key) and not variant_reads("gated_deltanet", key) and not variant_reads("lmm", key)
    assert variant_reads("mom", "memory.conv_size")
    assert not variant_reads("mom", "memory.max_lr") and not variant_reads("mom", "window")


@pytest.mark.parametrize("change", [{"num_memories": 3}, {"top_k": 1}, {"shared_memory": False}])
def test_each_routing_field_changes_the_logits(change):
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))

    def logits(mom):
        torch.manual_seed(0)
        cfg = MnemosConfig(variant="mom", vocab_size=32, d_model=16, n_layers=1, n_heads=2, mom=mom)
        return MnemosLM(cfg).to(F64)(ids)[0]

    assert (logits({}) - logits(change)).abs().max() > 1e-6


def test_state_type_and_size():
    mom = mixer(num_memories=3, shared_memory=True, conv_size=3)
    s = mom.init_state(2)
    assert isinstance(s, MoMState) and s.memories.shape == (2, 3, 2, 4, 4) and s.shared.shape == (2, 2, 4, 4)
    assert s.conv.shape == (2, (1 + 2 * 4) * 8, 2)  # S = 4 memories, H D = 8, conv_size - 1 = 2
    assert mixer(shared_memory=False).init_state(1).shared is None
