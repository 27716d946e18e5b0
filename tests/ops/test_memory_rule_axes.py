"""The memory rule's four axes (issue 14, section 1) on the token-by-token reference: the presets, the reductions
the issue pins, independent plain loops of each paper's update (matrix memory), streaming with an Omega window,
gradients and input checks."""

from __future__ import annotations

import dataclasses
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from mnemos.ops import RULES, MemoryRule, delta_rule, effective_weights, neural_memory
from mnemos.ops.memory_rule.rule import newton_schulz, newton_schulz_fast
from mnemos.testing import assert_close

F64 = torch.float64
GATES = ("theta", "eta", "alpha")


def make(B=2, T=7, H=2, K=3, V=3, depth=1, *, seed, residual=False, theta=0.2, delta=False, gamma=False,
         logits=False):
    """Fresh random float64 inputs: unit-norm q and k, gates in range, per-sequence initial memory (softmax logits of
    order 1 for a kl retention), optional Huber thresholds delta and window weights gamma."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    widths = [K] + [2 * K] * (depth - 1) + [V]
    inp = dict(q=F.normalize(randn(B, T, H, K), dim=-1), k=F.normalize(randn(B, T, H, K), dim=-1), v=randn(B, T, H, V),
               theta=theta * rand(B, T, H), eta=0.9 * rand(B, T, H), alpha=0.5 * rand(B, T, H),
               weights=tuple((randn(B, H, widths[i + 1], widths[i]) / (1.0 if logits else widths[i] ** 0.5))
                             for i in range(depth)))
    if delta:
        inp["delta"] = 0.2 + 2.0 * rand(B, T, H)  # both Huber branches occur
    if gamma:
        inp["gamma"] = rand(B, T, H)
    inp["residual"] = residual
    return inp


def call(inp, **kw):
    x = dict(inp)
    q, k, v, th, et, al = (x.pop(n) for n in ("q", "k", "v", *GATES))
    W = x.pop("weights", None)
    return neural_memory(q, k, v, th, et, al, W, output_final_state=True, **x, **kw)


def tensors(inp):
    return [t for n, x in inp.items() if n != "residual" for t in (x if isinstance(x, tuple) else (x,))]


def with_grad(inp):
    return {n: (tuple(t.clone().requires_grad_() for t in x) if isinstance(x, tuple) else
                x if isinstance(x, bool) else x.clone().requires_grad_()) for n, x in inp.items()}


def results(inp, **kw):
    """Outputs, final state and the gradients of every input of one call (through a loss that touches them all)."""
    inp = with_grad(inp)
    o, st = call(inp, **kw)
    loss = (o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum()
    loss = loss + sum((w.sin() * w).sum() for w in st.weights) + sum((s * s).sum() for s in st.momentum)
    grads = torch.autograd.grad(loss, tensors(inp), allow_unused=True)
    return [o, *st.weights, *st.momentum, *st.anchor, *(torch.zeros(()) if d is None else d for d in grads)]


def assert_all_close(a, b, ratio):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_close(f"result[{i}]", x, y, ratio)


# ----------------------------------------------------------------------------------------------------------------------
# independent plain loops of the rule with a matrix memory M(x) = W x (depth 1, no residual)


def svd_ns(S, steps):
    """Newton-Schulz through the SVD: every singular value s of S / (||S||_F + 1e-7) becomes f^steps(s)."""
    a, b, c = 3.4445, -4.7750, 2.0315  # Muon's quintic, as issue 14 pins it
    U, s, Vh = torch.linalg.svd(S / (torch.linalg.matrix_norm(S, keepdim=True) + 1e-7), full_matrices=False)
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag_embed(s) @ Vh


def plain_matrix_rule(inp, *, rule, chunk):
    """The rule of issue 14 written out for a matrix memory: per (b, h), the window's output gradients at the
    anchor's effective weights, outer products with the keys, the optimiser, the retention map. Returns o, A_T."""
    q, k, v, th, et, al = (inp[n] for n in ("q", "k", "v", *GATES))
    B, T, H, _ = q.shape
    gam = inp.get("gamma", torch.ones(B, T, H, dtype=F64))
    A, S = inp["weights"][0].clone(), torch.zeros_like(inp["weights"][0])

    def Fmap(a):
        if rule.retention == "decay":
            return a
        if rule.retention == "lq":
            return a / (a.abs() ** rule.lq).sum() ** ((rule.lq - 2) / rule.lq)
        if rule.softmax_dim == "row":
            return rule.softmax_scale * torch.softmax(a, -1)
        return rule.softmax_scale * torch.softmax(a.flatten(), 0).view_as(a)

    def out_grad(e, v_i, d_i):
        if rule.loss == "l2":
            return 2 * e
        if rule.loss == "dot":
            return -v_i
        if rule.loss == "lp":
            return rule.p * torch.sign(e) * e.abs() ** (rule.p - 1)
        return 2 * e if e.norm() <= d_i else d_i * torch.sign(e)

    o = torch.empty(B, T, H, A.shape[-2], dtype=F64)
    for b in range(B):
        for h in range(H):
            a, s = A[b, h].clone(), S[b, h].clone()
            for t in range(T):
                if t % chunk == 0:
                    W_bar = Fmap(a)
                u = torch.zeros_like(a)
                for i in range(max(0, t - rule.window + 1), t + 1):
                    d_i = inp["delta"][b, i, h] if "delta" in inp else None
                    u += gam[b, i, h] * torch.outer(out_grad(W_bar @ k[b, i, h] - v[b, i, h], v[b, i, h], d_i),
                                                    k[b, i, h])
                if rule.optimizer == "momentum":
                    s = et[b, t, h] * s - th[b, t, h] * u
                    a = (1 - al[b, t, h]) * a + s
                else:
                    s = et[b, t, h] * s - u
                    a = (1 - al[b, t, h]) * a + th[b, t, h] * svd_ns(s, rule.ns_steps)
                o[b, t, h] = Fmap(a) @ q[b, t, h]
            A[b, h] = a
    return o, A


