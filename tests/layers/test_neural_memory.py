"""The Titans memory layer: streaming == parallel, causality, batch independence, gradients, state, bad config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemos.layers import NeuralMemory, NeuralMemoryState, ShortConvolution
from mnemos.layers.conv import _CausalDepthwiseConv
from mnemos.ops import memory_read
from mnemos.testing import assert_close

F64 = torch.float64


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=12, heads=3, depth=2, expansion=2, chunk_size=4)
    cfg.update(kw)
    layer = NeuralMemory(**cfg).double()
    # non-trivial gate biases and output norm so that every parameter matters
    with torch.no_grad():
        layer.to_gates.bias.add_(0.3 * torch.randn_like(layer.to_gates.bias))
        layer.out_norm.weight.add_(0.1 * torch.randn_like(layer.out_norm.weight))
    return layer


def x_of(B, T, dim=12, seed=1):
    return torch.randn(B, T, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("depth,residual,chunk", [(1, False, 1), (2, True, 4), (3, True, 16)])
def test_step_by_step_equals_parallel(depth, residual, chunk):
    layer = make_layer(depth=depth, residual=residual, chunk_size=chunk)
    x = x_of(2, 23)
    y, state = layer(x)
    s = layer.init_state(2, dtype=F64)
    ys = []
    for t in range(x.shape[1]):
        yt, s = layer.step(x[:, t], s)
        ys.append(yt)
    assert_close("y (stepped)", y, torch.stack(ys, 1), 1e-12)
    for i, (a, b) in enumerate(zip(state.memory.weights, s.memory.weights, strict=True)):
        assert_close(f"memory.weights[{i}]", a, b, 1e-12)
    assert_close("conv state", state.conv, s.conv, 1e-12)


@pytest.mark.parametrize("cuts", [[1], [5, 6, 13], [4, 8, 12, 16, 20], [22]])
def test_uneven_pieces_equal_one_call(cuts):
    layer = make_layer()
    x = x_of(2, 23)
    y, _ = layer(x)
    state, outs = None, []
    for a, b in zip([0] + cuts, cuts + [x.shape[1]], strict=True):
        o, state = layer(x[:, a:b], state)
        outs.append(o)
    assert_close("y (pieces)", y, torch.cat(outs, 1), 1e-12)


def test_reference_impl_agrees_including_parameter_grads():
    fast, ref = make_layer(), make_layer(impl="reference")
    ref.load_state_dict(fast.state_dict())
    x = x_of(2, 19).requires_grad_()
    y_fast, _ = fast(x)
    y_ref, _ = ref(x)
    assert_close("y", y_ref, y_fast, 1e-12)
    cot = torch.randn_like(y_ref)
    (y_fast * cot).sum().backward()
    gx_fast = x.grad.clone()
    x.grad = None
    (y_ref * cot).sum().backward()
    assert_close("grad x", x.grad, gx_fast, 1e-10)
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p_fast.grad is not None and bool(p_fast.grad.abs().sum() > 0), name
        assert_close(f"grad {name}", p_ref.grad, p_fast.grad, 1e-10)


@pytest.mark.parametrize("normalize_step", [False, True])
def test_gradcheck_input(normalize_step):
    """normalize_step's divisor max(1, curvature) is differentiated too (large weights: curvatures above 1)."""
    layer = make_layer(dim=6, heads=2, expansion=1, chunk_size=2, normalize_step=normalize_step)
    if normalize_step:
        with torch.no_grad():
            for w in layer.memory:
                w.mul_(2.0)
    x = x_of(1, 5, dim=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), eps=1e-6, atol=1e-7)


def test_strict_causality():
    layer = make_layer()
    x = x_of(2, 30)
    y, _ = layer(x)
    for t in (0, 3, 4, 17, 28):
        x2 = x.clone()
        x2[:, t + 1:] = x_of(2, 30 - t - 1, seed=t + 10)
        y2, _ = layer(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-13, atol=1e-13)
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


def test_batch_independence():
    layer = make_layer()
    x = x_of(3, 21)
    y, _ = layer(x)
    x2 = x.clone()
    x2[1] = x_of(1, 21, seed=99)[0]
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[[0, 2]], y[[0, 2]], rtol=0, atol=1e-14)
    assert not torch.allclose(y2[1], y[1])


