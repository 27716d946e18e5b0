"""Muon (Atlas) in the chunk's row space (``memory_rule/muon_rowspace.py``): where a layer's short side plus the
chunk's rank-one terms is below its long side, Newton-Schulz runs on the momenta's coordinates in that row space and
a closed-form correction supplies the gradient's part outside it. Checked against the token-by-token reference in
float64 (outputs, final state, every input gradient) on shapes where the path is taken, asserted taken, with and
without an initial momentum (a zero one makes the basis rank-deficient), both orientations (wide and tall layers),
NS steps 0-5, windows 1-4, streams cut anywhere; gradcheck; float32 beside the path it replaces."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mnemos.ops import MemoryRule
from mnemos.ops.memory_rule import dense_scan, muon_rowspace as mr
from mnemos.testing import assert_close
from mnemos.ops.memory_rule.muon_rowspace import newton_schulz_with_polynomial, rowspace_pays
from mnemos.ops.memory_rule.rule import newton_schulz
from test_memory_rule_chunked_axes import assert_same, flat, outcomes, run

F64 = torch.float64


@pytest.fixture
def taken(monkeypatch):
    """Counts the layer-chunks that ran in the row space."""
    count = {"n": 0}
    real = mr.muon_rowspace

    def counted(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(dense_scan, "muon_rowspace", counted)
    return count


def draw(seed: int, dtype=F64) -> dict:
    """A Muon config whose memory has a long side well above short side + chunk + window: depth 1-3, expansion 4-6,
    a tall first layer and a wide last one, chunk 1-4, T not a multiple of it."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    window, chunk = r.choice((1, 2, 3, 4)), r.choice((1, 2, 3, 4))
    rule = MemoryRule(loss=r.choice(("l2", "huber", "lp", "dot")), p=3.0, optimizer="muon",
                      ns_steps=r.choice((0, 1, 2, 5)), window=window)
    depth = r.choice((1, 2, 2, 3))
    B, H, K = r.choice((1, 2)), r.choice((1, 2)), r.choice((2, 3))
    E = r.choice((4, 5, 6))
    T = r.randint(3, 10)
    if chunk > 1 and T % chunk == 0:
        T += 1
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    if depth == 1:  # a matrix memory with a long output side: tall
        widths = [K, E * K + chunk + window]
    else:
        widths = [K] + [E * K + chunk + window] * (depth - 1) + [K]
    lead = (B, H) if r.random() < 0.5 else (H,)
    V = widths[-1]
    inp = dict(q=F.normalize(randn(B, T, H, K), dim=-1), k=F.normalize(randn(B, T, H, K), dim=-1),
               v=randn(B, T, H, V), theta=0.1 * rand(B, T, H), eta=0.9 * rand(B, T, H), alpha=0.3 * rand(B, T, H),
               weights=tuple(randn(*lead, widths[i + 1], widths[i]) / widths[i] ** 0.5 for i in range(depth)))
    if r.random() < 0.5:
        inp["momentum"] = tuple(0.1 * randn(B, *w.shape[-3:]) for w in inp["weights"])
    if rule.loss == "huber":
        inp["delta"] = 0.1 + 1.5 * rand(B, T, H)
    if window > 1 or r.random() < 0.5:
        inp["gamma"] = rand(B, T, H)
    kw = dict(rule=rule, chunk_size=chunk, residual=False, activation=r.choice(("gelu", "silu")))
    return dict(inp=inp, kw=kw, cut=r.randint(1, T - 1), desc=f"seed {seed}: {rule} widths {widths} chunk {chunk} T {T}")


def test_the_draws_cover_both_orientations_every_ns_step_count_and_a_zero_momentum():
    seen = set()
    for seed in range(40):
        c = draw(seed)
        shapes = [w.shape[-2:] for w in c["inp"]["weights"]]
        seen |= {("wide" if o <= i else "tall") for o, i in shapes}
        seen |= {f"ns {c['kw']['rule'].ns_steps}", "momentum" if "momentum" in c["inp"] else "zero momentum"}
        seen |= {f"window {c['kw']['rule'].window}", f"chunk {c['kw']['chunk_size']}"}
    assert seen >= {"wide", "tall", "ns 0", "ns 1", "ns 2", "ns 5", "momentum", "zero momentum", "window 1",
                    "window 4", "chunk 1", "chunk 4"}, seen