MATRIX_RULES = {
    "titans": RULES["titans"],
    "moneta": RULES["moneta"],
    "moneta_q3_p1.5": MemoryRule(loss="lp", p=1.5, retention="lq", lq=3.0),
    "yaad": RULES["yaad"],
    "memora_all": MemoryRule(retention="kl", softmax_scale=3.0, softmax_dim="all"),
    "omeganet": RULES["omeganet"],
    "atlas": RULES["atlas"],
    "atlas_ns3_huber_lq": MemoryRule(loss="huber", retention="lq", lq=3.0, optimizer="muon", ns_steps=3, window=3),
    "windowed_dot": MemoryRule(loss="dot", window=2),
}


@pytest.mark.parametrize("name", list(MATRIX_RULES))
def test_reference_equals_plain_loop_of_the_rule(name):
    rule = MATRIX_RULES[name]
    for chunk, T in ((1, 7), (3, 8)):
        inp = make(T=T, seed=10 * list(MATRIX_RULES).index(name) + chunk, delta=rule.loss == "huber", gamma=True,
                   logits=rule.retention == "kl")
        o, st = call(inp, rule=rule, chunk_size=chunk, impl="reference")
        o_ref, A_ref = plain_matrix_rule(inp, rule=rule, chunk=chunk)
        assert_close("o", o_ref, o, 1e-12)
        assert_close("A_T", A_ref, st.weights[0], 1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# the reductions the issue pins


@pytest.mark.parametrize("impl", ["auto", "torch", "reference"])
def test_titans_preset_is_todays_op_bit_for_bit(impl):
    inp = make(T=9, depth=2, residual=True, seed=11)
    today = results(inp, chunk_size=4, impl=impl)
    for rule in ("titans", RULES["titans"], MemoryRule(), MemoryRule(p=5.0, lq=3.0, ns_steps=2)):
        same = results(inp, chunk_size=4, impl=impl, rule=rule)
        assert all(torch.equal(a, b) for a, b in zip(today, same, strict=True)), rule
    dot_today = results(inp, chunk_size=4, impl=impl, loss="dot")
    dot_rule = results(inp, chunk_size=4, impl=impl, rule="linear_attention")
    assert all(torch.equal(a, b) for a, b in zip(dot_today, dot_rule, strict=True))


def test_auto_takes_the_chunked_path_for_titans_axes_and_the_reference_for_the_rest():
    inp = make(T=6, depth=2, residual=True, seed=12)
    fast = results(inp, chunk_size=2, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(fast, results(inp, chunk_size=2, rule="deltanet"), strict=True))
    inp = dict(inp, delta=torch.ones_like(inp["theta"]))
    fast = results(inp, chunk_size=2, rule="yaad", impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(fast, results(inp, chunk_size=2, rule="yaad"), strict=True))


def test_gamma_on_the_fast_path_equals_the_reference():
    inp = make(T=7, depth=2, residual=True, seed=13, gamma=True)
    assert_all_close(results(inp, chunk_size=3, impl="reference"), results(inp, chunk_size=3, impl="torch"), 1e-10)


@pytest.mark.parametrize("base", ["titans", "yaad", "atlas"])
def test_lq_2_equals_decay(base):
    rule = RULES[base]
    inp = make(T=7, depth=2, residual=True, seed=14, delta=rule.loss == "huber", gamma=True)
    lq2 = dataclasses.replace(rule, retention="lq", lq=2.0)
    assert_all_close(results(inp, chunk_size=3, rule=rule, impl="reference"), results(inp, chunk_size=3, rule=lq2),
                     1e-12)


def test_huber_with_large_delta_is_l2_and_with_small_delta_is_scaled_l1():
    inp = make(T=7, depth=2, residual=True, seed=15)
    large = dict(inp, delta=torch.full_like(inp["theta"], 1e6))
    r_l2 = results(inp, chunk_size=2, impl="reference")
    r_huber = results(large, chunk_size=2, rule="yaad")
    assert_all_close(r_l2, r_huber[:-1], 1e-12)  # the last gradient is delta's: zero inside the l2 branch
    assert torch.equal(r_huber[-1], torch.zeros_like(r_huber[-1]))
    # every error beyond a small constant delta: the step is delta * sign(e), the l1 (lp, p = 1) step scaled by delta
    c = 1e-3
    small = dict(inp, delta=torch.full_like(inp["theta"], c))
    l1 = dict(inp, theta=c * inp["theta"])
    o_h, st_h = call(small, chunk_size=2, rule="yaad")
    o_1, st_1 = call(l1, chunk_size=2, rule=MemoryRule(loss="lp", p=1.0))
    assert_close("o", o_1, o_h, 1e-12)
    assert_close("W", st_1.weights[1], st_h.weights[1], 1e-12)


@pytest.mark.parametrize("name", ["titans", "moneta"])
def test_window_1_with_gamma_1_equals_no_window(name):
    inp = make(T=7, depth=2, residual=True, seed=16)
    ones = dict(inp, gamma=torch.ones_like(inp["theta"]))
    a, b = results(inp, chunk_size=3, rule=name), results(ones, chunk_size=3, rule=name)
    assert len(b) == len(a) + 1 and all(torch.equal(x, y) for x, y in zip(a, b[:-1], strict=True))  # b[-1]: gamma's gradient


def test_newton_schulz_acts_on_singular_values_and_0_steps_is_the_normalised_input():
    g = torch.Generator().manual_seed(17)
    for shape in ((2, 3, 5), (2, 6, 4), (4, 4)):  # wide, tall (transposed inside), square
        S = torch.randn(*shape, generator=g, dtype=F64)
        assert torch.equal(newton_schulz(S, 0), S / (torch.linalg.matrix_norm(S, keepdim=True) + 1e-7))
        for steps in (1, 5):
            assert_close(f"NS{steps} {shape}", svd_ns(S, steps), newton_schulz(S, steps), 1e-12)
    X = newton_schulz(torch.randn(8, 5, generator=g, dtype=F64), 5)  # Muon's band of singular values
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.25


@pytest.mark.parametrize("shape", [(3, 2, 7, 29), (4, 40, 9), (5, 6, 6), (2, 9, 13), (16, 64), (3, 1, 12), (2, 5, 1)],
                         ids=str)
def test_the_chunked_paths_newton_schulz_equals_the_plain_one_and_its_gradient(shape):
    """newton_schulz_fast (a fused multiply-add a step; the Gram domain where the matrix is wide enough: at 5 steps
    (3, 2, 7, 29), (4, 40, 9), (16, 64), (3, 1, 12) and its tall twin (2, 5, 1) take it, (5, 6, 6) and (2, 9, 13) the
    fused form) equals the plain iteration and the SVD form in float64, for 0 .. 5 steps, and so do its input
    gradients; a zero matrix stays 0."""
    g = torch.Generator().manual_seed(sum(shape))
    S = torch.randn(*shape, generator=g, dtype=F64)
    for steps in range(6):
        assert_close(f"NS{steps} {shape}", newton_schulz_fast(S, steps), newton_schulz(S, steps), 1e-12)
        if steps in (1, 5):
            assert_close(f"SVD NS{steps} {shape}", newton_schulz_fast(S, steps), svd_ns(S, steps), 1e-12)
        x, y = S.clone().requires_grad_(), S.clone().requires_grad_()
        w = torch.randn(*shape, generator=g, dtype=F64)
        (newton_schulz_fast(x, steps) * w).sum().backward()
        (newton_schulz(y, steps) * w).sum().backward()
        assert_close(f"grad NS{steps} {shape}", x.grad, y.grad, 1e-10)
    zero = torch.zeros(*shape, dtype=F64, requires_grad=True)
    out = newton_schulz_fast(zero, 5)
    assert not out.any()
    out.sum().backward()  # finite: the Gram form's norm from the trace has no 0 / 0 at S = 0
    plain = torch.zeros(*shape, dtype=F64, requires_grad=True)
    newton_schulz(plain, 5).sum().backward()
    assert torch.isfinite(zero.grad).all()
    assert_close(f"grad at 0 {shape}", zero.grad, plain.grad, 1e-10)


def test_the_gram_domains_float32_rounding_stays_that_of_the_plain_form():
    """A momentum with decaying singular values (1 .. 1e-6) in float32: the chunked path's Newton-Schulz stays within
    a small factor of the plain iteration's own float32 error (both against float64). One Gram-domain run of all 5
    steps lets P grow to ~a^5 where X_0 is small and was ~30x worse; runs of <= 3 steps are not."""
    g = torch.Generator().manual_seed(31)
    q = lambda *s: torch.linalg.qr(torch.randn(*s, generator=g, dtype=F64))[0]  # noqa: E731
    S = q(8, 64, 64) @ torch.diag_embed(torch.logspace(0, -6, 64, dtype=F64)) @ q(8, 256, 64).mT  # [8, 64, 256]
    truth = newton_schulz(S, 5)
    plain = (newton_schulz(S.float(), 5).double() - truth).abs().max()
    fast = (newton_schulz_fast(S.float(), 5).double() - truth).abs().max()
    assert fast <= 4 * plain, (fast.item(), plain.item())
    # the gradient: ~19x the plain form's float32 error here (docs/MEMORY_RULE.md); a run of all 5 steps, or a
    # backward that lets P's growth into the small directions, would show as more
    W = torch.randn(8, 64, 256, generator=g, dtype=F64)
    grads = []  # the float64 truth, then the plain and the Gram form in float32
    for ns, dtype in ((newton_schulz, F64), (newton_schulz, torch.float32), (newton_schulz_fast, torch.float32)):
        x = S.detach().to(dtype).clone().requires_grad_()
        (ns(x, 5) * W.to(dtype)).sum().backward()
        grads.append(x.grad.double())
    plain, fast = ((grad - grads[0]).abs().max() for grad in grads[1:])
    assert fast <= 40 * plain, (fast.item(), plain.item())


@pytest.mark.parametrize("dim", ["row", "all"])
def test_memora_stays_on_the_scaled_simplex_and_is_its_papers_softmax_recurrence(dim):
    rule = MemoryRule(retention="kl", softmax_scale=2.5, softmax_dim=dim)
    inp = make(T=8, depth=2, residual=True, seed=18, logits=True, theta=1.0)
    o, st = call(inp, chunk_size=3, rule=rule)
    for W in effective_weights(st.weights, rule):
        assert bool((W > 0).all())
        sums = W.sum(-1) if dim == "row" else W.sum((-2, -1))
        assert_close("sums", torch.full_like(sums, 2.5), sums, 1e-14)
    # Miras Table 1, per token: W_t = c softmax((1 - alpha_t) log(W_{t-1} / c) - theta_t grad l2(W_{t-1})), eta = 0
    inp = dict(make(T=6, seed=19, logits=True, theta=1.0), eta=torch.zeros(2, 6, 2, dtype=F64))
    o, st = call(inp, chunk_size=1, rule=rule)
    q, k, v, th, al = (inp[n] for n in ("q", "k", "v", "theta", "alpha"))

    def simplex(x):
        return 2.5 * (torch.softmax(x, -1) if dim == "row" else torch.softmax(x.flatten(-2), -1).view_as(x))

    W = simplex(inp["weights"][0])
    for t in range(6):
        grad = 2 * ((W @ k[:, t, :, :, None])[..., 0] - v[:, t])[..., None] * k[:, t, :, None, :]
        W = simplex((1 - al[:, t, :, None, None]) * torch.log(W / 2.5) - th[:, t, :, None, None] * grad)
        assert_close(f"o[{t}]", (W @ q[:, t, :, :, None])[..., 0], o[:, t], 1e-12)


def test_moneta_norm_identity():
    g = torch.Generator().manual_seed(20)
    A = torch.randn(2, 3, 4, 5, generator=g, dtype=F64)
    for lq in (1.5, 2.0, 3.0, 4.0, 6.0):
        W = effective_weights(A, MemoryRule(retention="lq", lq=lq))
        norm = lambda x: torch.linalg.vector_norm(x, ord=lq, dim=(-2, -1))  # noqa: E731
        assert_close(f"lq={lq}", norm(A) ** (3 - lq), norm(W), 1e-13)
    rule = RULES["moneta"]
    o, st = call(make(T=6, depth=2, residual=True, seed=21), chunk_size=2, rule=rule)
    for a, w in zip(st.weights, effective_weights(st.weights, rule), strict=True):
        assert_close("state", torch.linalg.vector_norm(a, 4, dim=(-2, -1)) ** -1,
                     torch.linalg.vector_norm(w, 4, dim=(-2, -1)), 1e-13)
    assert torch.equal(effective_weights(torch.zeros(3, 3, dtype=F64), rule), torch.zeros(3, 3, dtype=F64))


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_dot_decay_eta0_matrix_memory_is_gated_linear_attention(impl):
    inp = dict(make(T=9, seed=22), eta=torch.zeros(2, 9, 2, dtype=F64))
    o, st = call(inp, chunk_size=4, rule="linear_attention", impl=impl)
    q, k, v, th, al = (inp[n] for n in ("q", "k", "v", "theta", "alpha"))
    S = inp["weights"][0].clone()
    for t in range(9):  # S_t = (1 - alpha_t) S_{t-1} + theta_t v_t k_t^T,  o_t = S_t q_t
        S = (1 - al[:, t, :, None, None]) * S + th[:, t, :, None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        assert_close(f"o[{t}]", (S @ q[:, t, :, :, None])[..., 0], o[:, t], 1e-13)
    assert_close("S_T", S, st.weights[0], 1e-13)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_l2_eta0_alpha0_chunk1_matrix_memory_is_deltanet(impl):
    z = torch.zeros(2, 9, 2, dtype=F64)
    inp = dict(make(T=9, seed=23, theta=0.5), eta=z, alpha=z)
    o, st = call(inp, chunk_size=1, rule="deltanet", impl=impl)
    # grad of ||Wk - v||^2 is 2 (Wk - v) k^T: DeltaNet's beta is 2 theta
    o_d, S_d = delta_rule(inp["q"], inp["k"], inp["v"], 2 * inp["theta"], initial_state=inp["weights"][0],
                          output_final_state=True)
    assert_close("o", o_d, o, 1e-12)
    assert_close("S_T", S_d, st.weights[0], 1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# streaming, gradients


def test_windowed_stream_cut_anywhere_equals_one_call():
    rule = MemoryRule(loss="huber", retention="kl", optimizer="muon", ns_steps=2, window=3)
    inp = make(B=1, T=7, H=2, depth=2, residual=True, seed=24, delta=True, gamma=True, logits=True)

    def piece(x, a, b):
        return {n: (t[:, a:b] if isinstance(t, torch.Tensor) and n not in ("weights",) else t) for n, t in x.items()}

    def streamed(x, cuts):
        outs, state, bounds = [], None, [0, *cuts, 7]
        for a, b in pairwise(bounds):
            p = piece(x, a, b)
            if state is not None:
                p.pop("weights")
                p["initial_state"] = state
            o, state = call(p, chunk_size=2, rule=rule)
            outs.append(o)
        return torch.cat(outs, 1), state

    full = with_grad(inp)
    o_ref, st_ref = call(full, chunk_size=2, rule=rule)
    g_ref = torch.autograd.grad((o_ref * o_ref).sum(), [full["k"], full["gamma"], full["delta"], full["v"]])
    for cuts in ([1], [2], [3], [4], [5], [6], [1, 2], [3, 5], [1, 2, 3, 4, 5, 6]):
        x = with_grad(inp)
        o, st = streamed(x, cuts)
        assert_close(f"o {cuts}", o_ref, o, 1e-13)
        assert st.offset == st_ref.offset and len(st.window) == 4 and st.window[0].shape[1] == 2
        for name in ("weights", "momentum", "anchor", "window"):
            for a, b in zip(getattr(st_ref, name), getattr(st, name), strict=True):
                assert_close(f"state.{name} {cuts}", a, b, 1e-13)
        grads = torch.autograd.grad((o * o).sum(), [x["k"], x["gamma"], x["delta"], x["v"]])
        for name, a, b in zip(("k", "gamma", "delta", "v"), g_ref, grads, strict=True):
            assert_close(f"d{name} {cuts}", a, b, 1e-12)
    # a cut stream with its window dropped is not the same stream (the carried tokens matter)
    x = with_grad(inp)
    o1, st1 = call(piece(x, 0, 4), chunk_size=2, rule=rule)
    p = piece(x, 4, 7)
    p.pop("weights")
    o2, _ = call(p, chunk_size=2, rule=rule, initial_state=dataclasses.replace(st1, window=()))
    assert not torch.allclose(o2, o_ref[:, 4:])
    assert [t.requires_grad for t in st1.detach().window] == [False] * 4


@pytest.mark.parametrize("name", list(RULES))
def test_reference_gradients_exist_and_are_finite(name):
    rule = RULES[name]
    inp = with_grad(make(T=6, depth=2, residual=True, seed=25, delta=rule.loss == "huber", gamma=True,
                         logits=rule.retention == "kl"))
    o, st = call(inp, chunk_size=4, rule=rule, impl="reference")
    loss = (o * o).sum() + sum((w * w).sum() for w in st.weights)
    grads = torch.autograd.grad(loss, tensors(inp))
    for i, d in enumerate(grads):
        assert bool(torch.isfinite(d).all()) and d.abs().sum() > 0, f"{name}: gradient {i}"


@pytest.mark.parametrize("rule,depth", [
    (MemoryRule(loss="lp", p=3.0, retention="lq", lq=4.0, optimizer="muon", ns_steps=2, window=2), 1),
    (MemoryRule(loss="huber", retention="kl", softmax_dim="all", window=2), 2),
])
def test_gradcheck(rule, depth):
    inp = make(B=1, T=4, H=1, K=2, V=2, depth=depth, seed=26, delta=rule.loss == "huber", gamma=True,
               logits=rule.retention == "kl", residual=depth == 2)
    names = [n for n in inp if n != "residual"]
    flat = tensors(inp)

    def fn(*xs):
        it, x = iter(xs), {}
        for n in names:
            x[n] = tuple(next(it) for _ in inp[n]) if isinstance(inp[n], tuple) else next(it)
        o, st = call(dict(x, residual=inp["residual"]), chunk_size=2, rule=rule)
        return o, *st.weights

    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in flat])


# ----------------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("field,value", [
    ("loss", "l3"), ("p", 0.5), ("p", float("nan")), ("p", True), ("retention", "l2"), ("lq", 0.9),
    ("softmax_scale", 0.0), ("softmax_dim", "col"), ("optimizer", "adam"), ("ns_steps", -1), ("ns_steps", 2.0),
    ("window", 0),
])
def test_bad_rule_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MemoryRule\.{field} must"):
        MemoryRule(**{field: value})