def test_retrieve_reads_without_update():
    layer = make_layer()
    x = x_of(2, 9)
    _, state = layer(x)
    probe = x_of(2, 5, seed=3)
    h = layer.retrieve(probe, state)
    q = layer._project(probe, state.conv)[0]
    torch.testing.assert_close(h, memory_read(q, state.memory.weights, residual=True), rtol=0, atol=0)
    h0 = layer.retrieve(probe)  # W_0 when no state
    assert not torch.allclose(h0, h)


def test_state_serialises_and_detaches(tmp_path):
    layer = make_layer()
    x = x_of(2, 10)
    _, state = layer(x[:, :7])
    torch.save(state.detach(), tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    assert isinstance(loaded, NeuralMemoryState) and loaded.memory.offset == 3
    y_cont, _ = layer(x[:, 7:], loaded)
    y_full, _ = layer(x)
    assert_close("y (resumed from disk)", y_full[:, 7:], y_cont, 1e-12)


def test_bf16_autocast_keeps_float32_memory_state():
    torch.manual_seed(0)
    layer = NeuralMemory(32, heads=2, chunk_size=8)
    x = torch.randn(2, 40, 32)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
    assert all(w.dtype == torch.float32 for w in state.memory.weights + state.memory.momentum)
    assert_close("y (bf16 autocast)", y32, y.float(), 5e-2)


def test_default_gates_keep_a_long_stream_finite_and_alive():
    """With the default gate biases a long random stream neither diverges nor decays the MLP memory to zero."""
    torch.manual_seed(0)
    layer = NeuralMemory(256, heads=4)
    with torch.no_grad():
        y, state = layer(torch.randn(1, 3000, 256))
    assert bool(torch.isfinite(y).all())
    for w, w0 in zip(state.memory.weights, layer.memory, strict=True):
        ratio = (w.norm(dim=(-1, -2)) / w0.norm(dim=(-1, -2))).min().item()
        assert 0.1 < ratio < 10, ratio


def test_ema_momentum_bounds_the_step_of_every_token():
    """theta = max_lr * sigmoid(.) * (1 - eta), so a token's summed step theta / (1 - eta) never exceeds max_lr."""
    layer = make_layer(max_lr=0.05)
    with torch.no_grad():
        layer.to_gates.bias[3:6].fill_(4.0)  # eta ~ 0.98
        _, _, _, theta, eta, _, _, gate, _ = layer._project(x_of(2, 30), None)
        free = make_layer(max_lr=0.05, ema_momentum=False)
        free.load_state_dict(layer.state_dict())
        _, _, _, theta_free, eta_free, *_ = free._project(x_of(2, 30), None)
    torch.testing.assert_close(gate, eta_free)
    torch.testing.assert_close(theta, theta_free * (1 - gate))
    assert float((theta / (1 - gate)).max()) <= 0.05
    assert bool((eta <= gate).all())  # the momentum clock only ever scales the carried momentum down
    assert float((theta_free / (1 - eta_free)).max()) > 1.0  # what the bound removes: 20x max_lr per token


def _gated_layer(eta_logits, clock, theta_logit=8.0):
    """A layer whose momentum gate's logit at token t of sequence b is eta_logits[b, t] (in every head) and whose
    write gate sits near its bound; returns (theta, the op's eta, the gate) from its projection of a matching x."""
    layer = make_layer(momentum_clock=clock)
    B, T = eta_logits.shape
    H = layer.heads
    with torch.no_grad():
        layer.to_gates.weight.zero_()
        layer.to_gates.bias.zero_()
        layer.to_gates.bias[:H].fill_(theta_logit)  # theta's rows, then eta's, then alpha's
        layer.to_gates.weight[H:2 * H, 0] = 1.0
        x = torch.zeros(B, T, layer.dim, dtype=F64)
        x[..., 0] = eta_logits
        _, _, _, theta, eta, _, _, gate, clock_state = layer._project(x, None)
    return layer, theta, eta, gate, clock_state


def _total_steps(theta, eta):
    """Each token's gradient's total step on the memory within the sequence: theta_t * sum_k prod_(j=t+1..t+k) eta_j
    (S_t = eta_t S_(t-1) - theta_t u_t, A_t = A_(t-1) + S_t), per [B, T, H]."""
    B, T, H = theta.shape
    total = torch.zeros_like(theta)
    for t in range(T):
        carried = torch.ones_like(theta[:, 0])
        for j in range(t, T):
            if j > t:
                carried = carried * eta[:, j]
            total[:, t] += theta[:, t] * carried
    return total


def test_the_momentum_clock_bounds_every_gradients_total_step():
    """Without the clock a gradient taken at a low eta and carried by later high etas moves the memory far beyond
    max_lr (the ema bound assumes the later etas do not rise); with it no token's gradient moves it by more than
    2 max_lr, for gates that switch between low and high, and at random."""
    g = torch.Generator().manual_seed(3)
    T = 96
    switch = torch.full((1, T), -2.0, dtype=F64)  # eta ~ .12, then ~ .9995 from token 8 on
    switch[:, 8:] = 7.6
    alternating = torch.where(torch.arange(T) % 5 == 0, 9.0, -1.0).to(F64)[None]  # one low in five
    random = 12 * torch.rand(3, T, generator=g, dtype=F64) - 4
    logits = torch.cat([switch, alternating, random])
    layer, theta, eta, gate, _ = _gated_layer(logits, clock=False)
    plain = _total_steps(theta, eta) / layer.token_lr
    assert float(plain[0].max()) > 20  # the first tokens' gradients carried ~1/(1 - .9995) tokens at their rate
    layer, theta, eta, gate, _ = _gated_layer(logits, clock=True)
    clocked = _total_steps(theta, eta) / layer.token_lr
    assert float(clocked.max()) <= 2.0 + 1e-9
    assert float(clocked.max()) > 0.9  # the bound is not met by writing nothing
    assert bool((eta <= gate + 1e-15).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_momentum_charged_low_and_carried_high_diverges_the_memory_without_the_clock(seed):
    """What outer training found (the stability grid's one failure): a matrix memory (curvature 1, every bound
    met) whose momentum gate sits at eta ~ .12 for 16 tokens and ~ .9999 after keeps stepping along the early
    gradients; its inner loss over the sequence grows ~100x within one forward. With the clock it falls."""
    ends = {}
    for clock in (False, True):
        torch.manual_seed(seed)
        layer = NeuralMemory(dim=16, heads=2, depth=1, chunk_size=4, momentum_clock=clock).double()
        H = layer.heads
        with torch.no_grad():
            layer.to_gates.weight.zero_()
            layer.to_gates.bias.zero_()
            layer.to_gates.bias[:H].fill_(8.0)  # theta at its bound
            layer.to_gates.bias[2 * H:].fill_(-8.0)  # alpha ~ 3e-4
            layer.to_gates.weight[H:2 * H, 0] = 1.0  # eta's logit = x[..., 0]
            x = torch.randn(4, 128, 16, dtype=F64, generator=torch.Generator().manual_seed(seed))
            x[..., 0] = -2.0
            x[:, 16:, 0] = 9.0
            layer.record_stats = True
            layer(x)
        stats = layer.last_stats
        ends[clock] = stats["inner_loss"] / stats["inner_loss_start"]
    assert ends[False] > 30 and ends[True] < 0.6, ends


def test_the_momentum_clock_is_the_plain_ema_while_eta_is_constant_and_streams_exactly():
    """A constant momentum gate leaves the op's eta as the gate (the EMA form unchanged); a stream cut anywhere
    carries the last token's clock, so the cut equals the whole sequence, and a state without it starts as the first
    token of a sequence does."""
    constant = torch.full((2, 13), 1.3, dtype=F64)
    _, theta, eta, gate, clock = _gated_layer(constant, clock=True)
    torch.testing.assert_close(eta[:, 1:], gate[:, 1:], rtol=0, atol=0)
    # the first token: as if the token before had eta = 0 (its momentum is 0 there anyway)
    torch.testing.assert_close(eta[:, 0], gate[:, 0] * (1 - gate[:, 0]))
    torch.testing.assert_close(clock, torch.nn.functional.softplus(torch.full_like(clock, 1.3)))
    layer = make_layer()
    assert layer.momentum_clock
    x = x_of(2, 23)
    y, state = layer(x)
    cut = layer.init_state(2)
    assert torch.equal(cut.clock, torch.zeros(2, layer.heads, dtype=F64))
    ys = []
    for a, b in ((0, 5), (5, 6), (6, 17), (17, 23)):
        part, cut = layer(x[:, a:b], cut)
        ys.append(part)
    torch.testing.assert_close(torch.cat(ys, dim=1), y)
    torch.testing.assert_close(cut.clock, state.clock)
    _, _, _, _, eta_all, _, _, gate_all, _ = layer._project(x, None)
    assert not torch.allclose(eta_all, gate_all)  # the random gates vary: the clock did act
    # off, or without the EMA form, or without momentum: no clock state, the op's eta is the gate
    for kw in (dict(momentum_clock=False), dict(ema_momentum=False), dict(momentum=False)):
        other = make_layer(**kw)
        assert other.init_state(2).clock is None and other(x)[1].clock is None
        _, _, _, _, e, _, _, gt, c = other._project(x, None)
        assert c is None and torch.equal(e, gt)


@pytest.mark.parametrize("ema", [True, False])
def test_saturated_gates_on_repeated_tokens(ema):
    """The worst case for the memory: every token the same (one key, one value, C identical gradients per anchor),
    the largest inner step and momentum near 1. With the EMA form the memory converges to the stored pair; with the
    paper's free theta the same gates drive it to overflow (what the bound is for)."""
    torch.manual_seed(0)
    layer = NeuralMemory(64, heads=2, max_lr=0.05, ema_momentum=ema, chunk_size=16, value_norm=False,
                         normalize_step=False).double()
    with torch.no_grad():
        layer.to_gates.weight.zero_()
        layer.to_gates.bias[:2].fill_(10.0)  # theta = max_lr
        layer.to_gates.bias[2:4].fill_(4.0)  # eta ~ 0.98
        y, state = layer(torch.randn(1, 1, 64, dtype=F64).expand(1, 1024, 64))
    finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(w).all()) for w in state.memory.weights)
    if ema:
        assert finite
        growth = max((w.norm() / w0.norm()).item() for w, w0 in zip(state.memory.weights, layer.memory, strict=True))
        assert growth < 10, growth
    else:
        assert not finite or max(w.abs().max().item() for w in state.memory.weights) > 1e6


