"""The memory layer with every rule of the family (issue 14, models and configs): the config's rule and axes resolve to
one MemoryRule, the layer runs it with the gates it needs (delta for huber, gamma for an Omega window) and reads the
memory through its effective weights, streams and decodes exactly, and old configs build today's Titans layer.

Tiny shapes in float64; every rule other than Titans' runs on the op's reference path, so sizes stay small.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnemos.layers import MemorySettings, NeuralMemory
from mnemos.layers.neural_memory import DELTA_MIN
from mnemos.models import MnemosConfig, MnemosLM, saved_model_config
from mnemos.ops import RULES, MemoryRule, effective_weights, memory_read, neural_memory
from mnemos.testing import assert_close

F64 = torch.float64
PRESETS = tuple(RULES)
# the memory.* keys added with the rule (a config saved before them has none)
RULE_KEYS = ("rule", "loss", "p", "retention", "lq", "softmax_scale", "softmax_dim", "optimizer", "ns_steps", "window",
             "momentum", "poly_degree")


def make_layer(rule="titans", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=8, heads=2, depth=2, expansion=2, chunk_size=3, rule=rule)
    cfg.update(kw)
    layer = NeuralMemory(**cfg).double()
    with torch.no_grad():  # non-trivial gates, so that every one of them matters
        for proj in (layer.to_gates, layer.to_delta, layer.to_gamma):
            if proj is not None:
                proj.bias.add_(0.3 * torch.randn_like(proj.bias))
                proj.weight.add_(0.3 * torch.randn_like(proj.weight))
    return layer


def x_of(B, T, dim=8, seed=1):
    return torch.randn(B, T, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# the layer runs its rule


@pytest.mark.parametrize("preset", PRESETS)
def test_the_layer_runs_its_rule_with_the_gates_it_needs(preset):
    """The layer's output is the op's (reference) with the preset's rule, its projections and gates: delta exactly
    for huber, gamma exactly for a window above 1, eta = 0 without momentum."""
    rule = RULES[preset]
    momentum = preset not in ("moneta", "yaad", "memora")
    layer = make_layer(preset, momentum=momentum)
    assert layer.memory_rule == rule
    assert (layer.to_delta is not None) == (rule.loss == "huber")
    assert (layer.to_gamma is not None) == (rule.window > 1)
    assert layer.to_gates.out_features == (3 if momentum else 2) * layer.heads
    x = x_of(2, 7)
    y, _ = layer(x)
    q, k, v, theta, eta, alpha, *_ = layer._project(x, None)
    gates = layer._rule_gates(x)
    assert set(gates) == {n for n, on in (("delta", rule.loss == "huber"), ("gamma", rule.window > 1)) if on}
    assert momentum or torch.equal(eta, torch.zeros_like(eta))
    assert layer.poly_log_coef is None and q.shape[-1] == layer.key_dim == layer.head_dim
    o, _ = neural_memory(q, k, v, theta, eta, alpha, tuple(layer.memory), rule=rule, chunk_size=3,
                         normalize_step=preset in ("titans", "linear_attention", "deltanet"), impl="reference",
                         **gates)
    assert_close(f"{preset} layer output", layer._output(x, o), y, 1e-12)
    if rule != RULES["titans"]:  # and it is not Titans' output (deltanet has Titans' axes)
        titans = make_layer("titans", momentum=momentum)
        titans.load_state_dict({k: v for k, v in layer.state_dict().items() if k in titans.state_dict()})
        assert (titans(x)[0] - y).abs().max() > 1e-6, f"{preset}: the layer ran Titans' rule"


def test_titans_layer_has_todays_parameters():
    layer = NeuralMemory(8, 2)
    assert layer.memory_rule == RULES["titans"] and layer.momentum
    assert [n for n, _ in layer.named_parameters()] == [
        "to_qkv.weight", "conv.weight", "to_gates.weight", "to_gates.bias", "memory.0", "memory.1",
        "to_out_gate.weight", "out_norm.weight", "out_proj.weight"]
    assert layer.to_gates.out_features == 6


def test_delta_is_positive_and_gamma_in_unit_interval_by_construction():
    layer = make_layer("titans", loss="huber", window=3)
    x = 1e3 * x_of(2, 5)  # projections far out in both directions
    for bias in (-1e4, 0.0, 1e4):
        with torch.no_grad():
            layer.to_delta.bias.fill_(bias)
            layer.to_gamma.bias.fill_(bias)
        g = layer._rule_gates(x)
        assert g["delta"].shape == g["gamma"].shape == (2, 5, 2)
        assert bool((g["delta"] >= DELTA_MIN).all()) and bool(torch.isfinite(g["delta"]).all()), bias
        assert bool(((g["gamma"] >= 0) & (g["gamma"] <= 1)).all()), bias
    # at init: delta = 1 and gamma = 1 / window (a token's weights over the writes that fit it sum to 1)
    fresh = NeuralMemory(8, 2, loss="huber", window=4).double()
    with torch.no_grad():
        fresh.to_delta.weight.zero_()
        fresh.to_gamma.weight.zero_()
    g = fresh._rule_gates(x_of(1, 3))
    assert_close("delta at init", g["delta"], torch.ones_like(g["delta"]), 1e-6)
    assert_close("gamma at init", g["gamma"], torch.full_like(g["gamma"], 0.25), 1e-6)


def test_moneta_starts_from_the_memory_titans_starts_from():
    """lq retention: the learned accumulator A_0 is initialised so that the memory reads F(A_0) = Titans' W_0."""
    torch.manual_seed(0)
    titans = NeuralMemory(8, 2, depth=2)
    torch.manual_seed(0)
    moneta = NeuralMemory(8, 2, depth=2, rule="moneta")
    for a, w in zip(effective_weights(tuple(moneta.memory), moneta.memory_rule), titans.memory, strict=True):
        assert_close("F(A_0)", a, w, 1e-5)
    assert (moneta.memory[0] - titans.memory[0]).abs().max() > 1e-3  # A_0 itself is not W_0


