"""The reads of every token's state of a chunk on the CPU (cpu_scan.cpp, "Every token's state of a chunk, read without
being formed"): Moneta's ``N_t = sum A_t^4`` (``cpu_scan.lq4_norms``) and Memora's ``y_t = softmax(A_t) h_t`` by rows
(``cpu_scan.kl_row_read``), the accumulators stepped through their recurrence in cache instead of formed. Checked
against the recurrence written out in torch (outputs and every gradient, float64, odd shapes, Omega windows), by
gradcheck, float32 against float64, across threads, with a non-contiguous output gradient, and through the op: the
chunked path with the kernels equals the same path forming every token's state (``cpu_kernel(False)``) and the
token-by-token reference."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from mnemos.ops import MemoryRule, neural_memory
from mnemos.ops.memory_rule import cpu_scan
from mnemos.ops.memory_rule.cpu_scan import cpu_kernel, kl_row_read, lq4_norms
from torch.testing import assert_close

F64 = torch.float64
pytestmark = pytest.mark.skipif(cpu_scan.unavailable_reason() is not None,
                                reason=f"compiled kernels unavailable: {cpu_scan.unavailable_reason()}")


def states(A0, S0, d, a, beta, eta, Wb, momentum=False):
    """The obviously-right form: every token's accumulator (with ``momentum``: and momentum) formed, token after
    token."""
    n, w = Wb.shape[-2:]
    A, S = A0, S0
    for t in range(n):
        U = sum(Wb[..., t, k, None, None] * d[..., t + k, :, None] * a[..., t + k, None, :] for k in range(w))
        S = eta[..., t, None, None] * S - U
        A = beta[..., t, None, None] * A + S
        yield (A, S) if momentum else A


def lq4_reference(*xs):
    return torch.stack([A.pow(4).sum((-2, -1)) for A in states(*xs)], -1)


def kl_reference(*xs):
    *xs, h = xs
    return torch.stack([(torch.softmax(A, -1) @ h[..., t, :, None]).squeeze(-1) for t, A in enumerate(states(*xs))],
                       -2)


READS = {"lq4": (lq4_norms, lq4_reference), "kl_row": (kl_row_read, kl_reference)}


def inputs(B, H, P, Q, n, w, dtype=F64, seed=0, read="lq4"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    m = n + w - 1
    xs = [r(B, H, P, Q), r(B, H, P, Q), r(B, H, m, P), r(B, H, m, Q), u(B, H, n), u(B, H, n), u(B, H, n, w)]
    if read == "kl_row":
        xs[0] = 3 * xs[0]  # logits spread enough that the softmax is not flat
        xs.append(r(B, H, n, Q))
    return xs


CONFIGS = [(1, 1, 1, 1, 1, 1), (2, 3, 5, 7, 4, 1), (1, 2, 33, 70, 5, 3), (2, 1, 256, 64, 16, 1), (1, 3, 64, 256, 3, 2),
           (3, 1, 9, 600, 7, 4), (1, 1, 700, 3, 2, 5)]  # the last two: a tile of one matrix row, a tile of many rows


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_the_read_and_every_gradient_match_the_states_formed(cfg, read):
    fast, ref = READS[read]
    xs = [x.requires_grad_() for x in inputs(*cfg, seed=sum(cfg), read=read)]
    got, want = fast(*xs), ref(*xs)
    g = torch.randn(want.shape, dtype=F64)
    assert_close(got, want, rtol=1e-12, atol=1e-13)
    names = ("A0", "S0", "d", "a", "beta", "eta", "Wb", "h")[:len(xs)]  # h: the kl read's only
    for name, x, y in zip(names, torch.autograd.grad(got, xs, g), torch.autograd.grad(want, xs, g), strict=True):
        assert_close(x, y, rtol=1e-11, atol=1e-12 * y.abs().max().item(), msg=name)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_the_kl_read_returns_the_last_states_and_takes_their_gradients(cfg):
    """``kl_row_read(..., final=True)``: the accumulator and momentum after the chunk's last token come out of the
    kernel's walk (Memora's next chunk starts there), and their gradients enter its backward beside the read's: all
    three outputs and every input gradient equal the states formed token after token."""
    xs = [x.requires_grad_() for x in inputs(*cfg, seed=sum(cfg) + 1, read="kl_row")]
    y, A_n, S_n = kl_row_read(*xs, final=True)
    want_A, want_S = list(states(*xs[:7], momentum=True))[-1]
    got, want = (y, A_n, S_n), (kl_reference(*xs), want_A, want_S)
    for name, x, z in zip(("y", "A_n", "S_n"), got, want, strict=True):
        assert_close(x, z, rtol=1e-12, atol=1e-13, msg=name)
    gs = [torch.randn(z.shape, dtype=F64) for z in want]
    for with_read in (True, False):  # the last states' gradients alone, and beside the read's
        pick = slice(0 if with_read else 1, 3)
        names = ("A0", "S0", "d", "a", "beta", "eta", "Wb", "h")
        fast = torch.autograd.grad(got[pick], xs, gs[pick], retain_graph=True, allow_unused=True)
        slow = torch.autograd.grad(want[pick], xs, gs[pick], retain_graph=True, allow_unused=True)
        for name, x, z in zip(names, fast, slow, strict=True):
            if z is None:  # h, when only the last states take a gradient: the kernel's is zero
                assert x is None or not x.any(), name
                continue
            assert_close(x, z, rtol=1e-11, atol=1e-12 * z.abs().max().item(), msg=f"{name} (read: {with_read})")


@pytest.mark.parametrize("read", READS)
def test_a_non_contiguous_output_gradient(read):
    """The output's gradient often arrives as a strided view (a slice of a larger one): the kernel must read it, not
    a copy freed before the call."""
    fast, ref = READS[read]
    xs = [x.requires_grad_() for x in inputs(2, 2, 6, 5, 4, 2, seed=11, read=read)]
    got, want = fast(*xs), ref(*xs)
    big = torch.randn(*want.shape[:-1], 2 * want.shape[-1] + 1, dtype=F64)
    g = big[..., 1::2]
    assert not g.is_contiguous()
    for x, y in zip(torch.autograd.grad(got, xs, g), torch.autograd.grad(want, xs, g), strict=True):
        assert_close(x, y, rtol=1e-11, atol=1e-12 * y.abs().max().item())


@pytest.mark.parametrize("read", READS)
def test_gradcheck(read):
    xs = [x.requires_grad_() for x in inputs(1, 2, 3, 5, 3, 2, seed=7, read=read)]
    # a central difference of outputs of size |N| carries rounding of ~|N| eps_64 / eps: lq4's sums of fourth powers
    # reach ~1e3 here, so a fixed atol of 1e-7 held or failed by how the machine rounded (FMA or not), not by the
    # gradient; ten times that bound, and never looser than 1e-7
    eps = 1e-6
    atol = max(1e-7, 10 * READS[read][0](*xs).abs().max().item() * torch.finfo(F64).eps / eps)
    assert torch.autograd.gradcheck(READS[read][0], xs, eps=eps, atol=atol, rtol=1e-6)


@pytest.mark.parametrize("read", READS)
def test_float32_against_float64(read):
    x64 = inputs(2, 2, 64, 48, 8, 2, seed=3, read=read)  # Q = 48: float32's vector exp and its tail
    x32 = [x.float() for x in x64]
    fast = READS[read][0]
    assert_close(fast(*x32).double(), fast(*x64), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", (torch.float32, F64))
@pytest.mark.parametrize("Q", (5, 33, 64, 70))
def test_the_softmax_read_takes_each_rows_true_max(Q, dtype):
    """The kl read shifts each row by its max before the exp: a max that missed an entry (a vector's lanes, the tail
    past the last whole vector, the first entry) would leave exp(x - max) overflowing to inf. One entry of every row,
    at each of those places in turn, stands 400 above the rest; the read must equal the reference, finite."""
    for col in sorted({0, 1, Q // 2, Q - 2, Q - 1}):
        xs = inputs(1, 2, 6, Q, 3, 1, seed=Q + col, read="kl_row")
        xs[0] = xs[0].clone()
        xs[0][..., col] += 400.0  # the row's max, by far; the states stay near A0 (small steps)
        xs[3] = 1e-3 * xs[3]
        got = kl_row_read(*(x.to(dtype) for x in xs))
        assert torch.isfinite(got).all()
        assert_close(got.double(), kl_reference(*xs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("read", READS)
def test_threads_split_rows_without_changing_a_bit(read):
    xs = [x.float().requires_grad_() for x in inputs(3, 3, 40, 33, 6, 2, seed=5, read=read)]
    got = []
    for threads in (1, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            n = READS[read][0](*xs)
            got.append((n, torch.autograd.grad(n, xs, torch.ones_like(n))))
        finally:
            torch.set_num_threads(old)
    assert torch.equal(got[0][0], got[1][0])
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1], strict=True))


# ----------------------------------------------------------------------------------------------------------------------
# through the op


def moneta_inputs(B, T, H, D, depth, window, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    dims = [D] + [2 * D] * (depth - 1) + [D]
    x = dict(q=F.normalize(r(B, T, H, D), dim=-1), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
             theta=0.3 * torch.sigmoid(r(B, T, H)), eta=torch.sigmoid(r(B, T, H)),
             alpha=0.2 * torch.sigmoid(r(B, T, H)),
             weights=tuple(0.3 * r(H, o, i) for i, o in pairwise(dims)))
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


@pytest.mark.parametrize("seed", range(8))
def test_moneta_and_memora_with_the_kernels_equal_forming_every_state_and_the_reference(seed, monkeypatch):
    rnd = random.Random(seed)
    depth, window, chunk = rnd.choice((1, 2)), rnd.choice((1, 1, 2, 3)), rnd.choice((2, 3, 16))
    T = rnd.choice((5, 11, 20))
    read = ("lq4", "kl_row")[seed % 2]
    if read == "lq4":
        rule = MemoryRule(loss=rnd.choice(("l2", "lp")), p=3.0, retention="lq", lq=4.0, window=window)
    else:
        rule = MemoryRule(loss=rnd.choice(("l2", "huber")), retention="kl", softmax_scale=rnd.choice((1.0, 2.5)),
                          window=window)
    x = moneta_inputs(rnd.choice((1, 2)), T, rnd.choice((1, 3)), rnd.choice((4, 6)), depth, window, seed)
    if rule.loss == "huber":
        x["delta"] = 0.5 + torch.rand(x["theta"].shape, dtype=F64)
    calls = []
    real, real_lq4 = cpu_scan.state_read_forward, cpu_scan.lq4_rows  # Memora's dense chunk, Moneta's dual form
    monkeypatch.setattr(cpu_scan, "state_read_forward",
                        lambda name, xs, *rest: calls.append(name) or real(name, xs, *rest))
    monkeypatch.setattr(cpu_scan, "lq4_rows", lambda *xs: calls.append("lq4") or real_lq4(*xs))
    fast = call(x, rule, chunk)
    assert read in calls, f"the chunked path did not take cpu_scan's {read} kernel"
    calls.clear()
    with cpu_kernel(False):
        dense = call(x, rule, chunk)
    assert not calls
    ref = call(x, rule, chunk, impl="reference")
    for other, tol in ((dense, 1e-11), (ref, 1e-9)):
        assert_close(fast[0], other[0], rtol=tol, atol=tol)
        for a, b in zip(fast[1].weights, other[1].weights, strict=True):
            assert_close(a, b, rtol=tol, atol=tol)
        for i, (a, b) in enumerate(zip(fast[2], other[2], strict=True)):
            assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()), msg=f"gradient {i}")


@pytest.mark.parametrize("rule", [MemoryRule(retention="lq", lq=3.0), MemoryRule(retention="kl", softmax_dim="all"),
                                  MemoryRule(retention="kl", optimizer="muon", ns_steps=1)], ids=str)
def test_what_the_kernels_do_not_cover_forms_the_states(rule, monkeypatch):
    """lq != 4, kl over the whole matrix, Muon: no kernel; the chunk forms every state (and the op stays exact)."""
    called = []
    for name in ("lq4_norms", "kl_row_read", "state_read_forward", "lq4_rows"):
        monkeypatch.setattr(cpu_scan, name, lambda *a: called.append(1))
    x = moneta_inputs(1, 6, 1, 4, 2, 1, 0)
    fast, ref = call(x, rule, 4), call(x, rule, 4, impl="reference")
    assert not called
    assert_close(fast[0], ref[0], rtol=1e-9, atol=1e-9)


def test_unsupported_tensors_are_named():
    assert "float32 or float64" in cpu_scan.state_reads_unsupported_reason(torch.zeros(1, dtype=torch.bfloat16))
    assert "CPU" in cpu_scan.state_reads_unsupported_reason(torch.zeros(1, device="meta"))


@pytest.mark.parametrize("cfg", [(2, 3, 5, 7, 4, 1), (1, 2, 33, 70, 5, 3), (2, 1, 9, 300, 3, 1), (1, 3, 6, 4, 2, 2)],
                         ids=str)
def test_lq4_rows_reads_the_halves_of_the_state_in_place_and_adds_its_gradients_into_theirs(cfg):
    """The torch loop's form of Moneta's read (``cpu_scan.lq4_rows`` / ``lq4_rows_backward``): A0 and S0 are the
    halves of one ``[A; S]`` tensor (rows 2 P Q apart) and the backward adds the gradients of A0 and S0 into the halves
    of a state gradient that already holds something. Equal to the autograd node on contiguous copies, and to the same
    call on tensors whose rows are not at one step (a permuted layout: copied, then added back)."""
    B, H, P, Q, n, w = cfg
    A0, S0, *rest = inputs(*cfg, seed=7)
    WS = torch.cat((A0, S0), dim=-2)  # [B, H, 2P, Q]
    views = (WS[..., :P, :], WS[..., P:, :])
    xs = [x.detach().requires_grad_() for x in (A0, S0, *rest)]
    want = lq4_norms(*xs)
    gN = torch.randn(want.shape, dtype=F64)
    grads = torch.autograd.grad(want, xs, gN)
    assert_close(cpu_scan.lq4_rows(*views, *rest), want, rtol=1e-13, atol=1e-13)
    before = torch.randn(B, H, 2 * P, Q, dtype=F64)
    for layout in ("halves", "permuted"):
        dWS = before.clone()
        if layout == "halves":
            dA0, dS0 = dWS[..., :P, :], dWS[..., P:, :]
        else:  # rows not at one step: [H, B, ...] storage seen as [B, H, ...]
            dA0 = dWS[..., :P, :].transpose(0, 1).contiguous().transpose(0, 1)
            dS0 = dWS[..., P:, :].transpose(0, 1).contiguous().transpose(0, 1)
        got = cpu_scan.lq4_rows_backward(*views, *rest, gN, dA0, dS0)
        assert_close(dA0, before[..., :P, :] + grads[0], rtol=1e-12, atol=1e-12)
        assert_close(dS0, before[..., P:, :] + grads[1], rtol=1e-12, atol=1e-12)
        for a, b in zip(got, grads[2:], strict=True):
            assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_moneta_in_half_precision_takes_the_dual_form_in_float32(monkeypatch):
    """bfloat16 inputs compute in float32 (the op's state dtype): Moneta still runs the dual form with the lq4 kernel,
    and equals the same call on the inputs' float32 values up to the output's bfloat16 rounding."""
    rule = MemoryRule(loss="lp", p=3.0, retention="lq", lq=4.0)
    x = moneta_inputs(2, 11, 2, 8, 2, 1, 5)
    half = {n: tuple(t.to(torch.bfloat16) for t in v) if isinstance(v, tuple) else v.to(torch.bfloat16)
            for n, v in x.items()}
    calls = []
    real = cpu_scan.lq4_rows
    monkeypatch.setattr(cpu_scan, "lq4_rows", lambda *xs: calls.append(xs[0].dtype) or real(*xs))
    args = lambda d: [d[n] for n in ("q", "k", "v", "theta", "eta", "alpha", "weights")]  # noqa: E731
    got, _ = neural_memory(*args(half), rule=rule, chunk_size=4, impl="torch")
    assert got.dtype == torch.bfloat16 and calls and set(calls) == {torch.float32}
    single = {n: tuple(t.float() for t in v) if isinstance(v, tuple) else v.float() for n, v in half.items()}
    want, _ = neural_memory(*args(single), rule=rule, chunk_size=4, impl="torch")
    assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