def test_short_conv_streaming():
    torch.manual_seed(0)
    conv = ShortConvolution(5, 4).double()
    x = torch.randn(2, 11, 5, dtype=F64)
    y, s = conv(x)
    y1, s1 = conv(x[:, :3])
    y2, s2 = conv(x[:, 3:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, s)
    # the conv is causal and matches an explicit sum
    w = conv.weight[:, 0]  # [C, K]
    xp = torch.nn.functional.pad(x, (0, 0, 3, 0))
    ref = sum(w[:, i] * xp[:, i: i + 11] for i in range(4))
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("K,T", [(4, 11), (4, 2), (1, 5), (3, 1)])
def test_short_conv_matches_conv1d_with_gradients(K, T):
    """The shifted multiply-adds (and their hand-written backward) against torch's grouped conv1d, in float64:
    output, new state and the gradients of input, carried state and weight; gradcheck on top."""
    torch.manual_seed(K * 10 + T)
    conv = ShortConvolution(6, K).double()
    x = torch.randn(2, T, 6, dtype=F64, requires_grad=True)
    s0 = torch.randn(2, 6, K - 1, dtype=F64, requires_grad=True)
    y, s1 = conv(x, s0)
    xt = torch.cat([s0, x.transpose(1, 2)], dim=-1)
    ref = torch.nn.functional.conv1d(xt, conv.weight, groups=6).transpose(1, 2)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(s1, xt[..., xt.shape[-1] - (K - 1):])
    g = torch.randn_like(y)
    mine = torch.autograd.grad((y * g).sum(), (x, s0, conv.weight), allow_unused=True)
    theirs = torch.autograd.grad((ref * g).sum(), (x, s0, conv.weight), allow_unused=True)
    for a, b in zip(mine, theirs, strict=True):
        if b is None:  # K = 1: no state
            assert a is None or not a.abs().sum()
        else:
            torch.testing.assert_close(a, b)
    w = conv.weight.detach()[:, 0].clone().requires_grad_()
    apply = lambda x, s, w: _CausalDepthwiseConv.apply(torch.cat([s.transpose(1, 2), x], dim=1), w)  # noqa: E731
    assert torch.autograd.gradcheck(apply, (x, s0, w))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dim=10, heads=3), "heads .* must divide dim"),
        (dict(dim=12, heads=0), "heads must be"),
        (dict(dim=12, depth=0), "depth must be"),
        (dict(dim=12, chunk_size=0), "chunk_size must be"),
        (dict(dim=12, max_lr=0.0), "max_lr must be"),
        (dict(dim=12, activation="tanh"), "activation must be"),
        (dict(dim=12, expansion=0), "expansion must be"),
        (dict(dim=12, qk_init="shifted"), "qk_init must be 'successor' or 'random', got 'shifted'"),
        (dict(dim=12, conv_size=1), r"qk_init='successor' needs conv_size >= 2 .*or set qk_init='random'"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        NeuralMemory(**kw)


def test_ema_momentum_must_be_a_bool():
    with pytest.raises(TypeError, match="ema_momentum must be a bool"):
        NeuralMemory(12, ema_momentum=1)


def test_bad_input_shapes():
    layer = make_layer()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 11, dtype=F64))
    with pytest.raises(ValueError, match="x must be"):
        layer.step(torch.randn(2, 1, 12, dtype=F64), layer.init_state(2, dtype=F64))
    _, state = layer(x_of(2, 5))
    with pytest.raises(ValueError, match="conv state must be"):
        layer(x_of(3, 5), state)