def test_polynomial_features_give_the_taylor_kernel():
    """Atlas' feature map: phi(q) . phi(k) = sum_i a_i (q . k)^i with a_i = 1 / i! at init (learned, per head)."""
    layer = make_layer("atlas", poly_degree=3, residual=False)
    H, D = layer.heads, layer.head_dim
    assert layer.key_dim == 1 + D + D**2 + D**3 and layer.memory[0].shape == (H, 2 * D, layer.key_dim)
    assert_close("a_i at init", layer.poly_log_coef.exp(), torch.tensor([1.0, 1.0, 0.5, 1 / 6]).expand(H, 4), 1e-6)
    with torch.no_grad():
        layer.poly_log_coef.add_(0.3 * torch.randn_like(layer.poly_log_coef))
    q, k = torch.randn(2, 5, H, D, dtype=F64), torch.randn(2, 5, H, D, dtype=F64)
    a, s = layer.poly_log_coef.exp(), (q * k).sum(-1)  # [H, 4], [2, 5, H]
    kernel = sum(a[:, i] * s**i for i in range(4))
    assert_close("phi(q).phi(k)", kernel, (layer._poly_features(q) * layer._poly_features(k)).sum(-1), 1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# streaming and decoding


@pytest.mark.parametrize("preset", [*PRESETS, "atlas+poly"])
def test_streams_cut_anywhere_and_decoding_equal_one_call(preset):
    poly = dict(poly_degree=2, residual=False) if preset == "atlas+poly" else {}
    preset = preset.removesuffix("+poly")
    layer = make_layer(preset, momentum=preset != "yaad", **poly)
    x = x_of(2, 10)
    y, final = layer(x)
    # pieces from init_state (window tokens of weight 0 at the start), cut mid-chunk and inside the window
    state, outs = layer.init_state(2, dtype=F64), []
    for a, b in zip((0, 1, 5), (1, 5, 10), strict=True):
        o, state = layer(x[:, a:b], state)
        outs.append(o)
    assert_close(f"{preset} pieces", y, torch.cat(outs, 1), 1e-12)
    for i, (w, s) in enumerate(zip(final.memory.weights, state.memory.weights, strict=True)):
        assert_close(f"{preset} weights[{i}]", w, s, 1e-12)
    for i, (w, s) in enumerate(zip(final.memory.window, state.memory.window, strict=True)):
        assert_close(f"{preset} window[{i}]", w, s, 1e-12)
    # the state has one shape from the first token on (the Cache's template): w - 1 window tokens, gamma 0 at start
    n = layer.memory_rule.window - 1
    for s in (layer.init_state(2, dtype=F64).memory, state.memory):
        assert len(s.window) == (0 if n == 0 else 3 + (layer.to_delta is not None))
        assert all(t.shape[:2] == (2, n) for t in s.window)
    assert n == 0 or not layer.init_state(2).memory.window[2].any()
    # without momentum (eta = 0) the state carries no S: the carried S never reaches a later token
    for s in (layer.init_state(2).memory, state.memory, final.memory):
        assert len(s.momentum) == (len(s.weights) if layer.momentum else 0)
    # pieces from no state (the first call's state carries fewer window tokens)
    o1, s1 = layer(x[:, :2])
    o2, _ = layer(x[:, 2:], s1)
    assert_close(f"{preset} two calls", y, torch.cat([o1, o2], 1), 1e-12)
    # decoding, token by token
    state, steps = layer.init_state(2, dtype=F64), []
    for t in range(x.shape[1]):
        o, state = layer.step(x[:, t], state)
        steps.append(o)
    assert_close(f"{preset} decoded", y, torch.stack(steps, 1), 1e-12)


def test_a_state_without_momentum_continues_from_zero_surprise():
    """The op reads an empty ``initial_state.momentum`` as S = 0, so a momentum-free state (``momentum=False``, or
    a delta rule's) continues exactly as the same state with zero momentum; with eta = 0 any S gives the same."""
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 7, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=F64) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    theta, alpha = 0.3 * torch.rand(B, T, H, generator=g, dtype=F64), 0.2 * torch.rand(B, T, H, generator=g, dtype=F64)
    eta = 0.8 * torch.rand(B, T, H, generator=g, dtype=F64)
    W = (torch.randn(B, H, 6, D, generator=g, dtype=F64) / 2, torch.randn(B, H, D, 6, generator=g, dtype=F64) / 2)
    for e in (eta, torch.zeros_like(eta)):
        o1, st = neural_memory(q[:, :3], k[:, :3], v[:, :3], theta[:, :3], e[:, :3], alpha[:, :3], W, chunk_size=2,
                               output_final_state=True)
        zero = dataclasses.replace(st, momentum=tuple(torch.zeros_like(s) for s in st.momentum))
        noisy = dataclasses.replace(st, momentum=tuple(torch.randn_like(s) for s in st.momentum))
        rest = (q[:, 3:], k[:, 3:], v[:, 3:], theta[:, 3:], e[:, 3:], alpha[:, 3:])
        o_zero, _ = neural_memory(*rest, initial_state=zero, chunk_size=2)
        o_empty, _ = neural_memory(*rest, initial_state=dataclasses.replace(st, momentum=()), chunk_size=2)
        assert_close("empty momentum == zero momentum", o_zero, o_empty, 0.0)
        o_noisy, _ = neural_memory(*rest, initial_state=noisy, chunk_size=2)
        if e is eta:  # the momentum matters when eta > 0 (the test can fail) ...
            assert (o_noisy - o_zero).abs().max() > 1e-3
        else:  # ... and not at all when eta = 0
            assert_close("eta = 0: S is no state", o_zero, o_noisy, 1e-13)


