"""The chunked torch path of the memory rule beyond Titans' axes (issue 14, section 2): the losses lp and huber, the
Omega window, the retentions lq and kl and the Muon optimiser, checked against the token-by-token reference in
float64 over randomly drawn configs (outputs, final state with its window, every input gradient including delta and
gamma), streaming cuts, decoding, the reductions the issue pins, and dispatch. Small shapes, many configs per test:
the file runs in seconds."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mnemos.ops import MemoryRule, effective_weights, neural_memory
from mnemos.ops.memory_rule.rule import resolve_rule, torch_unsupported_reason
from mnemos.testing import assert_close

F64 = torch.float64
LOSSES = ("l2", "dot", "lp", "huber")
N_CONFIGS = 120


def draw(seed: int, optimizer: str | None = None) -> dict:
    """A random config and its float64 inputs: the rule's axes (loss, p, retention, lq, softmax scale and dim,
    optimizer, NS steps, window, gamma or not), depth 1-3, chunk 1, 2, 3 or 16, T not a multiple of the chunk, shared
    or per-sequence initial memory, an initial momentum or not. ``optimizer``: that one instead of the drawn one
    (``"orthogonal"``, Lattice's, also makes the memory a matrix: depth 1)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    loss = LOSSES[seed % 4]
    window = r.choice((1, 1, 2, 3, 4, 5))
    retention = ("decay", "decay", "lq", "kl")[(seed // 4) % 4]
    optimizer = r.choice(("momentum", "momentum", "muon")) if optimizer is None else optimizer
    rule = MemoryRule(loss=loss, p=r.choice((1.0, 1.5, 2.5, 3.0, 4.0)), retention=retention,
                      lq=r.choice((2.5, 3.0, 4.0)), softmax_scale=r.choice((1.0, 2.5)),
                      softmax_dim=r.choice(("row", "all")), optimizer=optimizer, ns_steps=r.choice((0, 1, 2, 5)),
                      window=window)
    depth = r.choice((1, 2, 3)) if optimizer != "orthogonal" else 1
    chunk = r.choice((1, 2, 3, 16))
    T = r.randint(2, 9)
    if chunk > 1 and T % chunk == 0:
        T += 1
    B, H, K = r.choice((1, 2)), r.choice((1, 2)), r.choice((2, 3))
    residual = depth > 1 and r.random() < 0.7
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    widths = [K] + [2 * K] * (depth - 1) + [K]
    lr = 0.08 / rule.p ** 1.5 if loss == "lp" else 0.08  # lp's step grows like |e|^(p-1): keep the memory bounded
    lead = (B, H) if r.random() < 0.5 else (H,)
    inp = dict(q=F.normalize(randn(B, T, H, K), dim=-1), k=F.normalize(randn(B, T, H, K), dim=-1),
               v=randn(B, T, H, K), theta=lr * rand(B, T, H), eta=0.9 * rand(B, T, H), alpha=0.3 * rand(B, T, H),
               weights=tuple(randn(*lead, widths[i + 1], widths[i]) / (1.0 if retention == "kl" else widths[i] ** 0.5)
                             for i in range(depth)))
    if r.random() < 0.3:
        inp["momentum"] = tuple(0.1 * randn(B, *w.shape[-3:]) for w in inp["weights"])
    if loss == "huber":
        inp["delta"] = 0.1 + 1.5 * rand(B, T, H)  # both branches occur
    if window > 1 or r.random() < 0.5:
        inp["gamma"] = rand(B, T, H)
    kw = dict(rule=rule, chunk_size=chunk, residual=residual, activation=r.choice(("gelu", "silu")))
    return dict(inp=inp, kw=kw, cut=r.randint(1, T - 1), desc=f"seed {seed}: {rule} depth {depth} chunk {chunk} T {T}")


def leaves(inp: dict) -> dict:
    return {n: tuple(t.clone().requires_grad_() for t in x) if isinstance(x, tuple) else x.clone().requires_grad_()
            for n, x in inp.items()}


def flat(inp: dict) -> list:
    return [t for x in inp.values() for t in (x if isinstance(x, tuple) else (x,))]


def run(inp: dict, *, cut: int | None = None, **kw):
    """One call (or two, the second continuing the first's state, when ``cut``): o and the final state."""
    x = dict(inp)
    args = [x.pop(n) for n in ("q", "k", "v", "theta", "eta", "alpha")]
    if cut is None:
        return neural_memory(*args, x.pop("weights"), output_final_state=True, **x, **kw)
    pieces = lambda lo, hi: {n: t[:, lo:hi] for n, t in x.items() if n in ("delta", "gamma")}  # noqa: E731
    o1, st = neural_memory(*(a[:, :cut] for a in args), x["weights"], momentum=x.get("momentum"),
                           output_final_state=True, **pieces(0, cut), **kw)
    o2, st = neural_memory(*(a[:, cut:] for a in args), initial_state=st, output_final_state=True,
                           **pieces(cut, None), **kw)
    return torch.cat((o1, o2), dim=1), st


def outcomes(inp: dict, **kw) -> list:
    """Outputs, the final state (window included) and the gradient of every input, through a loss touching them all."""
    x = leaves(inp)
    o, st = run(x, **kw)
    wave = lambda t: torch.linspace(-1, 1, t.numel(), dtype=F64).view_as(t)  # noqa: E731
    loss = (o * wave(o)).sum() + sum((w.sin() * w).sum() for w in st.weights) + sum((s * s).sum() for s in st.momentum)
    loss = loss + sum((a * wave(a)).sum() for a in st.anchor) + sum((w * wave(w)).sum() for w in st.window)
    grads = torch.autograd.grad(loss, flat(x), allow_unused=True)
    zero = torch.zeros((), dtype=F64)  # an input the loss does not reach
    return [o, *st.weights, *st.momentum, *st.anchor, *st.window, *(zero if d is None else d for d in grads)], st


def assert_same(name, a: list, b: list, ratio: float):
    assert len(a) == len(b), name
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.shape == y.shape, f"{name}: result[{i}] {tuple(x.shape)} != {tuple(y.shape)}"
        assert bool(torch.isfinite(y).all()), f"{name}: result[{i}] is not finite"
        assert_close(f"{name}: result[{i}]", x, y, ratio)


# ----------------------------------------------------------------------------------------------------------------------
# chunked == reference, and a stream cut anywhere == one call


@pytest.mark.parametrize("block", range(6))
def test_chunked_equals_reference_and_streams_cut_anywhere(block):
    for seed in range(block, N_CONFIGS, 6):
        c = draw(seed)
        ref, st_ref = outcomes(c["inp"], impl="reference", **c["kw"])
        assert ref[0].abs().max() < 1e3, f"{c['desc']}: the draw diverges, a useless comparison"
        fast, st = outcomes(c["inp"], impl="torch", **c["kw"])
        assert_same(c["desc"], ref, fast, 1e-9)
        assert st.offset == st_ref.offset and len(st.window) == len(st_ref.window), c["desc"]
        # the carried tokens are the inputs' own values, bit for bit
        for a, b in zip(st_ref.window, st.window, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), c["desc"]
        cut, _ = outcomes(c["inp"], impl="torch", cut=c["cut"], **c["kw"])
        assert_same(f"{c['desc']} cut at {c['cut']}", fast, cut, 1e-11)


def test_lattice_chunked_equals_reference_and_streams_cut_anywhere():
    """Lattice's orthogonal slot update (a matrix memory) on the chunked path: every S_i of a chunk at once, the
    A_i token after token; the reference's outputs, state and gradients over 36 random configs (every loss,
    retention, window and chunk size of the draw), and a stream cut anywhere."""
    for seed in range(36):
        c = draw(seed, optimizer="orthogonal")
        assert c["kw"]["rule"].optimizer == "orthogonal" and len(c["inp"]["weights"]) == 1
        ref, _ = outcomes(c["inp"], impl="reference", **c["kw"])
        fast, st = outcomes(c["inp"], impl="torch", **c["kw"])
        assert_same(c["desc"], ref, fast, 1e-9)
        slots = st.weights[0].norm(dim=-2)  # the slots (columns) are unit after any step
        assert_close(f"{c['desc']}: unit slots", torch.ones_like(slots), slots, 1e-12)
        cut, _ = outcomes(c["inp"], impl="torch", cut=c["cut"], **c["kw"])
        assert_same(f"{c['desc']} cut at {c['cut']}", fast, cut, 1e-11)


@pytest.mark.parametrize("rule,depth", [(MemoryRule(loss="huber", window=2), 2),
                                        (MemoryRule(loss="lp", p=2.5, window=3), 1),
                                        (MemoryRule(loss="lp", p=3.0, retention="lq", optimizer="muon", ns_steps=2,
                                                    window=2), 2),
                                        (MemoryRule(optimizer="orthogonal", window=2), 1),
                                        (MemoryRule(loss="lp", p=3.0, retention="lq", lq=4.0, window=2), 2),  # dual read
                                        (MemoryRule(retention="lq", lq=3.0), 1),
                                        (MemoryRule(retention="kl", softmax_scale=2.5), 2)])
def test_gradcheck(rule, depth):
    g = torch.Generator().manual_seed(depth)
    B, T, H, K = 1, 5, 1, 2
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    widths = [K] + [2 * K] * (depth - 1) + [K]
    inp = dict(q=randn(B, T, H, K), k=F.normalize(randn(B, T, H, K), dim=-1), v=randn(B, T, H, K),
               theta=0.2 * rand(B, T, H), eta=0.9 * rand(B, T, H), alpha=0.3 * rand(B, T, H),
               weights=tuple(randn(B, H, widths[i + 1], widths[i]) / widths[i] ** 0.5 for i in range(depth)),
               gamma=rand(B, T, H))
    if rule.loss == "huber":
        inp["delta"] = 0.3 + rand(B, T, H)
    names = list(inp)

    def fn(*xs):
        it, x = iter(xs), {}
        for n in names:
            x[n] = tuple(next(it) for _ in inp[n]) if isinstance(inp[n], tuple) else next(it)
        o, st = run(x, impl="torch", rule=rule, chunk_size=2, residual=depth > 1)
        return o, *st.weights, *st.momentum

    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in flat(inp)])


def test_decoding_token_by_token_equals_one_call():
    """Calls of one token each (the decoding path for window 1, the chunk machinery with a window) == one call."""
    for seed in (1, 2, 3, 5, 6, 7, 9, 10, 14, 15):  # every loss, with and without windows, retentions, muon
        c = draw(seed)
        inp, kw = c["inp"], c["kw"]
        o, st = run(inp, impl="torch", **kw)
        x = dict(inp)
        args = [x.pop(n) for n in ("q", "k", "v", "theta", "eta", "alpha")]
        T, state, outs = args[0].shape[1], None, []
        for t in range(T):
            extra = {n: x[n][:, t:t + 1] for n in ("delta", "gamma") if n in x}
            start = dict(initial_state=state) if state is not None else dict(weights=x["weights"],
                                                                              momentum=x.get("momentum"))
            o_t, state = neural_memory(*(a[:, t:t + 1] for a in args), output_final_state=True, impl="torch",
                                       **start, **extra, **kw)
            outs.append(o_t)
        assert_close(c["desc"], o, torch.cat(outs, 1), 1e-11)
        for a, b in zip(st.weights + st.window, state.weights + state.window, strict=True):
            assert_close(c["desc"], a, b, 1e-11)


# ----------------------------------------------------------------------------------------------------------------------
# the reductions


def fixed(loss="l2", window=1, seed=0, **rule):
    c = draw(seed)
    inp = {n: x for n, x in c["inp"].items() if n not in ("delta", "gamma")}
    kw = dict(c["kw"], rule=MemoryRule(loss=loss, window=window, **rule), chunk_size=3)
    return inp, kw


def test_huber_with_huge_delta_is_l2():
    for seed in range(3):
        inp, kw = fixed("l2", seed=seed)
        l2, _ = outcomes(inp, impl="torch", **kw)
        huge = dict(inp, delta=torch.full_like(inp["theta"], 1e6))
        hub, _ = outcomes(huge, impl="torch", **dict(kw, rule=MemoryRule(loss="huber")))
        assert_same("huber, delta 1e6", l2, hub[:-1], 1e-12)
        assert torch.equal(hub[-1], torch.zeros_like(hub[-1]))  # delta's gradient: zero inside the l2 branch


def test_huber_with_tiny_delta_is_scaled_l1_and_lp_2_is_l2():
    inp, kw = fixed("l2", seed=4)
    c = 1e-4
    tiny = dict(inp, delta=torch.full_like(inp["theta"], c))
    l1 = dict(inp, theta=c * inp["theta"])
    a, _ = run(tiny, impl="torch", **dict(kw, rule=MemoryRule(loss="huber")))
    b, _ = run(l1, impl="torch", **dict(kw, rule=MemoryRule(loss="lp", p=1.0)))
    assert_close("huber tiny delta vs l1", b, a, 1e-12)
    l2, _ = outcomes(inp, impl="torch", **kw)
    lp2, _ = outcomes(inp, impl="torch", **dict(kw, rule=MemoryRule(loss="lp", p=2.0)))
    assert_same("lp, p = 2", l2, lp2, 1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_window_1_with_gamma_1_is_no_window_and_ones_are_the_default_gamma(loss):
    inp, kw = fixed(loss, seed=5)
    if loss == "huber":
        inp["delta"] = 0.1 + torch.rand_like(inp["theta"])
    plain, _ = outcomes(inp, impl="torch", **kw)
    ones, _ = outcomes(dict(inp, gamma=torch.ones_like(inp["theta"])), impl="torch", **kw)
    assert len(ones) == len(plain) + 1 and all(torch.equal(a, b) for a, b in zip(plain, ones[:-1], strict=True))
    kw3 = dict(kw, rule=MemoryRule(loss=loss, window=3))
    w3, _ = outcomes(inp, impl="torch", **kw3)
    w3_ones, _ = outcomes(dict(inp, gamma=torch.ones_like(inp["theta"])), impl="torch", **kw3)
    assert len(w3_ones) == len(w3) + 1 and all(torch.equal(a, b) for a, b in zip(w3, w3_ones[:-1], strict=True))
    assert not torch.allclose(plain[0], w3[0])  # the window matters


def test_lq_2_is_decay_and_the_retentions_keep_their_invariants():
    inp, kw = fixed("lp", seed=8, p=3.0)
    decay, _ = outcomes(inp, impl="torch", **kw)
    lq2, _ = outcomes(inp, impl="torch", **dict(kw, rule=MemoryRule(loss="lp", p=3.0, retention="lq", lq=2.0)))
    assert_same("lq = 2", decay, lq2, 1e-12)
    # Moneta: ||F(A)||_lq = ||A||_lq^(3 - lq); Memora: rows on the simplex scaled by softmax_scale
    _, st = run(inp, impl="torch", **dict(kw, rule=MemoryRule(retention="lq", lq=4.0)))
    for a, w in zip(st.weights, effective_weights(st.weights, MemoryRule(retention="lq", lq=4.0)), strict=True):
        norm = lambda x: x.abs().pow(4).sum((-2, -1)).pow(0.25)  # noqa: E731
        assert_close("moneta norm", norm(a).pow(-1.0), norm(w), 1e-12)
    rule = MemoryRule(retention="kl", softmax_scale=2.5)
    _, st = run(inp, impl="torch", **dict(kw, rule=rule))
    for w in effective_weights(st.weights, rule):
        assert bool((w > 0).all())
        assert_close("memora rows", w.sum(-1), torch.full_like(w[..., 0], 2.5), 1e-12)


def test_muon_with_zero_ns_steps_steps_along_the_normalised_momentum():
    """ns_steps = 0: each token's step is theta_t S_t / (||S_t||_F + 1e-7); eta = 0, alpha = 0, chunk 1, matrix
    memory: the update is a plain loop of normalised gradient steps."""
    g = torch.Generator().manual_seed(9)
    B, T, H, D = 2, 5, 2, 3
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    inp = dict(q=randn(B, T, H, D), k=F.normalize(randn(B, T, H, D), dim=-1), v=randn(B, T, H, D),
               theta=0.1 * torch.rand(B, T, H, generator=g, dtype=F64), eta=torch.zeros(B, T, H, dtype=F64),
               alpha=torch.zeros(B, T, H, dtype=F64), weights=(randn(B, H, D, D),))
    kw = {}
    kw = dict(kw, rule=MemoryRule(optimizer="muon", ns_steps=0), chunk_size=1, residual=False)
    o, st = run(inp, impl="torch", **kw)
    W = inp["weights"][0].clone()
    W = W.expand(inp["q"].shape[0], *W.shape[-3:]).clone()
    for t in range(inp["q"].shape[1]):
        k, v, q = (inp[n][:, t] for n in ("k", "v", "q"))  # [B, H, D]
        u = torch.einsum("bhp,bhq->bhpq", 2 * (torch.einsum("bhpq,bhq->bhp", W, k) - v), k)
        W = W - inp["theta"][:, t, :, None, None] * u / (torch.linalg.matrix_norm(u, keepdim=True) + 1e-7)
        assert_close(f"o[{t}]", torch.einsum("bhpq,bhq->bhp", W, q), o[:, t], 1e-12)
    assert_close("W_T", W, st.weights[0], 1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# dispatch


def test_auto_runs_the_covered_rules_on_the_chunked_path():
    for seed, rule in ((1, "yaad"), (2, "omeganet"), (3, MemoryRule(loss="lp", p=3.0, window=2)), (4, "moneta"),
                       (5, "memora"), (6, "atlas")):
        c = draw(seed)
        inp = {n: x for n, x in c["inp"].items() if n != "delta"}
        if rule == "yaad":
            inp["delta"] = 0.5 + torch.rand_like(inp["theta"])
        kw = dict(c["kw"], rule=rule)
        assert torch_unsupported_reason(resolve_rule(rule)) is None
        auto, _ = outcomes(inp, impl="auto", **kw)
        fast, _ = outcomes(inp, impl="torch", **kw)
        assert all(torch.equal(a, b) for a, b in zip(auto, fast, strict=True)), rule


def test_uncovered_rules_and_the_kernels_name_the_axis():
    c = draw(0)
    inp = {n: x for n, x in c["inp"].items() if n not in ("delta", "gamma")}
    kw = dict(chunk_size=2)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: the Triton kernels .* loss='huber'"):
        run(dict(inp, delta=torch.ones_like(inp["theta"])), rule="yaad", impl="triton", **kw)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: the Triton kernels .* window=4"):
        run(inp, rule="omeganet", impl="triton", **kw)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: the Triton kernels .*retention='lq'"):
        run(inp, rule="moneta", impl="triton", **kw)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: .*optimizer='muon', window=4"):
        run(dict(inp, gamma=torch.ones_like(inp["theta"])), rule="atlas", impl="triton", **kw)
    with pytest.raises(ValueError, match="normalize_step is defined"):
        run(dict(inp, delta=torch.ones_like(inp["theta"])), rule="yaad", impl="torch", normalize_step=True, **kw)
    with pytest.raises(ValueError, match="delta .* is required for loss='huber'"):
        run(inp, rule="yaad", impl="torch", **kw)