def test_record_stats_reports_the_writes():
    """Health statistics: off by default; on, they say how strongly the memory wrote (theta = 0: nothing written)."""
    torch.manual_seed(0)
    layer = NeuralMemory(32, heads=4, depth=2, chunk_size=4, max_lr=0.5)
    x = torch.randn(2, 24, 32)
    layer(x)
    assert layer.last_stats == {}
    layer.record_stats = True
    layer(x)
    s = layer.last_stats
    assert set(s) >= {"theta_mean", "theta_max", "eta_mean", "alpha_max", "step_max", "inner_loss_start",
                      "inner_loss", "memory_norm", "write_fraction"}
    assert 0 < s["theta_mean"] <= s["theta_max"] and s["step_max"] <= 0.5 + 1e-6  # the EMA form's bound
    assert s["write_fraction"] > 0.01 and s["inner_loss"] < s["inner_loss_start"]  # writes fit the pairs
    with torch.no_grad():
        layer.to_gates.bias[:4].fill_(-60.0)  # theta ~ 0: nothing is written
        layer.to_gates.bias[8:].fill_(-60.0)  # alpha ~ 0: nothing is forgotten
    layer(x)
    assert layer.last_stats["write_fraction"] < 1e-6
    assert abs(layer.last_stats["inner_loss"] - layer.last_stats["inner_loss_start"]) < 1e-5