def test_retrieve_and_stats_read_the_effective_weights():
    layer = make_layer("memora")
    x = x_of(2, 6)
    _, state = layer(x)
    q = layer._project(x, state.conv)[0]
    read = dict(residual=layer.residual, activation=layer.activation)
    W = effective_weights(state.memory.weights, layer.memory_rule)
    assert_close("retrieve", layer.retrieve(x, state), memory_read(q, W, **read), 1e-12)
    assert (layer.retrieve(x, state) - memory_read(q, state.memory.weights, **read)).abs().max() > 1e-3
    layer.record_stats = True
    _, end = layer(x)
    norm = sum(w.pow(2).sum((-2, -1)) for w in effective_weights(end.memory.weights, layer.memory_rule)).sqrt()
    assert abs(layer.last_stats["memory_norm"] - norm.mean().item()) < 1e-6  # stats are float32


def test_the_rule_gates_and_features_get_gradients():
    layer = make_layer("titans", loss="huber", window=2, poly_degree=2, residual=False)
    y, _ = layer(x_of(2, 6))
    (y * torch.randn_like(y)).sum().backward()
    for proj in (layer.to_delta, layer.to_gamma):
        assert proj.weight.grad.abs().sum() > 0 and proj.bias.grad.abs().sum() > 0
    assert bool((layer.poly_log_coef.grad != 0).all())