@pytest.mark.parametrize("block", range(4))
def test_rowspace_equals_reference_and_streams_cut_anywhere(block, taken):
    for seed in range(block, 40, 4):
        c = draw(seed)
        ref, _ = outcomes(c["inp"], impl="reference", **c["kw"])
        before = taken["n"]
        fast, _ = outcomes(c["inp"], impl="torch", **c["kw"])
        assert taken["n"] > before, f"{c['desc']}: the row-space path was not taken"
        assert_same(c["desc"], ref, fast, 1e-9)
        cut, _ = outcomes(c["inp"], impl="torch", cut=c["cut"], **c["kw"])
        assert_same(f"{c['desc']} cut at {c['cut']}", fast, cut, 1e-11)


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_plain_newton_schulz_and_its_backward_equal_autograd_through_the_reference(steps):
    """The hand-written backward against autograd through ``rule.newton_schulz``, float64, odd shapes, a zero
    matrix among them (the norm's gradient there), and more matrices than a block (three blocks, the last partial,
    a zero matrix in the second)."""
    assert 2 * mr.NS_BLOCK < 75 < 3 * mr.NS_BLOCK
    g = torch.Generator().manual_seed(steps)
    for shape in ((3, 4, 7), (2, 2, 5, 9), (1, 6), (3, 25, 4, 7)):
        L = torch.randn(*shape, generator=g, dtype=F64)
        L.view(-1, *shape[-2:])[0] = 0.0
        if L[..., 0, 0].numel() > mr.NS_BLOCK:
            L.view(-1, *shape[-2:])[mr.NS_BLOCK + 3] = 0.0
        a, b = L.clone().requires_grad_(), L.clone().requires_grad_()
        X, R = newton_schulz_with_polynomial(a, steps, polynomial=True)
        ref = newton_schulz(b, steps)
        assert_close(f"steps {steps} {shape}: X", ref, X, 1e-13)
        w = torch.randn(X.shape, generator=g, dtype=F64)
        (X * w).sum().backward()
        (ref * w).sum().backward()
        assert_close(f"steps {steps} {shape}: dL", b.grad, a.grad, 1e-12)
        assert R.shape == (*shape[:-2], shape[-2], shape[-2]) and not R.requires_grad
        flat_L, flat_R = L.view(-1, *shape[-2:]), R.reshape(-1, shape[-2], shape[-2])
        for i in (0, flat_L.shape[0] - 1):  # R per matrix: the same in a block of one
            assert_close(f"steps {steps} {shape}: R[{i}]", newton_schulz_with_polynomial(flat_L[i:i + 1], steps, True)[1],
                         flat_R[i:i + 1], 1e-14)


@pytest.mark.parametrize("steps", [0, 2, 5])
def test_a_change_orthogonal_to_the_rows_moves_ns_by_R(steps):
    """The gradient correction's premise: for D with rows orthogonal to L's rows, ``NS(L + e D) - NS(L) = e R D +
    O(e^2)`` with R the returned polynomial (a central difference in float64), while a change inside the rows does
    not follow R (so the test can tell)."""
    g = torch.Generator().manual_seed(10 + steps)
    m, r, n = 4, 6, 11  # L [4, 11] with rows in a 6-dimensional subspace
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    L = torch.randn(2, m, r, generator=g, dtype=F64) @ basis[:, :r].T
    D = torch.randn(2, m, n - r, generator=g, dtype=F64) @ basis[:, r:].T
    _, R = newton_schulz_with_polynomial(L, steps, polynomial=True)
    eps = 1e-5
    fd = (newton_schulz(L + eps * D, steps) - newton_schulz(L - eps * D, steps)) / (2 * eps)
    assert_close(f"steps {steps}: orthogonal change", fd, R @ D, 1e-8)
    inside = torch.randn(2, m, r, generator=g, dtype=F64) @ basis[:, :r].T
    fd_in = (newton_schulz(L + eps * inside, steps) - newton_schulz(L - eps * inside, steps)) / (2 * eps)
    assert (fd_in - R @ inside).abs().max() > 1e-3