def test_stats_of_several_calls_merge_and_score_from_the_chunk_anchor():
    """A forward cut into calls (MAC calls its memory once per segment): ``merged_stats`` weighs each call's means by
    its tokens, keeps the largest maxima and the latest memory norm, and equals ``last_stats`` after one call. A call
    that continues a chunk scores its keys' loss from the chunk's anchor, the memory its writes were computed at."""
    torch.manual_seed(0)
    layer = NeuralMemory(32, heads=4, depth=2, chunk_size=16, max_lr=0.5).double()
    layer.record_stats = True
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    _, state = layer(x[:, :5])
    first = dict(layer.last_stats)
    assert layer.merged_stats() == first
    _, _ = layer(x[:, 5:], state)
    second, merged = layer.last_stats, layer.merged_stats()
    assert merged["theta_mean"] == pytest.approx((5 * first["theta_mean"] + 8 * second["theta_mean"]) / 13, rel=1e-12)
    assert merged["inner_loss"] == pytest.approx((5 * first["inner_loss"] + 8 * second["inner_loss"]) / 13, rel=1e-12)
    assert merged["step_max"] == max(first["step_max"], second["step_max"])
    assert merged["memory_norm"] == second["memory_norm"]
    # 13 tokens in a 16-token chunk: the second call's writes took their gradients at the anchor, W_0
    assert state.memory.offset == 5
    q, k, v = layer._project(x, None)[:3]
    k2, v2 = k[:, 5:].float(), v[:, 5:].float()
    w0 = tuple(w.detach().float() for w in layer.read_weights(tuple(layer.memory)))
    at_anchor = (memory_read(k2, w0, residual=True) - v2).pow(2).sum(-1).mean().item()
    assert second["inner_loss_start"] == pytest.approx(at_anchor, rel=1e-5)
    at_call_start = tuple(w.float() for w in layer.read_weights(state.memory.weights))
    assert abs((memory_read(k2, at_call_start, residual=True) - v2).pow(2).sum(-1).mean().item() - at_anchor) > 1e-4
    layer.reset_stats()
    assert layer.merged_stats() == {} and layer.last_stats == {}