def test_bad_rule_inputs():
    inp = make(T=5, seed=27)
    with pytest.raises(ValueError, match=r"presets \('titans', 'moneta'.*'deltanet'\)"):
        call(inp, rule="monetta")
    with pytest.raises(TypeError, match="rule must be"):
        call(inp, rule={"loss": "l2"})
    with pytest.raises(ValueError, match="delta .* is required for loss='huber'"):
        call(inp, rule="yaad")
    with pytest.raises(ValueError, match="delta is used only by loss='huber'"):
        call(dict(inp, delta=torch.ones_like(inp["theta"])), rule="titans")
    with pytest.raises(ValueError, match=r"delta must lie in \(0, inf\)"):
        call(dict(inp, delta=torch.zeros_like(inp["theta"])), rule="yaad")
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
            call(dict(inp, gamma=torch.full_like(inp["theta"], bad)), rule="atlas")
    with pytest.raises(ValueError, match=r"gamma must be \[B, T, H\]"):
        call(dict(inp, gamma=torch.ones(2, 5, dtype=F64)), rule="atlas")
    with pytest.raises(ValueError, match="Triton kernels cover.*retention='lq'"):
        call(inp, rule="moneta", impl="triton")
    with pytest.raises(ValueError, match="Triton kernels cover.*rule 'atlas' has optimizer='muon', window=4"):
        call(inp, rule="atlas", impl="triton")
    with pytest.raises(ValueError, match="normalize_step is defined"):
        call(inp, rule="memora", normalize_step=True)
    with pytest.raises(ValueError, match="loss must be one of"):
        call(inp, loss="l1")
    _, st = call(dict(inp, delta=torch.ones_like(inp["theta"])), rule=dataclasses.replace(RULES["yaad"], window=3))
    more = {n: x for n, x in inp.items() if n != "weights"}
    with pytest.raises(ValueError, match="carries delta"):
        call(more, rule="atlas", initial_state=st)
    with pytest.raises(ValueError, match=r"\(window 2\) carries 0 < n <= 1 tokens"):
        call(dict(more, delta=torch.ones_like(inp["theta"])), rule=dataclasses.replace(RULES["yaad"], window=2),
             initial_state=st)