def test_gradcheck(taken):
    """Every input of a small Muon call on the row-space path (a tall and a wide layer, a window, no initial
    momentum), by finite differences."""
    g = torch.Generator().manual_seed(3)
    B, T, H, K, E = 1, 5, 1, 2, 5
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    inp = dict(q=randn(B, T, H, K), k=F.normalize(randn(B, T, H, K), dim=-1), v=randn(B, T, H, K),
               theta=0.2 * rand(B, T, H), eta=0.9 * rand(B, T, H), alpha=0.3 * rand(B, T, H),
               weights=(randn(B, H, E * K, K) / K ** 0.5, randn(B, H, K, E * K) / (E * K) ** 0.5),
               gamma=rand(B, T, H))
    names = list(inp)
    rule = MemoryRule(optimizer="muon", ns_steps=2, window=2)

    def fn(*xs):
        it, x = iter(xs), {}
        for n in names:
            x[n] = tuple(next(it) for _ in inp[n]) if isinstance(inp[n], tuple) else next(it)
        o, st = run(x, impl="torch", rule=rule, chunk_size=2, residual=True)
        return o, *st.weights, *st.momentum

    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in flat(inp)])
    assert taken["n"] > 0


def test_float32_error_stays_that_of_the_path_it_replaces(monkeypatch):
    """Atlas in float32 at a layer-like shape (head 16, expansion 4, chunk 8, window 4): outputs and input gradients
    against float64, on the row-space path and on the path that forms every momentum; the row space may not be
    more than twice as far off."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K = 1, 40, 2, 16
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    inp = dict(q=F.normalize(randn(B, T, H, K), dim=-1), k=F.normalize(randn(B, T, H, K), dim=-1),
               v=randn(B, T, H, K), theta=0.05 * rand(B, T, H), eta=0.9 * rand(B, T, H),
               alpha=0.05 * rand(B, T, H), weights=(randn(H, 4 * K, K) / K ** 0.5, randn(H, K, 4 * K) / (2 * K)),
               gamma=rand(B, T, H))
    kw = dict(rule="atlas", chunk_size=8, residual=True)

    def result(dtype):
        x = {n: (tuple(w.to(dtype).requires_grad_() for w in v) if isinstance(v, tuple)
                 else v.to(dtype).requires_grad_()) for n, v in inp.items()}
        o, st = run(x, impl="torch", **kw)
        wave = torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)
        grads = torch.autograd.grad((o * wave).sum() + sum((w * w).sum() for w in st.weights), flat(x))
        return [o, *st.weights, *grads]

    truth = result(F64)

    def error(dtype=torch.float32):
        return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(result(dtype), truth, strict=True))

    assert rowspace_pays(torch.empty(4 * K, K), 8 + 3)
    rowspace = error()
    monkeypatch.setattr(dense_scan, "rowspace_pays", lambda *a: False)
    dense = error()
    assert rowspace < 1e-4 and rowspace <= 2 * dense, (rowspace, dense)


def test_when_the_row_space_pays():
    assert rowspace_pays(torch.empty(256, 64), 19) and rowspace_pays(torch.empty(64, 256, dtype=F64), 19)
    assert not rowspace_pays(torch.empty(64, 64), 1)  # square: no long side to shrink
    assert not rowspace_pays(torch.empty(64, 83), 19)  # short side + rank-one terms = long side
    assert not rowspace_pays(torch.empty(256, 64, dtype=torch.bfloat16), 19)  # no QR in bf16
    assert not rowspace_pays(torch.empty(256, 64, device="meta"), 19)  # measured on the CPU only