@pytest.mark.parametrize("chunk_size, max_lr, max_chunk_lr, token_lr", [
    (4, 0.8, 0.8, 0.2),  # the chunk's bound binds: 0.8 / 4
    (4, 0.4, 1.0, 0.25),  # the defaults: 1.0 / 4 < 0.4
    (2, 0.4, 1.0, 0.4),  # the token's bound binds: 1.0 / 2 > 0.4
    (16, 0.4, None, 0.4),  # no chunk bound
])
def test_max_chunk_lr_shares_a_chunk_bound_over_its_tokens(chunk_size, max_lr, max_chunk_lr, token_lr):
    """A token's total step is at most min(max_lr, max_chunk_lr / C), so a chunk's C steps add up to at most
    max_chunk_lr; it is the layer with max_lr = that bound and no chunk bound, nothing else changes."""
    bounded = make_layer(max_lr=max_lr, chunk_size=chunk_size, max_chunk_lr=max_chunk_lr)
    plain = make_layer(max_lr=token_lr, chunk_size=chunk_size, max_chunk_lr=None)
    plain.load_state_dict(bounded.state_dict())
    assert bounded.token_lr == pytest.approx(token_lr)
    with torch.no_grad():
        bounded.to_gates.bias[:3].fill_(8.0)  # theta near its bound
        plain.to_gates.bias[:3].fill_(8.0)
        x = x_of(2, 30)
        _, _, _, theta, _, _, _, eta, _ = bounded._project(x, None)  # eta: the momentum gate
        torch.testing.assert_close(bounded(x)[0], plain(x)[0])
    step = theta / (1 - eta)
    assert 0.95 * token_lr < float(step.max()) <= token_lr * (1 + 1e-12)


@pytest.mark.parametrize("max_chunk_lr", [0.9, None])
def test_chunk_bound_keeps_a_chunk_of_repeated_keys_stable(max_chunk_lr):
    """The anchored step of a chunk: C identical unit keys with saturated gates. With the chunk bound the C
    gradients at one anchor add up to at most max_chunk_lr (< 1: the error on that key shrinks); with only a
    per-token bound of the same size they add up to C times it and the memory overshoots without end."""
    torch.manual_seed(0)
    layer = NeuralMemory(32, heads=2, depth=1, chunk_size=16, max_lr=0.9, max_chunk_lr=max_chunk_lr,
                         value_norm=True).double()
    with torch.no_grad():
        layer.to_gates.weight.zero_()
        layer.to_gates.bias[:2].fill_(10.0)  # theta at its bound
        layer.to_gates.bias[2:4].fill_(-10.0)  # no momentum: every step lands in its own chunk
        layer.to_gates.bias[4:].fill_(-30.0)  # no forgetting
        layer.record_stats = True
        y, state = layer(torch.randn(1, 1, 32, dtype=F64).expand(1, 256, 32))
    s = layer.last_stats
    if max_chunk_lr is not None:
        assert bool(torch.isfinite(y).all())
        assert s["inner_loss"] < 1e-2 * s["inner_loss_start"], s  # |1 - 2 * 0.9| per chunk: the error shrinks
    else:
        assert not s["inner_loss"] < s["inner_loss_start"], s  # overshoot: the error grew (or overflowed)