# -- Lattice: the orthogonal slot update (optimizer="orthogonal"; reference and chunked torch path) -------------------

LATTICE = MemoryRule(optimizer="orthogonal")


def test_orthogonal_step_moves_each_slot_orthogonally_and_keeps_it_unit():
    from mnemos.ops.memory_rule.rule import orthogonal_step

    g = torch.Generator().manual_seed(3)
    A = F.normalize(torch.randn(2, 3, 5, 4, generator=g, dtype=F64), dim=-2)  # 4 unit slots of width 5
    S = 0.3 * torch.randn(2, 3, 5, 4, generator=g, dtype=F64)
    new = orthogonal_step(A, S)
    assert_close("unit slots", torch.ones(2, 3, 4, dtype=F64), new.norm(dim=-2), 1e-12)
    moved = new * (A + S - (A * S).sum(-2, keepdim=True) * A).norm(dim=-2, keepdim=True) - A  # before normalising
    assert (moved * A).sum(-2).abs().max() < 1e-12  # the step is orthogonal to the slot it moves
    assert torch.equal(orthogonal_step(A, torch.zeros_like(S)), A / A.norm(dim=-2, keepdim=True))  # no step: fixed


def test_lattice_token_by_token_matches_the_formula_written_out():
    """eta = alpha = 0, a matrix memory M(z) = A z: s_i <- normalise(s_i + theta * 2 z_i (I - s_i s_i^T) e), with
    e = v - A z, the slots the columns (the reading in docs/MEMORY_RULE.md), one token at a time."""
    inp = make(T=5, seed=41, theta=0.3)
    inp["eta"] = torch.zeros_like(inp["eta"])
    inp["alpha"] = torch.zeros_like(inp["alpha"])
    inp["weights"] = (F.normalize(inp["weights"][0], dim=-2),)
    o, st = call(inp, rule=LATTICE, chunk_size=1)
    A = inp["weights"][0].clone()  # [B, H, V, K]
    outs = []
    for t in range(5):
        z, v, th = inp["k"][:, t], inp["v"][:, t], inp["theta"][:, t]  # [B, H, K], [B, H, V], [B, H]
        e = v - torch.einsum("bhvk,bhk->bhv", A, z)
        step = 2 * th[..., None, None] * e[..., :, None] * z[..., None, :]  # [B, H, V, K]: column i is 2 theta z_i e
        step = step - (A * step).sum(-2, keepdim=True) * A  # orthogonal to each unit slot
        A = F.normalize(A + step, dim=-2)
        outs.append(torch.einsum("bhvk,bhk->bhv", A, inp["q"][:, t]))
    assert_close("outputs", torch.stack(outs, 1), o, 1e-12)
    assert_close("slots", A, st.weights[0], 1e-12)


