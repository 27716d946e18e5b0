"""Mixers checked against independent formulas written here, not against the code paths they run on.

- DeltaNet and Gated DeltaNet (``ops.delta_rule``) == their token-by-token recurrences, and the memory rule with
  chunk 1 and the mapped gates == the same;
- linear attention (the dot-loss rule) == the explicit causal-masked formula ``tril(Q K^T) V``;
- MAC == a naive segment-by-segment construction (memory recomputed from scratch, dense per-query attention over
  the visible keys), and its attention mask checked by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from mnemos.layers import NeuralMemoryState
from mnemos.models import LinearRecurrence, MemoryAsContext, mac_attention_mask
from mnemos.models.baselines import GDN_MIN_DECAY
from mnemos.ops import MemoryState, delta_rule, neural_memory

F64 = torch.float64


def x_of(B, T, dim=32, seed=1):
    return torch.randn(B, T, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


def assert_max_err(name, ref, out, tol):
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (ref - out).abs().max().item()
    assert err <= tol, f"{name}: max |ref - out| = {err:.3e} > {tol:.1e}"


def make_recurrence(kind, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LinearRecurrence(32, 4, kind, chunk_size=kw.pop("chunk_size", 5), **kw).double()
    if kind == "gated_deltanet":  # spread the decays so that a matters (including a few near the floor)
        with torch.no_grad():
            layer.to_decay.weight.normal_(0, 1.0)
    return layer


# ----------------------------------------------------------------------------------------------------------------------
# linear baselines


def delta_recurrence(q, k, v, beta, a=None):
    """S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t; S [B, H, V, K], one token a time."""
    B, T, H, D = q.shape
    S = torch.zeros(B, H, D, D, dtype=q.dtype)
    eye = torch.eye(D, dtype=q.dtype)
    out = []
    for t in range(T):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]  # [B, H, D]
        bt = beta[:, t, :, None, None]  # [B, H, 1, 1]
        at = 1.0 if a is None else a[:, t, :, None, None]
        S = at * S @ (eye - bt * kt[..., :, None] * kt[..., None, :]) + bt * vt[..., :, None] * kt[..., None, :]
        out.append((S @ qt[..., None]).squeeze(-1))
    return torch.stack(out, 1), S  # [B, T, H, D], [B, H, D, D]


@pytest.mark.parametrize("kind", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_delta_rules_equal_their_recurrences(kind, impl):
    layer = make_recurrence(kind, impl=impl)
    x = x_of(2, 17)
    q, k, v, beta, a, _ = layer.features(x)
    if kind == "gated_deltanet":
        assert a.min() < 0.5 and a.max() < 1, "the decay should matter in this test"
    else:
        assert a is None
    o, S_T = delta_recurrence(q, k, v, beta, a)
    got, state = layer(x)
    assert_max_err(f"{kind} output", layer.output(x, o), got, 1e-10)
    assert_max_err(f"{kind} final state", S_T, state.memory.weights[0], 1e-10)


@pytest.mark.parametrize("kind", ["deltanet", "gated_deltanet"])
def test_the_memory_rule_with_mapped_gates_is_the_delta_rule(kind):
    """The family claim: the Titans rule with depth 1, chunk 1, no momentum and the mapped gates (``rule_inputs``)
    computes the delta rule that the layer runs (``ops.delta_rule``), outputs and state."""
    layer = make_recurrence(kind)
    x = x_of(2, 13)
    q, k, v, beta, a, _ = layer.features(x)
    target, theta, eta, alpha = layer.rule_inputs(v, beta, a)
    W0 = (torch.zeros(4, 8, 8, dtype=F64),)
    o_rule, st = neural_memory(q, k, target, theta, eta, alpha, W0, chunk_size=1, residual=False, loss="l2",
                               output_final_state=True)
    o, S = delta_rule(q, k, v, beta, a, chunk_size=4, output_final_state=True)
    assert_max_err(f"{kind} output", o_rule, o, 1e-10)
    assert_max_err(f"{kind} state", st.weights[0], S, 1e-10)


def test_deltanet_is_not_gated_deltanet_with_decay_after_the_step():
    """The exact reuse needs the rescaled target: decaying after the delta step gives a different recurrence."""
    layer = make_recurrence("gated_deltanet")
    x = x_of(1, 9)
    q, k, v, beta, a, _ = layer.features(x)
    B, T, H, D = q.shape
    S = torch.zeros(B, H, D, D, dtype=F64)
    outs = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        bt = beta[:, t, :, None, None]
        S = a[:, t, :, None, None] * (S - bt * (S @ kt[..., None] - vt[..., None]) * kt[..., None, :])
        outs.append((S @ q[:, t, ..., None]).squeeze(-1))
    wrong = layer.output(x, torch.stack(outs, 1))
    got, _ = layer(x)
    assert (wrong - got).abs().max() > 1e-4


def test_linear_attention_equals_the_masked_formula():
    layer = make_recurrence("linear_attention", chunk_size=4)
    x = x_of(2, 11)
    q, k, v, beta, a, _ = layer.features(x)
    assert beta is None and a is None
    assert (q > 0).all() and (k > 0).all()  # the 1 + elu feature map
    scores = torch.einsum("bihd,bjhd->bhij", q, k)  # [B, H, T, T]
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    o = torch.einsum("bhij,bjhd->bihd", scores * causal, v)  # [B, T, H, D]
    want = layer.output(x, o)
    got, _ = layer(x)
    assert_max_err("linear attention", want, got, 1e-10)
    # the per-head output norm makes the Katharopoulos normaliser a no-op (up to the norm's epsilon)
    normaliser = (scores * causal).sum(-1).transpose(1, 2)[..., None]  # [B, T, H, 1]
    assert_max_err("normalised variant", want, layer.output(x, o / normaliser), 1e-4)


def test_gated_deltanet_decay_is_floored_and_stays_finite():
    layer = make_recurrence("gated_deltanet")
    with torch.no_grad():
        layer.dt_bias.fill_(50.0)  # softplus ~ 50, A >= 1: log a ~ -50 or less without the floor
    x = x_of(2, 7)
    _, _, _, _, a, _ = layer.features(x)
    assert torch.allclose(a, torch.full_like(a, GDN_MIN_DECAY))
    y, _ = layer(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_bad_kind_is_an_error():
    with pytest.raises(ValueError, match="kind must be"):
        LinearRecurrence(32, 4, "mamba")


@pytest.mark.parametrize("kind", ["deltanet", "gated_deltanet"])
def test_delta_rule_successor_init_keys_the_next_token_under_this_tokens_query(kind):
    """qk_init='successor' on a delta-rule baseline: the same random draws as 'random' (every other parameter equal
    under one seed), W_k a copy of W_q, +1 on the conv's current-token tap for q and v and the previous token's for k;
    with the conv's random part removed, the (normalised) key at token t + 1 equals the query at token t."""
    torch.manual_seed(3)
    succ = LinearRecurrence(24, 3, kind, conv_size=3, qk_init="successor").double()
    torch.manual_seed(3)
    rand = LinearRecurrence(24, 3, kind, conv_size=3).double()
    inner = 24
    pairs = zip(succ.named_parameters(), rand.named_parameters(), strict=True)
    diffs = {n for (n, p), (_, q) in pairs if not torch.equal(p, q)}
    assert diffs == {"to_qkv.weight", "conv.weight"}
    Wq, Wk, Wv = succ.to_qkv.weight.split(inner)
    assert torch.equal(Wk, Wq) and torch.equal(Wq, rand.to_qkv.weight[:inner])
    assert torch.equal(Wv, rand.to_qkv.weight[2 * inner:])
    bump = (succ.conv.weight - rand.conv.weight)[:, 0]
    expected = torch.zeros_like(bump)
    expected[:inner, -1] = expected[2 * inner:, -1] = expected[inner:2 * inner, -2] = 1.0
    torch.testing.assert_close(bump, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        succ.conv.weight.copy_(expected[:, None])
    q, k = succ.features(torch.randn(2, 7, 24, dtype=torch.float64))[:2]
    torch.testing.assert_close(k[:, 1:], q[:, :-1], atol=1e-12, rtol=0)
    assert not torch.allclose(k[:, 1:], q[:, 1:])


def test_delta_qk_init_reaches_the_model_and_bad_values_are_errors():
    """model.delta_qk_init builds DeltaNet / Gated DeltaNet blocks with the successor init (every layer), is an
    initialisation only (resume ignores it), and is refused where it cannot apply."""
    from mnemos.models import MnemosConfig, MnemosLM
    from mnemos.models.config import INIT_ONLY_FIELDS, variant_reads

    cfg = MnemosConfig(variant="gated_deltanet", vocab_size=16, d_model=16, n_layers=2, n_heads=2,
                       delta_qk_init="successor")
    for block in MnemosLM(cfg).blocks:
        Wq, Wk, _ = block.mixer.to_qkv.weight.split(16)
        assert torch.equal(Wq, Wk)
    plain = MnemosLM(MnemosConfig(variant="deltanet", vocab_size=16, d_model=16, n_layers=1, n_heads=2))
    Wq, Wk, _ = plain.blocks[0].mixer.to_qkv.weight.split(16)
    assert not torch.equal(Wq, Wk)  # the papers' init by default
    assert variant_reads("deltanet", "delta_qk_init") and not variant_reads("linear_attention", "delta_qk_init")
    assert not variant_reads("lmm", "delta_qk_init") and "delta_qk_init" in INIT_ONLY_FIELDS
    with pytest.raises(ValueError, match=r"model.delta_qk_init must be 'successor' or 'random', got 'next'"):
        MnemosConfig(variant="deltanet", delta_qk_init="next")
    with pytest.raises(ValueError, match=r"qk_init='successor' needs a delta rule's short conv of >= 2 taps"):
        LinearRecurrence(16, 2, "linear_attention", qk_init="successor")
    with pytest.raises(ValueError, match=r"conv_size=1"):
        LinearRecurrence(16, 2, "deltanet", conv_size=1, qk_init="successor")
    with pytest.raises(ValueError, match=r"qk_init must be one of"):
        LinearRecurrence(16, 2, "deltanet", qk_init="shifted")


# ----------------------------------------------------------------------------------------------------------------------
# MAC


def test_mac_mask_by_hand():
    # 2 queries at segment positions 1, 2 (one token already seen); P = 1; keys [P | h0 h1 h2 | x0 x1 x2]
    got = mac_attention_mask(1, 2, 1).int()
    want = torch.tensor([[1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(got, want)


def rope(x, pos, base=10000.0):
    """Half-split rotary embedding at absolute positions pos (written out here, independently of the layer)."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(D // 2, dtype=F64) * 2 / D)
    ang = torch.as_tensor(pos, dtype=F64)[:, None] * inv  # [T, D/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def naive_mac(mac: MemoryAsContext, x: torch.Tensor) -> torch.Tensor:
    """MAC from its definition: for each segment, rebuild the memory from everything written before it (the
    normalised inputs of the earlier segments, or with ``memory_residual=False`` their attention outputs), read it
    with the segment's queries, attend query by query over exactly the keys it may see, then write and read the
    memory: ``y + m`` (``y * sigmoid(m)``)."""
    B, T, d = x.shape
    written = (lambda x_, y_: x_) if mac.memory_residual else (lambda x_, y_: y_)
    N, at, mem = mac.segment_len, mac.attn, mac.memory
    H, D = at.n_heads, at.head_dim
    ys = []
    for s0 in range(0, T, N):
        s1 = min(s0 + N, T)
        if s0 == 0:
            W = tuple(w.expand(B, *w.shape) for w in mem.memory)
        else:  # the memory after segments 0 .. s-1: one pass over all that they wrote (normalised)
            W = mem(mac.write_norm(written(x[:, :s0], torch.cat(ys, 1))))[1].memory.weights
        read = NeuralMemoryState(MemoryState(W, W, W, 0, mem.chunk_size), mem.conv.init_state(B, dtype=F64))
        h = mac.retrieved_proj(mem.retrieve(x[:, :s1], read)[:, s0:].reshape(B, s1 - s0, -1))  # whole x history
        # segment-local positions: RoPE scores between rotated keys only see differences, but the persistent keys are
        # not rotated, so their scores depend on the query's own position, which MAC counts from the segment start
        pos = torch.arange(0, s1 - s0)
        xs = x[:, s0:s1]
        q = rope(at.q_proj(xs).view(B, -1, H, D), pos)
        kx, vx = rope(at.k_proj(xs).view(B, -1, H, D), pos), at.v_proj(xs).view(B, -1, H, D)
        kh, vh = rope(at.k_proj(h).view(B, -1, H, D), pos), at.v_proj(h).view(B, -1, H, D)
        out = []
        for i in range(s1 - s0):  # query i sees persistent, h_0..h_i, x_0..x_i
            k = torch.cat([at.persistent_k.expand(B, -1, -1, -1), kh[:, : i + 1], kx[:, : i + 1]], 1)
            v = torch.cat([at.persistent_v.expand(B, -1, -1, -1), vh[:, : i + 1], vx[:, : i + 1]], 1)
            p = torch.softmax(torch.einsum("bhd,bjhd->bhj", q[:, i], k) / math.sqrt(D), -1)
            out.append(torch.einsum("bhj,bjhd->bhd", p, v).reshape(B, H * D))
        ys.append(at.o_proj(torch.stack(out, 1)))
    y = torch.cat(ys, 1)
    m, _ = mem(mac.write_norm(written(x, y)))  # written token by token over the whole stream, read after each write
    return y + m if mac.memory_residual else y * torch.sigmoid(m)


@pytest.mark.parametrize("memory_residual", [True, False])
@pytest.mark.parametrize("segment_len,chunk", [(5, 4), (4, 4), (16, 3), (1, 2)])
def test_mac_equals_naive_construction(segment_len, chunk, memory_residual):
    torch.manual_seed(0)
    mac = MemoryAsContext(32, 4, segment_len=segment_len, num_persistent=3, depth=2, expansion=2, chunk_size=chunk,
                          memory_residual=memory_residual)
    mac = mac.double()
    x = x_of(2, 13)
    got, _ = mac(x)
    assert_max_err(f"MAC N={segment_len} C={chunk} residual={memory_residual}", naive_mac(mac, x), got, 1e-10)


def test_mac_memory_reaches_the_output_as_configured():
    """MAC's default form: silencing the attention leaves the memory's read of the normalised input exactly (the
    paper's form leaves zero: the read only gates the attention output); and its memory never sees the attention."""
    torch.manual_seed(0)
    x = x_of(2, 13)
    for residual in (True, False):
        mac = MemoryAsContext(32, 4, segment_len=5, num_persistent=2, depth=2, expansion=2, chunk_size=3,
                              memory_residual=residual).double()
        with torch.no_grad():
            mac.attn.o_proj.weight.zero_()
        got, _ = mac(x)
        want = mac.memory(mac.write_norm(x))[0] if residual else torch.zeros_like(x)
        assert_max_err(f"MAC residual={residual}, attention silenced", want, got, 1e-12)


@pytest.mark.parametrize("scale", [0.0, 0.25, 1.0])
def test_mac_attention_starts_where_mac_attn_init_scale_says(scale):
    """MAC's attention output projection starts at ``mac_attn_init_scale`` times its default init, every other weight
    as at 1 (no random numbers drawn for it). At 0 the block starts as its memory alone, o = M(RMSNorm(x)), and the
    projection still gets a gradient, so the attention can grow in; the paper's form keeps the default init."""
    from mnemos.models import MnemosConfig, MnemosLM

    def build(s, residual=True):
        torch.manual_seed(0)
        cfg = MnemosConfig(variant="mac", vocab_size=32, d_model=32, n_layers=2, n_heads=4, segment_len=5,
                           mac_attn_init_scale=s, mac_memory_residual=residual)
        return MnemosLM(cfg).double()

    ref, model = build(1.0), build(scale)
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        want = p * scale if name.endswith("attn.o_proj.weight") else p
        assert torch.equal(q, want), name
    paper = build(scale, residual=False)
    for (name, p), (_, q) in zip(build(1.0, residual=False).named_parameters(), paper.named_parameters(), strict=True):
        assert torch.equal(p, q), f"paper form: {name}"
    mac = model.blocks[0].mixer
    x = x_of(2, 13)
    got, _ = mac(x)
    if scale == 0.0:
        assert_max_err("MAC at attention scale 0", mac.memory(mac.write_norm(x))[0], got, 1e-12)
    got.pow(2).sum().backward()
    assert mac.attn.o_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mac_attn_init_scale must be a finite number >= 0"):
        MnemosConfig(variant="mac", mac_attn_init_scale=-1.0)
    with pytest.raises(ValueError, match="attn_init_scale must be a finite number >= 0"):
        MemoryAsContext(32, 4, segment_len=5, attn_init_scale=float("nan"))


@pytest.mark.parametrize("bias", [-2.0, 0.0, 1.5])
def test_mag_gate_starts_where_mag_gate_bias_says(bias):
    """MAG's mixing gate g (the attention's share of the output) starts at sigmoid(mag_gate_bias) for any input: the
    bias is set, the gate's weight stays small, so g's mean over random inputs sits near sigmoid(bias)."""
    from mnemos.models import MemoryAsGate, MnemosConfig, MnemosLM

    torch.manual_seed(0)
    cfg = MnemosConfig(variant="mag", vocab_size=32, d_model=32, n_layers=2, n_heads=4, window=4, mag_gate_bias=bias)
    gates = [m.gate for m in MnemosLM(cfg).modules() if isinstance(m, MemoryAsGate)]
    assert len(gates) == 2
    x = torch.randn(64, 32)
    for gate in gates:
        assert torch.equal(gate.bias, torch.full_like(gate.bias, bias))
        g = torch.sigmoid(gate(x))
        assert abs(g.mean().item() - 1 / (1 + math.exp(-bias))) < 0.05
    with pytest.raises(ValueError, match="mag_gate_bias must be a finite number"):
        MnemosConfig(variant="mag", mag_gate_bias=float("nan"))


@pytest.mark.parametrize("memory_residual", [True, False])
def test_mal_memory_reaches_the_stream_as_configured(memory_residual):
    """MAL with ``memory_residual``: o = m + SWA(RMSNorm(x + m)), the memory's read m = M(x) on the stream itself;
    without: o = SWA(RMSNorm(m)). Checked on the composition of its parts, and on what silencing the attention leaves:
    the memory's read exactly, or nothing."""
    from mnemos.models import MemoryAsLayer

    torch.manual_seed(0)
    mal = MemoryAsLayer(32, 4, window=3, num_persistent=2, depth=2, expansion=2, chunk_size=3,
                        memory_residual=memory_residual).double()
    x = x_of(2, 11)
    m, _ = mal.memory(x)
    attn_in = mal.mid_norm(x + m if memory_residual else m)
    want = mal.attn(attn_in)[0] + (m if memory_residual else 0)
    got, _ = mal(x)
    assert_max_err(f"MAL residual={memory_residual}", want, got, 1e-12)
    with torch.no_grad():
        mal.attn.o_proj.weight.zero_()
    silenced, _ = mal(x)
    assert_max_err("MAL, attention silenced", m if memory_residual else torch.zeros_like(m), silenced, 1e-12)


def test_baseconv_is_a_gated_causal_convolution_and_builds_the_based_hybrid():
    """BaseConv: y_t = (sum_i w_i x_{t-K+1+i}) * (W x_t + b) + x_t per channel, zeros before the stream; pieces ==
    one call; the BASED paper's hybrid pattern (BaseConv, linear attention, sliding window) builds and decodes."""
    from mnemos.models import MnemosConfig, MnemosLM
    from mnemos.models.based import BaseConv

    torch.manual_seed(0)
    layer = BaseConv(6, kernel_size=3).to(F64)
    x = x_of(2, 9, dim=6)
    y, state = layer(x)
    w = layer.conv.weight[:, 0]  # [d, K]
    padded = torch.cat([torch.zeros(2, 2, 6, dtype=F64), x], dim=1)
    conv = sum(w[:, i] * padded[:, i : i + 9] for i in range(3))
    assert_max_err("formula", conv * (x @ layer.proj.weight.T + layer.proj.bias) + x, y, 1e-12)
    y1, s1 = layer(x[:, :4])
    y2, _ = layer(x[:, 4:], s1)
    assert_max_err("pieces", y, torch.cat([y1, y2], dim=1), 1e-12)
    assert torch.equal(state.conv, x[:, -2:].transpose(1, 2))  # the last K - 1 inputs
    cfg = MnemosConfig(variant="hybrid", vocab_size=32, d_model=16, n_heads=2, n_layers=3, window=4,
                       layers=["baseconv", "based", "swa"], based={"feature_dim": 4})
    model = MnemosLM(cfg).to(F64).eval()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, 3)
    logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])  # greedy decoding == the one-call forward's argmax
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        BaseConv(6, kernel_size=0)