def test_value_norm_gives_unit_values():
    layer = make_layer(value_norm=True)
    with torch.no_grad():
        _, _, v, *_ = layer._project(x_of(2, 9), None)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[:-1], dtype=F64))


def test_bad_max_chunk_lr_and_value_norm():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_chunk_lr must be None or > 0"):
            NeuralMemory(12, max_chunk_lr=bad)
    with pytest.raises(TypeError, match="value_norm must be a bool"):
        NeuralMemory(12, value_norm=1)


@pytest.mark.parametrize("value_norm", [True, False])
def test_value_norm_keeps_the_mlp_memory_stable_as_values_grow(value_norm):
    """Outer training grows the value projection (|v| 0.6 -> 3.4 in the recall diagnosis), and the MLP memory's inner
    problem is not scale-free: with raw values 3x larger the default step overflows it within one sequence. Unit
    values keep it finite and fitting whatever the projection's scale."""
    torch.manual_seed(0)
    layer = NeuralMemory(64, heads=4, depth=2, chunk_size=4, max_lr=0.2, value_norm=value_norm,
                         normalize_step=False).double()  # raw steps: the value scale alone
    with torch.no_grad():
        layer.to_qkv.weight[128:].mul_(3.0)  # the value projection
        layer.to_gates.bias[:4].fill_(6.0)  # theta at its bound
        layer.record_stats = True
        y, _ = layer(torch.randn(4, 256, 64, dtype=F64))
    s = layer.last_stats
    if value_norm:
        assert bool(torch.isfinite(y).all()) and s["inner_loss"] < 0.6 * s["inner_loss_start"], s
    else:
        assert not bool(torch.isfinite(y).all())


def test_successor_init_writes_the_next_tokens_key_under_this_tokens_query():
    """qk_init='successor': the same random draws as 'random' (every other parameter equal under one seed), W_k a
    copy of W_q, +1 on the conv's current-token tap for q and v and on the previous token's for k. With the conv's
    random part removed, the key the layer computes at token t + 1 is exactly the query at token t (and the value at
    t is token t's own): the first write of a pair (a, b) is stored under a's query."""
    succ, rand = make_layer(qk_init="successor", conv_size=3), make_layer(qk_init="random", conv_size=3)
    inner = succ.heads * succ.head_dim
    pairs = zip(succ.named_parameters(), rand.named_parameters(), strict=True)
    diffs = {n for (n, p), (_, q) in pairs if not torch.equal(p, q)}
    assert diffs == {"to_qkv.weight", "conv.weight"}
    Wq, Wk, Wv = succ.to_qkv.weight.split(inner)
    assert torch.equal(Wk, Wq) and torch.equal(Wq, rand.to_qkv.weight[:inner])
    assert torch.equal(Wv, rand.to_qkv.weight[2 * inner:])
    bump = (succ.conv.weight - rand.conv.weight)[:, 0]  # [3 inner, K]
    expected = torch.zeros_like(bump)
    expected[:inner, -1] = expected[2 * inner:, -1] = expected[inner:2 * inner, -2] = 1.0
    torch.testing.assert_close(bump, expected, atol=1e-6, rtol=0)  # (added in float32, before .double())
    with torch.no_grad():
        succ.conv.weight.copy_(expected[:, None])
    x = x_of(2, 9)
    q, k, v = succ._project(x, None)[:3]
    torch.testing.assert_close(k[:, 1:], q[:, :-1], atol=1e-12, rtol=0)
    assert not torch.allclose(k[:, 1:], q[:, 1:])  # (it is the previous token's, not its own)
    torch.testing.assert_close(v, F.normalize(F.silu(x @ Wv.T).view_as(v), dim=-1), atol=1e-12, rtol=0)