# ----------------------------------------------------------------------------------------------------------------------
# models and configs


SMALL = dict(vocab_size=16, d_model=8, n_layers=1, n_heads=2, window=3, segment_len=4, num_persistent=1, init_std=0.5)


@pytest.mark.parametrize("variant,memory", [
    ("mac", {"rule": "memora"}),  # MAC's retrieval reads F(A) of the segment-start memory
    ("mag", {"rule": "yaad"}),
    ("mal", {"rule": "atlas", "window": 2}),
    ("lmm", {"rule": "moneta", "momentum": False, "p": 2.5}),
    ("mac", {"rule": "atlas", "poly_degree": 2, "residual": False}),  # retrieval through the features
])
def test_every_titans_model_takes_every_rule(variant, memory):
    torch.manual_seed(0)
    cfg = MnemosConfig.from_dict({**SMALL, "variant": variant, "memory": {"depth": 2, "expansion": 2, "chunk_size": 3,
                                                                          **memory}})
    model = MnemosLM(cfg).double().eval()
    rule = cfg.memory.memory_rule
    assert all(b.mixer.memory.memory_rule == rule for b in model.blocks)
    ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)
        cache, steps = model.init_cache(2), []
        for t in range(ids.shape[1]):
            logits, cache = model(ids[:, t : t + 1], cache)
            steps.append(logits)
        assert_close(f"{variant} {memory} decoded", full, torch.cat(steps, 1), 1e-10)
        cache = model.init_cache(2)
        a, cache = model(ids[:, :5], cache)
        b, cache = model(ids[:, 5:], cache)
        assert_close(f"{variant} {memory} pieces", full, torch.cat([a, b], 1), 1e-10)


def test_a_preset_and_overrides_resolve_to_one_rule():
    m = MnemosConfig(variant="lmm", memory={"rule": "moneta", "p": 4, "window": 2}).memory
    assert m.memory_rule == MemoryRule(loss="lp", p=4.0, retention="lq", lq=4.0, window=2)
    assert MnemosConfig(memory={"loss": "dot"}).memory.memory_rule == RULES["linear_attention"]
    assert MemorySettings(rule="atlas", optimizer="momentum", window=1).memory_rule == RULES["titans"]


def test_a_rule_variant_fixes_its_rule_and_reads_the_axes():
    def logits(**memory):
        torch.manual_seed(0)
        cfg = MnemosConfig.from_dict({**SMALL, "variant": "memora", "memory": {"depth": 1, "chunk_size": 2, **memory}})
        model = MnemosLM(cfg).double().eval()
        assert model.blocks[0].mixer.memory.memory_rule.retention == "kl"
        assert not model.blocks[0].mixer.memory.momentum
        with torch.no_grad():
            return model(torch.arange(6)[None])[0]

    ref = logits()
    assert torch.equal(ref, logits(rule="yaad", momentum=True))  # not among its reads
    assert torch.equal(ref, logits(impl="torch"))
    assert not torch.equal(ref, logits(softmax_dim="all"))


@pytest.mark.parametrize("memory,error,match", [
    ({"rule": "titan"}, ValueError, r"model.memory.rule must be one of the presets \('titans'"),
    ({"rule": 3}, TypeError, "model.memory.rule must be of type str"),
    ({"loss": "l1"}, ValueError, "model.memory.loss must be one of"),
    ({"p": 0.5}, ValueError, "model.memory.p must be a finite real number >= 1, got 0.5"),
    ({"lq": 0}, ValueError, "model.memory.lq must be a finite real number >= 1"),
    ({"softmax_scale": 0.0}, ValueError, "model.memory.softmax_scale must be a finite real number > 0"),
    ({"softmax_dim": "col"}, ValueError, "model.memory.softmax_dim must be one of"),
    ({"retention": "l1"}, ValueError, "model.memory.retention must be one of"),
    ({"optimizer": "adam"}, ValueError, "model.memory.optimizer must be one of"),
    ({"ns_steps": -1}, ValueError, "model.memory.ns_steps must be an int >= 0"),
    ({"window": 0}, ValueError, "model.memory.window must be an int >= 1, got 0"),
    ({"window": 2.0}, TypeError, "model.memory.window must be of type int"),
    ({"momentum": "no"}, TypeError, "model.memory.momentum must be of type bool"),
    ({"rule": "memora", "impl": "triton"}, ValueError, "model.memory.impl='triton' runs only the rules its path "
                                                        "covers: the Triton kernels cover"),
    ({"forget_bias": float("nan")}, ValueError, "model.memory.forget_bias must be a finite number, got nan"),
    ({"forget_bias": True}, TypeError, "model.memory.forget_bias must be of type float, got True"),
    ({"poly_degree": -1}, ValueError, "model.memory.poly_degree must be an int >= 0, got -1"),
    ({"poly_degree": 2}, ValueError, "model.memory.poly_degree=2 needs model.memory.residual=False"),
], ids=lambda x: str(x) if isinstance(x, dict) else None)
def test_bad_rule_config_values_name_the_key(memory, error, match):
    with pytest.raises(error, match=match):
        MnemosConfig(variant="lmm", memory=memory)