def test_lattice_runs_on_the_chunked_path_and_is_refused_where_it_is_not_built():
    inp = make(T=6, seed=42)
    o, st = call(inp, rule=LATTICE, chunk_size=2)  # auto: the chunked torch path (test_memory_rule_chunked_axes.py)
    fast, _ = call(inp, rule=LATTICE, chunk_size=2, impl="torch")
    ref, _ = call(inp, rule=LATTICE, chunk_size=2, impl="reference")
    assert torch.equal(o, fast)
    assert_close("chunked == reference", ref, o, 1e-10)
    assert_close("unit slots", torch.ones_like(st.weights[0][..., 0, :]), st.weights[0].norm(dim=-2), 1e-12)
    theta0 = dict(inp, theta=torch.zeros_like(inp["theta"]), weights=(F.normalize(inp["weights"][0], dim=-2),))
    _, st0 = call(theta0, rule=dataclasses.replace(LATTICE), chunk_size=2)
    assert_close("theta 0 keeps unit slots", theta0["weights"][0], st0.weights[0], 1e-12)
    with pytest.raises(ValueError, match="optimizer='orthogonal'"):
        call(inp, rule=LATTICE, impl="triton")
    for impl in ("auto", "torch", "reference"):
        with pytest.raises(ValueError, match=r"optimizer='orthogonal' \(Lattice\) .*\(depth 1\), got 2"):
            call(make(seed=43, depth=2), rule=LATTICE, impl=impl)
