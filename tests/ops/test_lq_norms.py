"""Moneta's per-token norms on the CPU (``cpu_scan.Lq4Norms``, cpu_scan.cpp): ``sum A_t^4`` of every token's
accumulator in a chunk, stepped through the recurrence in cache instead of formed. Checked against the recurrence
written out in torch (outputs and all seven gradients, float64, odd shapes, Omega windows), by gradcheck, float32
against float64, across threads, and through the op: Moneta's chunked path with the kernel equals the same path
forming every token's state (``cpu_kernel(False)``) and the token-by-token reference."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mnemos.ops import MemoryRule, neural_memory
from mnemos.ops.memory_rule import cpu_scan
from mnemos.ops.memory_rule.cpu_scan import cpu_kernel, lq4_norms
from torch.testing import assert_close

F64 = torch.float64
pytestmark = pytest.mark.skipif(cpu_scan.unavailable_reason() is not None,
                                reason=f"compiled kernels unavailable: {cpu_scan.unavailable_reason()}")


def recurrence(A0, S0, d, a, beta, eta, Wb):
    """The obviously-right form: every state formed, token after token."""
    n, w = Wb.shape[-2:]
    A, S, out = A0, S0, []
    for t in range(n):
        U = sum(Wb[..., t, k, None, None] * d[..., t + k, :, None] * a[..., t + k, None, :] for k in range(w))
        S = eta[..., t, None, None] * S - U
        A = beta[..., t, None, None] * A + S
        out.append(A.pow(4).sum((-2, -1)))
    return torch.stack(out, -1)


def inputs(B, H, P, Q, n, w, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    m = n + w - 1
    return [r(B, H, P, Q), r(B, H, P, Q), r(B, H, m, P), r(B, H, m, Q), u(B, H, n), u(B, H, n), u(B, H, n, w)]


CONFIGS = [(1, 1, 1, 1, 1, 1), (2, 3, 5, 7, 4, 1), (1, 2, 33, 70, 5, 3), (2, 1, 256, 64, 16, 1), (1, 3, 64, 256, 3, 2),
           (3, 1, 9, 600, 7, 4), (1, 1, 700, 3, 2, 5)]  # the last two: a tile of one matrix row, a tile of many rows


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_norms_and_every_gradient_match_the_recurrence(cfg):
    xs = [x.requires_grad_() for x in inputs(*cfg, seed=sum(cfg))]
    g = torch.randn(*xs[-1].shape[:-1], dtype=F64)
    got = lq4_norms(*xs)
    want = recurrence(*xs)
    assert_close(got, want, rtol=1e-12, atol=0)
    names = ("A0", "S0", "d", "a", "beta", "eta", "Wb")
    for name, x, y in zip(names, torch.autograd.grad(got, xs, g), torch.autograd.grad(want, xs, g)):
        assert_close(x, y, rtol=1e-11, atol=1e-12 * y.abs().max().item(), msg=name)


def test_gradcheck():
    xs = [x.requires_grad_() for x in inputs(1, 2, 3, 5, 3, 2, seed=7)]
    assert torch.autograd.gradcheck(lq4_norms, xs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_float32_against_float64():
    x64 = inputs(2, 2, 64, 48, 8, 2, seed=3)
    x32 = [x.float() for x in x64]
    assert_close(lq4_norms(*x32).double(), lq4_norms(*x64), rtol=2e-5, atol=0)


def test_threads_split_rows_without_changing_a_bit():
    xs = [x.float().requires_grad_() for x in inputs(3, 3, 40, 33, 6, 2, seed=5)]
    got = []
    for threads in (1, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            n = lq4_norms(*xs)
            got.append((n, torch.autograd.grad(n, xs, torch.ones_like(n))))
        finally:
            torch.set_num_threads(old)
    assert torch.equal(got[0][0], got[1][0])
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))


# ----------------------------------------------------------------------------------------------------------------------
# through the op


def moneta_inputs(B, T, H, D, depth, window, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    dims = [D] + [2 * D] * (depth - 1) + [D]
    x = dict(q=F.normalize(r(B, T, H, D), dim=-1), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
             theta=0.3 * torch.sigmoid(r(B, T, H)), eta=torch.sigmoid(r(B, T, H)),
             alpha=0.2 * torch.sigmoid(r(B, T, H)),
             weights=tuple(0.3 * r(H, o, i) for i, o in zip(dims, dims[1:])))
    if window > 1:
        x["gamma"] = torch.sigmoid(r(B, T, H))
    return x


def call(x, rule, chunk, impl="torch"):
    x = {n: (tuple(t.detach().requires_grad_() for t in v) if isinstance(v, tuple) else v.detach().requires_grad_())
         for n, v in x.items()}
    args = [x.pop(n) for n in ("q", "k", "v", "theta", "eta", "alpha", "weights")]
    o, st = neural_memory(*args, rule=rule, chunk_size=chunk, impl=impl, output_final_state=True, **x)
    loss = (o * torch.linspace(-1, 1, o.shape[-1], dtype=F64)).sum() + sum(w.square().sum() for w in st.weights)
    leaves = [*args[:6], *args[6], *x.values()]
    return o, st, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("seed", range(6))
def test_moneta_with_the_kernel_equals_forming_every_state_and_the_reference(seed, monkeypatch):
    rnd = random.Random(seed)
    depth, window, chunk = rnd.choice((1, 2)), rnd.choice((1, 1, 2, 3)), rnd.choice((2, 3, 16))
    T = rnd.choice((5, 11, 20))
    rule = MemoryRule(loss=rnd.choice(("l2", "lp")), p=3.0, retention="lq", lq=4.0, window=window)
    x = moneta_inputs(rnd.choice((1, 2)), T, rnd.choice((1, 3)), rnd.choice((4, 6)), depth, window, seed)
    calls = []
    real = cpu_scan.lq4_norms
    monkeypatch.setattr(cpu_scan, "lq4_norms", lambda *a: calls.append(1) or real(*a))
    fast = call(x, rule, chunk)
    assert calls, "Moneta's chunked path did not take the kernel"
    calls.clear()
    with cpu_kernel(False):
        dense = call(x, rule, chunk)
    assert not calls
    ref = call(x, rule, chunk, impl="reference")
    for other, tol in ((dense, 1e-11), (ref, 1e-9)):
        assert_close(fast[0], other[0], rtol=tol, atol=tol)
        for a, b in zip(fast[1].weights, other[1].weights):
            assert_close(a, b, rtol=tol, atol=tol)
        for i, (a, b) in enumerate(zip(fast[2], other[2])):
            assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()), msg=f"gradient {i}")


def test_other_exponents_and_devices_form_the_states(monkeypatch):
    """lq != 4 has no kernel: the chunk forms every state (and says nothing); a tensor the kernel cannot take is
    named by the reason."""
    called = []
    monkeypatch.setattr(cpu_scan, "lq4_norms", lambda *a: called.append(1))
    x = moneta_inputs(1, 6, 1, 4, 2, 1, 0)
    call(x, MemoryRule(retention="lq", lq=3.0), 4)
    assert not called
    assert "float32 or float64" in cpu_scan.lq4_norms_unsupported_reason(torch.zeros(1, dtype=torch.bfloat16))
