"""The memory rule: chunked dual form == token-by-token reference, and the rule's defining properties."""

from __future__ import annotations

import copy
import doctest
import random

import pytest
import torch
from torch import nn

from mnemos.ops import MemoryState, memory_read, neural_memory, neural_memory_chunked, neural_memory_reference
from mnemos.ops.memory_rule import dispatch
from mnemos.testing import assert_close

F64 = torch.float64


def make_inputs(B, T, H, K, V, depth, *, shared=True, expansion=2, with_momentum=False, dtype=F64, seed=0,
                theta_max=0.2, requires_grad=False):
    """Fresh random inputs of the op: unit-norm queries and keys (as the Titans layer makes them); gates over the
    part of their range that keeps a long stream of online updates from diverging (theta <= 0.2, eta <= 0.9)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q, k = (torch.nn.functional.normalize(randn(B, T, H, K), dim=-1) for _ in range(2))
    v = randn(B, T, H, V)
    theta, eta, alpha = theta_max * rand(B, T, H), 0.9 * rand(B, T, H), 0.5 * rand(B, T, H)
    widths = [K] + [expansion * K] * (depth - 1) + [V]
    lead = (H,) if shared else (B, H)
    weights = tuple(randn(*lead, widths[i + 1], widths[i]) / widths[i] ** 0.5 for i in range(depth))
    momentum = tuple(0.1 * randn(B, H, widths[i + 1], widths[i]) for i in range(depth)) if with_momentum else None
    out = dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, weights=weights, momentum=momentum)
    out = {n: _cast(x, dtype, requires_grad) for n, x in out.items()}
    return out


def _cast(x, dtype, requires_grad):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype, requires_grad) for t in x)
    return x.to(dtype).requires_grad_(requires_grad)


def leaves(inp):
    out = []
    for name in ("q", "k", "v", "theta", "eta", "alpha", "weights", "momentum"):
        x = inp[name]
        if isinstance(x, tuple):
            out += [(f"{name}[{i}]", t) for i, t in enumerate(x)]
        elif x is not None:
            out.append((name, x))
    return out


def run(fn, inp, **kw):
    return fn(inp["q"], inp["k"], inp["v"], inp["theta"], inp["eta"], inp["alpha"], inp["weights"],
              momentum=inp["momentum"], output_final_state=True, **kw)


def state_loss(o, state, cot):
    """A scalar touching the outputs and every part of the final state, so all their gradients are compared."""
    loss = (o * cot).sum()
    for w, s, a in zip(state.weights, state.momentum, state.anchor, strict=True):
        loss = loss + (w * torch.cos(w)).sum() + (s * s).sum() + 0.5 * (a * torch.sin(a)).sum()
    return loss


def assert_states_close(ref: MemoryState, fast: MemoryState, ratio: float):
    assert fast.offset == ref.offset and fast.chunk_size == ref.chunk_size
    for name in ("weights", "momentum", "anchor"):
        for i, (r, f) in enumerate(zip(getattr(ref, name), getattr(fast, name), strict=True)):
            assert_close(f"state.{name}[{i}]", r, f, ratio)


# ----------------------------------------------------------------------------------------------------------------------
# 1. chunked == reference, outputs, final state and all gradients, over 200+ random configs


def _draw_configs(n: int, seed: int = 1234):
    rng = random.Random(seed)
    chunks = [1, 2, 3, 16, 64]
    configs = []
    for i in range(n):
        C = chunks[i % len(chunks)]
        # T: 1, odd, not a multiple of C, sometimes an exact multiple, sometimes several chunks
        T = rng.choice([1, 2, 5, 7, 13, 31, 33, 63, 2 * C, 2 * C + 1, C + rng.randint(1, 9)]) if C < 64 else \
            rng.choice([1, 17, 63, 64, 65, 100, 100, 129])
        if C <= 2:
            T = min(T, 40)  # the reference is per token; keep small chunks short
        depth = rng.choice([1, 2, 3])
        residual = rng.random() < 0.5
        K = rng.choice([2, 3, 4, 5])
        V = K if residual else rng.choice([2, 3, 4, 6])
        configs.append(dict(
            B=rng.choice([1, 2]), T=T, H=rng.choice([1, 2, 3]), K=K, V=V, depth=depth, residual=residual,
            C=C, shared=rng.random() < 0.5, with_momentum=rng.random() < 0.5,
            activation=rng.choice(["gelu", "silu"]), loss="dot" if rng.random() < 0.2 else "l2",
            seed=rng.randint(0, 2**31),
        ))
    return configs


CONFIGS = _draw_configs(210)


def _id(c):
    return (f"B{c['B']}-T{c['T']}-H{c['H']}-K{c['K']}-V{c['V']}-L{c['depth']}-C{c['C']}"
            f"{'-res' if c['residual'] else ''}{'-shared' if c['shared'] else '-perseq'}"
            f"{'-mom' if c['with_momentum'] else ''}-{c['activation']}-{c['loss']}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_id(c) for c in CONFIGS])
def test_chunked_matches_reference(cfg):
    inp = make_inputs(cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"], cfg["depth"], shared=cfg["shared"],
                      with_momentum=cfg["with_momentum"], seed=cfg["seed"], requires_grad=True)
    kw = dict(chunk_size=cfg["C"], residual=cfg["residual"], activation=cfg["activation"], loss=cfg["loss"])
    o_ref, s_ref = run(neural_memory_reference, inp, **kw)
    o_fast, s_fast = run(neural_memory_chunked, inp, **kw)
    assert_close("o", o_ref, o_fast, 1e-10)
    assert_states_close(s_ref, s_fast, 1e-10)

    cot = torch.randn(o_ref.shape, dtype=F64, generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    names, tensors = zip(*leaves(inp), strict=True)
    g_ref = torch.autograd.grad(state_loss(o_ref, s_ref, cot), tensors)
    g_fast = torch.autograd.grad(state_loss(o_fast, s_fast, cot), tensors)
    for name, gr, gf in zip(names, g_ref, g_fast, strict=True):
        assert_close(f"grad {name}", gr, gf, 1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# 2. the rule's defining special cases, each against code written independently of both implementations


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
def test_chunk1_is_sgd_with_momentum(depth, fn):
    """chunk_size=1, alpha=0, constant theta and eta: torch.optim.SGD(lr=theta, momentum=eta) on a real MLP."""
    B, T, H, D = 1, 12, 1, 4
    lr, mom = 0.3, 0.7
    inp = make_inputs(B, T, H, D, D, depth, seed=depth)
    inp["theta"] = torch.full((B, T, H), lr, dtype=F64)
    inp["eta"] = torch.full((B, T, H), mom, dtype=F64)
    inp["alpha"] = torch.zeros(B, T, H, dtype=F64)
    o, state = run(fn, inp, chunk_size=1, residual=True, activation="gelu")

    layers = [nn.Linear(w.shape[-1], w.shape[-2], bias=False).double() for w in inp["weights"]]
    for lin, w in zip(layers, inp["weights"], strict=True):
        lin.weight.data.copy_(w[0])

    def mlp(x):
        h = x
        for i, lin in enumerate(layers):
            h = lin(h)
            if i < len(layers) - 1:
                h = torch.nn.functional.gelu(h)
        return h + x

    opt = torch.optim.SGD([lin.weight for lin in layers], lr=lr, momentum=mom, dampening=0.0)
    for t in range(T):
        opt.zero_grad()
        (mlp(inp["k"][0, t, 0]) - inp["v"][0, t, 0]).pow(2).sum().backward()
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(o[0, t, 0], mlp(inp["q"][0, t, 0]), rtol=1e-12, atol=1e-12)
    for lin, w in zip(layers, state.weights, strict=True):
        torch.testing.assert_close(w[0, 0], lin.weight.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
def test_matrix_memory_hand_written_recurrence(fn):
    """Depth 1, no residual, any chunk size: the recurrence written out with outer products."""
    B, T, H, K, V, C = 2, 11, 2, 3, 4, 4
    inp = make_inputs(B, T, H, K, V, 1, shared=False, with_momentum=True, seed=7)
    o, state = run(fn, inp, chunk_size=C, residual=False)
    W, S = inp["weights"][0].clone(), inp["momentum"][0].clone()  # [B, H, V, K]
    A = W
    for t in range(T):
        if t % C == 0:
            A = W.clone()
        k, v, q = inp["k"][:, t], inp["v"][:, t], inp["q"][:, t]  # [B, H, D]
        err = torch.einsum("bhvk,bhk->bhv", A, k) - v
        u = 2 * torch.einsum("bhv,bhk->bhvk", err, k)
        S = inp["eta"][:, t, :, None, None] * S - inp["theta"][:, t, :, None, None] * u
        W = (1 - inp["alpha"][:, t, :, None, None]) * W + S
        torch.testing.assert_close(o[:, t], torch.einsum("bhvk,bhk->bhv", W, q), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.weights[0], W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.momentum[0], S, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C", [1, 5, 64])
def test_dot_loss_matrix_memory_is_linear_attention(C):
    """loss="dot", depth 1, no residual, eta = alpha = 0, theta = 1: o_t = W_0 q_t + sum_{j<=t} v_j (k_j . q_t),
    for any chunk size (the gradient of the dot loss does not depend on the memory)."""
    B, T, H, K, V = 2, 37, 2, 4, 3
    inp = make_inputs(B, T, H, K, V, 1, seed=C)
    inp["theta"], inp["eta"], inp["alpha"] = torch.ones(B, T, H, dtype=F64), torch.zeros(B, T, H, dtype=F64), \
        torch.zeros(B, T, H, dtype=F64)
    o, _ = run(neural_memory_chunked, inp, chunk_size=C, residual=False, loss="dot")
    scores = torch.einsum("bthk,bshk->bhts", inp["q"], inp["k"]).tril()  # causal, no softmax
    ref = torch.einsum("bhts,bshv->bthv", scores, inp["v"]) + torch.einsum("hvk,bthk->bthv", inp["weights"][0], inp["q"])
    torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
@pytest.mark.parametrize("residual", [True, False])
def test_theta_zero_leaves_memory_unchanged(fn, residual):
    inp = make_inputs(2, 19, 2, 4, 4, 2, seed=3)
    inp["theta"] = torch.zeros_like(inp["theta"])
    inp["alpha"] = torch.zeros_like(inp["alpha"])
    o, state = run(fn, inp, chunk_size=4, residual=residual)
    for w0, w in zip(inp["weights"], state.weights, strict=True):
        torch.testing.assert_close(w, w0.expand_as(w), rtol=0, atol=0)
    torch.testing.assert_close(o, memory_read(inp["q"], inp["weights"], residual=residual), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
def test_alpha_one_empties_memory(fn):
    """alpha = 1 with eta = theta = 0 at a chunk's last token wipes memory and momentum: what follows equals a stream
    started from an empty (zero) memory."""
    B, T, H, D, C, cut = 2, 24, 2, 4, 4, 11  # token 11 ends the third chunk
    # a matrix memory: from zero, an MLP memory stays at zero (a saddle), a matrix memory learns again
    inp = make_inputs(B, T, H, D, D, 1, with_momentum=True, seed=5)
    for name, val in (("alpha", 1.0), ("eta", 0.0), ("theta", 0.0)):
        inp[name] = inp[name].clone()
        inp[name][:, cut] = val
    o, state = run(fn, inp, chunk_size=C, residual=False)
    assert bool((state.weights[0] != 0).all())  # memory was refilled after the wipe
    rest = {n: (x[:, cut + 1:] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    rest["weights"] = tuple(torch.zeros_like(w) for w in inp["weights"])
    rest["momentum"] = None
    o_rest, state_rest = run(fn, rest, chunk_size=C, residual=False)
    torch.testing.assert_close(o[:, cut + 1:], o_rest, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o[:, cut], torch.zeros_like(o[:, cut]), rtol=0, atol=0)  # M(q; 0) = 0
    for a, b in zip(state.weights, state_rest.weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# 3. streaming, causality, batch independence


@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
@pytest.mark.parametrize("cuts", [list(range(1, 23)), [5, 6, 13], [3, 4, 21], [16]], ids=["per-token", "uneven-a", "uneven-b", "boundary"])
def test_streaming_equals_one_call(fn, cuts):
    B, T, H, D, C = 2, 23, 2, 4, 4
    inp = make_inputs(B, T, H, D, D, 2, with_momentum=True, seed=11)
    o_full, s_full = run(neural_memory_reference, inp, chunk_size=C)
    outs, state = [], None
    for a, b in zip([0] + cuts, cuts + [T], strict=True):
        piece = {n: (x[:, a:b] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
        if state is None:
            o, state = run(fn, piece, chunk_size=C)
        else:
            o, state = fn(piece["q"], piece["k"], piece["v"], piece["theta"], piece["eta"], piece["alpha"],
                          chunk_size=C, initial_state=state, output_final_state=True)
        assert state.offset == b % C
        outs.append(o)
    assert_close("o (streamed)", o_full, torch.cat(outs, dim=1), 1e-12)
    assert_states_close(s_full, state, 1e-12)


@pytest.mark.parametrize("first, rest, C", [(6, 1, 4), (6, 2, 4), (6, 9, 4), (5, 11, 4), (3, 30, 7), (8, 5, 4)])
def test_gradients_through_a_carried_state(first, rest, C):
    """A stream continued from a state (mid-chunk or not): outputs, final state and the gradients of every input,
    the carried weights, momentum and anchor included, match the reference."""
    inp = make_inputs(2, first + rest, 2, 3, 3, 2, with_momentum=True, seed=first * 100 + rest)
    head = {n: (x[:, :first] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    _, st = run(neural_memory_reference, head, chunk_size=C)
    leaves_ = lambda xs: tuple(x.detach().clone().requires_grad_() for x in xs)  # noqa: E731
    st = MemoryState(leaves_(st.weights), leaves_(st.momentum), leaves_(st.anchor), st.offset, st.chunk_size)
    tail = {n: x[:, first:].detach().requires_grad_() for n, x in inp.items() if isinstance(x, torch.Tensor)}
    results = []
    for fn in (neural_memory_reference, neural_memory_chunked):
        o, s = fn(tail["q"], tail["k"], tail["v"], tail["theta"], tail["eta"], tail["alpha"], chunk_size=C,
                  initial_state=st, output_final_state=True)
        cot = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
        tensors = [*tail.values(), *st.weights, *st.momentum, *st.anchor]
        results.append((o, s, torch.autograd.grad(state_loss(o, s, cot), tensors, allow_unused=True)))
    (o_r, s_r, g_r), (o_f, s_f, g_f) = results
    assert_close("o", o_r, o_f, 1e-10)
    assert_states_close(s_r, s_f, 1e-10)
    names = [*tail, *(f"{p}[{i}]" for p in ("weights", "momentum", "anchor") for i in range(2))]
    for name, gr, gf in zip(names, g_r, g_f, strict=True):
        if gr is None and gf is None:  # the anchor of a state that stopped on a chunk boundary is never read
            assert name.startswith("anchor") and st.offset == 0
            continue
        gr = torch.zeros_like(gf) if gr is None else gr
        gf = torch.zeros_like(gr) if gf is None else gf
        assert_close(f"grad {name}", gr, gf, 1e-9)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_runs_of_chunk_lengths_carry_the_state(grad):
    """A call that starts mid-chunk and ends in a partial chunk runs three layouts (the rest of the chunk in
    progress, full chunks, the last partial chunk), the state carried between them: equal to the reference with and
    without autograd recording."""
    inp = make_inputs(2, 25, 2, 3, 3, 2, with_momentum=True, seed=11)
    head = {n: (x[:, :6] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    _, st = run(neural_memory_reference, head, chunk_size=4)  # offset 2: lengths 2 + 4 + 4 + 4 + 4 + 1
    tail = {n: x[:, 6:] for n, x in inp.items() if isinstance(x, torch.Tensor)}
    args = [tail[n] for n in ("q", "k", "v", "theta", "eta", "alpha")]
    o_r, s_r = neural_memory_reference(*args, chunk_size=4, initial_state=st, output_final_state=True)
    with torch.set_grad_enabled(grad):
        o_f, s_f = neural_memory_chunked(*[x.detach().requires_grad_(grad) for x in args], chunk_size=4,
                                         initial_state=st, output_final_state=True)
    assert_close("o", o_r, o_f, 1e-10)
    assert_states_close(s_r, s_f, 1e-10)


def test_state_carries_across_implementations_and_serialises(tmp_path):
    inp = make_inputs(1, 10, 2, 4, 4, 2, seed=2)
    first = {n: (x[:, :6] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    second = {n: x[:, 6:] for n, x in inp.items() if isinstance(x, torch.Tensor)}
    _, state = run(neural_memory_reference, first, chunk_size=4)
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=False)
    o2, _ = neural_memory_chunked(second["q"], second["k"], second["v"], second["theta"], second["eta"],
                                  second["alpha"], chunk_size=4, initial_state=loaded)
    o_full, _ = run(neural_memory_reference, inp, chunk_size=4)
    assert_close("o (continued)", o_full[:, 6:], o2, 1e-12)


@pytest.mark.parametrize("C", [1, 3, 16])
def test_strict_causality(C):
    B, T, H, D = 2, 37, 2, 4
    inp = make_inputs(B, T, H, D, D, 2, seed=C)
    o, _ = run(neural_memory_chunked, inp, chunk_size=C)
    for t in (0, 5, 17, 35):
        pert = copy.deepcopy(inp)
        g = torch.Generator().manual_seed(t)
        for name in ("q", "k", "v"):
            pert[name][:, t + 1:] = torch.randn(pert[name][:, t + 1:].shape, generator=g, dtype=F64)
        for name in ("theta", "eta", "alpha"):
            pert[name][:, t + 1:] = torch.rand(pert[name][:, t + 1:].shape, generator=g, dtype=F64) * 0.5
        o2, _ = run(neural_memory_chunked, pert, chunk_size=C)
        torch.testing.assert_close(o2[:, : t + 1], o[:, : t + 1], rtol=1e-13, atol=1e-13)
        assert not torch.allclose(o2[:, t + 1:], o[:, t + 1:])  # the perturbation did reach the future


def test_batch_independence():
    inp = make_inputs(3, 21, 2, 4, 4, 2, shared=False, with_momentum=True, seed=9)
    o, s = run(neural_memory_chunked, inp, chunk_size=4)
    pert = copy.deepcopy(inp)
    g = torch.Generator().manual_seed(0)
    for name in ("q", "k", "v"):
        pert[name][1] = torch.randn(pert[name][1].shape, generator=g, dtype=F64)
    pert["theta"][1] = 0.3
    pert["weights"][0][1] += 1.0
    pert["momentum"][1][1] -= 1.0
    o2, s2 = run(neural_memory_chunked, pert, chunk_size=4)
    for i in (0, 2):
        torch.testing.assert_close(o2[i], o[i], rtol=0, atol=1e-14)
        for a, b in zip(s.weights, s2.weights, strict=True):
            torch.testing.assert_close(a[i], b[i], rtol=0, atol=1e-14)
    assert not torch.allclose(o2[1], o[1])


# ----------------------------------------------------------------------------------------------------------------------
# 4. gradcheck, precision


@pytest.mark.parametrize("depth,residual,C", [(1, False, 2), (2, True, 3), (3, True, 4)])
def test_gradcheck(depth, residual, C):
    inp = make_inputs(1, 6, 1, 2, 2, depth, shared=False, expansion=1, with_momentum=True, seed=depth,
                      requires_grad=True)
    names, tensors = zip(*leaves(inp), strict=True)
    L = depth

    def f(q, k, v, theta, eta, alpha, *wm):
        o, s = neural_memory_chunked(q, k, v, theta, eta, alpha, wm[:L], momentum=wm[L:], chunk_size=C,
                                     residual=residual, output_final_state=True)
        return (o, *s.weights, *s.momentum)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("depth", [1, 2])
def test_low_precision_against_float64(dtype, ratio, depth):
    """Documented tolerance: bf16 inputs (fp32 state and accumulation) within 2e-2 relative RMSE of float64;
    float32 within 1e-5. Inputs are first rounded to the low dtype so that only the op's own error is measured."""
    B, T, H, D = 2, 100, 2, 16
    inp = make_inputs(B, T, H, D, D, depth, seed=depth, theta_max=0.2)
    low = {n: _cast(x, dtype, False) for n, x in inp.items()}
    exact = {n: _cast(x, F64, False) for n, x in low.items()}
    o_ref, s_ref = run(neural_memory_reference, exact, chunk_size=16)
    o, s = run(neural_memory_chunked, low, chunk_size=16)
    assert o.dtype == dtype and all(w.dtype == torch.float32 for w in s.weights + s.momentum)
    assert_close("o", o_ref, o, ratio)
    for i, (a, b) in enumerate(zip(s_ref.weights, s.weights, strict=True)):
        assert_close(f"weights[{i}]", a, b, ratio / 10 if dtype == torch.bfloat16 else ratio)