def test_impl_torch_runs_every_rule_on_the_chunked_path():
    for rule in ("moneta", "memora", "yaad", "atlas"):
        assert MnemosConfig(variant="lmm", memory={"rule": rule, "impl": "torch"}).memory.impl == "torch"


def test_forget_bias_sets_the_forgetting_gates_start():
    H = 2
    default, long = NeuralMemory(8, H), NeuralMemory(8, H, forget_bias=-12.0)
    assert torch.equal(default.to_gates.bias[-H:], torch.full((H,), -8.0))  # the initialisation before the key
    assert torch.equal(long.to_gates.bias[-H:], torch.full((H,), -12.0))
    x = torch.randn(1, 5, 8)
    with torch.no_grad():  # alpha = sigmoid(bias + w.x) with small w: ~6e-6 per token
        alpha = long._project(x, None)[5]
    assert alpha.max() < 1e-5 and alpha.min() > 1e-6


def test_bad_rule_keywords_of_the_layer_name_the_key():
    with pytest.raises(ValueError, match="^p must be a finite real number >= 1"):
        NeuralMemory(8, 2, rule="moneta", p=0.0)
    with pytest.raises(ValueError, match="^rule must be one of the presets"):
        NeuralMemory(8, 2, rule="miras")
    with pytest.raises(TypeError, match="^momentum must be a bool"):
        NeuralMemory(8, 2, momentum=0)


def test_an_old_config_without_the_rule_keys_builds_todays_titans_model():
    new = MnemosConfig(**SMALL, variant="mac").to_dict()
    old = {**new, "memory": {k: v for k, v in new["memory"].items() if k not in RULE_KEYS}}
    assert set(new["memory"]) - set(old["memory"]) == set(RULE_KEYS)
    cfg = MnemosConfig.from_dict(saved_model_config(old))
    assert cfg.memory.memory_rule == RULES["titans"] and cfg.memory.momentum is True
    assert dataclasses.asdict(cfg.memory) == {**saved_model_config(old)["memory"],
                                              **{k: new["memory"][k] for k in RULE_KEYS}}
    torch.manual_seed(0)
    a = MnemosLM(cfg)
    torch.manual_seed(0)
    b = MnemosLM(MnemosConfig.from_dict(saved_model_config(new)))  # today's config, saved with every key
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 16, (1, 7))
    with torch.no_grad():
        assert torch.equal(a(ids)[0], b(ids)[0])


@pytest.mark.parametrize("variant,memory", [("yaad", {}), ("lmm", {"rule": "atlas", "poly_degree": 2, "residual": False})])
def test_a_rule_model_survives_the_hugging_face_round_trip(variant, memory, tmp_path):
    pytest.importorskip("transformers", reason="the Hugging Face wrapper needs transformers (optional dependency)")
    from mnemos.models.hf import MnemosForCausalLM, MnemosHFConfig

    torch.manual_seed(0)
    model = MnemosForCausalLM(MnemosHFConfig(**SMALL, variant=variant, memory={"chunk_size": 3, **memory})).eval()
    model.save_pretrained(tmp_path)
    loaded = MnemosForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.to_mnemos() == model.config.to_mnemos()
    rule = model.model.blocks[0].mixer.memory.memory_rule
    assert loaded.model.blocks[0].mixer.memory.memory_rule == rule != RULES["titans"]
    ids = torch.randint(0, 16, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