def test_autocast_keeps_float32_state():
    inp = make_inputs(1, 20, 2, 8, 8, 2, dtype=torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = run(neural_memory, inp, chunk_size=8)
    o32, s32 = run(neural_memory, inp, chunk_size=8)
    assert o.dtype == torch.float32 and all(w.dtype == torch.float32 for w in s.weights)
    torch.testing.assert_close(o, o32)  # autocast is switched off inside the rule


# ----------------------------------------------------------------------------------------------------------------------
# 5. memory_read, dispatch, docs


def test_memory_read_matches_per_token_mlp():
    inp = make_inputs(2, 5, 3, 4, 4, 2, shared=False, seed=1)
    o = memory_read(inp["q"], inp["weights"], residual=True, activation="silu")
    W1, W2 = inp["weights"]
    for b in range(2):
        for t in range(5):
            for h in range(3):
                x = inp["q"][b, t, h]
                ref = W2[b, h] @ torch.nn.functional.silu(W1[b, h] @ x) + x
                torch.testing.assert_close(o[b, t, h], ref, rtol=1e-13, atol=1e-13)


def test_dispatch_impls_agree():
    inp = make_inputs(1, 9, 1, 4, 4, 2, seed=0)
    o_auto, _ = run(neural_memory, inp, chunk_size=4)
    o_ref, _ = run(neural_memory, inp, chunk_size=4, impl="reference")
    assert_close("o", o_ref, o_auto, 1e-12)
    with pytest.raises(ValueError, match="impl"):
        run(neural_memory, inp, impl="triton-please")


def test_docstring_example_runs():
    result = doctest.testmod(dispatch, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------------------------------------
# 6. bad input: errors that name the argument


def _bad(mutate, exc, match):
    return pytest.param(mutate, exc, match, id=match.replace(" ", "_")[:40])


BAD = [
    _bad(lambda a: a.update(q=a["q"][0]), ValueError, "q must be"),
    _bad(lambda a: a.update(k=a["k"][:, :-1]), ValueError, "k must have"),
    _bad(lambda a: a.update(v=a["v"][:, :, :1]), ValueError, "v must be"),
    _bad(lambda a: a.update(q=a["q"].to(torch.int64)), TypeError, "q must be a floating"),
    _bad(lambda a: a.update(v=a["v"].float()), TypeError, "share one dtype"),
    _bad(lambda a: a.update(theta=a["theta"][..., None]), ValueError, "theta must be"),
    _bad(lambda a: a.update(theta=-a["theta"] - 0.1), ValueError, "theta must lie"),
    _bad(lambda a: a.update(eta=a["eta"] + 1.5), ValueError, "eta must lie"),
    _bad(lambda a: a.update(alpha=torch.full_like(a["alpha"], float("nan"))), ValueError, "alpha must lie"),
    _bad(lambda a: a.update(eta=a["eta"].to(torch.int32)), TypeError, "eta must be a floating"),
    _bad(lambda a: a.update(q=a["q"].clone().fill_(float("nan"))), ValueError, "q contains NaN"),
    _bad(lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
    _bad(lambda a: a.update(chunk_size=2.0), ValueError, "chunk_size"),
    _bad(lambda a: a.update(weights=a["weights"][0]), TypeError, "weights must be a non-empty tuple"),
    _bad(lambda a: a.update(weights=()), TypeError, "weights must be a non-empty tuple"),
    _bad(lambda a: a.update(weights=(a["weights"][0][..., :-1], a["weights"][1])), ValueError, "weights\\[0\\] has D_in"),
    _bad(lambda a: a.update(weights=(a["weights"][0], a["weights"][1][..., :-1])), ValueError, "weights\\[1\\] has D_in"),
    _bad(lambda a: a.update(weights=(a["weights"][0][:1], a["weights"][1])), ValueError, "weights\\[0\\] must have leading"),
    _bad(lambda a: a.update(weights=(a["weights"][0].int(), a["weights"][1])), TypeError, "weights\\[0\\] must be a floating"),
    _bad(lambda a: a.update(momentum=(a["weights"][0], a["weights"][1])), ValueError, "momentum\\[0\\] must be"),
    _bad(lambda a: a.update(activation="relu"), ValueError, "activation"),
    _bad(lambda a: a.update(loss="l1"), ValueError, "loss must be one of"),
    _bad(lambda a: a.update(residual=True, v=a["v"][..., :3], weights=(a["weights"][0], a["weights"][1][:, :3])), ValueError, "residual=True"),
]


@pytest.mark.parametrize("mutate,exc,match", BAD)
@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
def test_bad_input(fn, mutate, exc, match):
    args = make_inputs(2, 5, 2, 4, 4, 2)
    args.update(chunk_size=4, residual=True, activation="gelu")
    mutate(args)
    kw = {n: args.pop(n) for n in ("chunk_size", "residual", "activation", "momentum", "loss") if n in args}
    with pytest.raises(exc, match=match):
        fn(args["q"], args["k"], args["v"], args["theta"], args["eta"], args["alpha"], args["weights"], **kw)


@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
def test_check_values_false_skips_only_the_value_checks(fn):
    """check_values=False (what the layers pass): NaN inputs and out-of-range gates flow through to a non-finite
    output instead of an error; shape errors are still raised."""
    args = make_inputs(2, 5, 2, 4, 4, 2)
    q, k, v, theta, eta, alpha, W = (args[n] for n in ("q", "k", "v", "theta", "eta", "alpha", "weights"))
    q = q.clone()
    q[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        fn(q, k, v, theta, eta, alpha, W, chunk_size=4)
    o, state = fn(q, k, v, theta, eta, alpha, W, chunk_size=4, check_values=False, output_final_state=True)
    assert bool(torch.isnan(o[1, 2, 0]).all()) and bool(torch.isfinite(o[0]).all())  # batch 0 untouched
    assert bool(torch.isfinite(state.weights[0]).all())  # a query reads, it writes nothing
    k = k.clone()
    k[1, 2, 0, 0] = float("nan")
    _, state = fn(q, k, v, theta, eta, alpha, W, chunk_size=4, check_values=False, output_final_state=True)
    assert not bool(torch.isfinite(state.weights[0][1]).all()) and bool(torch.isfinite(state.weights[0][0]).all())
    v = args["v"]
    with pytest.raises(ValueError, match="eta must lie"):
        fn(args["q"], args["k"], v, theta, eta + 1.5, alpha, W, chunk_size=4)
    fn(args["q"], args["k"], v, theta, eta + 1.5, alpha, W, chunk_size=4, check_values=False)
    with pytest.raises(ValueError, match="k must have"):
        fn(q, k[:, :-1], v, theta, eta, alpha, W, chunk_size=4, check_values=False)


def test_bad_initial_state():
    inp = make_inputs(1, 6, 2, 4, 4, 2, seed=0)
    _, state = run(neural_memory_chunked, inp, chunk_size=4)  # stops 2 tokens into a chunk
    args = (inp["q"], inp["k"], inp["v"], inp["theta"], inp["eta"], inp["alpha"])
    with pytest.raises(ValueError, match="continue it with chunk_size=4"):
        neural_memory_chunked(*args, chunk_size=8, initial_state=state)
    with pytest.raises(ValueError, match="not both"):
        neural_memory_chunked(*args, inp["weights"], chunk_size=4, initial_state=state)
    with pytest.raises(ValueError, match="weights .* is required"):
        neural_memory_chunked(*args, chunk_size=4)
    with pytest.raises(TypeError, match="initial_state must be a MemoryState"):
        neural_memory_chunked(*args, chunk_size=4, initial_state={"weights": inp["weights"]})
    wrong_batch = make_inputs(3, 6, 2, 4, 4, 2)
    with pytest.raises(ValueError, match="initial_state.weights\\[0\\] must have leading"):
        neural_memory_chunked(*(wrong_batch[n] for n in ("q", "k", "v", "theta", "eta", "alpha")), chunk_size=4,
                              initial_state=state)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("fn", [neural_memory_chunked, neural_memory_reference], ids=["chunked", "reference"])
def test_runs_without_grad_and_with_parameters(fn, mode):
    """Decoding runs under no_grad / inference_mode with nn.Parameter weights; the result equals grad mode's."""
    inp = make_inputs(1, 9, 2, 4, 4, 2, seed=6)
    inp["weights"] = tuple(torch.nn.Parameter(w) for w in inp["weights"])
    o_grad, _ = run(fn, inp, chunk_size=4)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        o, state = run(fn, inp, chunk_size=4)
    torch.testing.assert_close(o, o_grad.detach(), rtol=1e-12, atol=1e-12)
    assert not o.requires_grad
