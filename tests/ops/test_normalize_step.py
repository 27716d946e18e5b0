"""neural_memory(normalize_step=True): the chunked path == the token-by-token reference (outputs, states, every
gradient, float64, the divisor differentiated), streaming and decoding, and what the normaliser does (nothing for a
matrix memory with unit keys; divides large-curvature steps)."""

from __future__ import annotations

import random

import pytest
import torch

from mnemos.ops import neural_memory, neural_memory_chunked, neural_memory_reference, step_curvature
from mnemos.testing import assert_close

from test_memory_rule import assert_states_close, leaves, make_inputs, run, state_loss  # noqa: E402

F64 = torch.float64


def _configs(n):
    rng = random.Random(1234)
    for i in range(n):
        depth = rng.choice([1, 2, 2, 3])
        K = rng.choice([3, 4, 6])
        yield dict(B=rng.choice([1, 2]), T=rng.choice([1, 2, 5, 9, 16, 23]), H=rng.choice([1, 3]), K=K, V=K,
                   depth=depth, chunk=rng.choice([1, 2, 3, 4, 16]), residual=rng.random() < 0.7,
                   activation=rng.choice(["gelu", "silu"]), loss=rng.choice(["l2", "l2", "dot"]),
                   momentum=rng.random() < 0.4, shared=rng.random() < 0.5, seed=i,
                   theta_max=rng.choice([0.2, 1.5]))  # 1.5: big weights of the MLP give curvatures > 1


@pytest.mark.parametrize("cfg", list(_configs(24)), ids=lambda c: f"d{c['depth']}c{c['chunk']}T{c['T']}s{c['seed']}")
def test_chunked_equals_reference(cfg):
    inp = make_inputs(cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"], cfg["depth"], shared=cfg["shared"],
                      with_momentum=cfg["momentum"], seed=cfg["seed"], theta_max=cfg["theta_max"])
    # keys of norms 0.5 .. 2: curvatures on both sides of 1, none exactly at the divisor's kink max(1, rho) = 1
    g = torch.Generator().manual_seed(cfg["seed"] + 99)
    inp["k"] = inp["k"] * (0.5 + 1.5 * torch.rand(inp["k"].shape[:-1], generator=g, dtype=F64))[..., None]
    for name, x in leaves(inp):
        x.requires_grad_()
    kw = dict(chunk_size=cfg["chunk"], residual=cfg["residual"], activation=cfg["activation"], loss=cfg["loss"],
              normalize_step=True)
    o_ref, st_ref = run(neural_memory_reference, inp, **kw)
    o_fast, st_fast = run(neural_memory_chunked, inp, **kw)
    assert_close("o", o_ref, o_fast, 1e-10)
    assert_states_close(st_ref, st_fast, 1e-10)
    cot = torch.randn(o_ref.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    names, xs = zip(*leaves(inp), strict=True)
    g_ref = torch.autograd.grad(state_loss(o_ref, st_ref, cot), xs, allow_unused=True)
    g_fast = torch.autograd.grad(state_loss(o_fast, st_fast, cot), xs, allow_unused=True)
    for name, a, b in zip(names, g_ref, g_fast, strict=True):
        if a is None:
            assert b is None or float(b.abs().max()) == 0, name
        else:
            assert_close(f"grad {name}", a, b, 1e-9)


@pytest.mark.parametrize("depth,chunk", [(2, 4), (3, 3), (1, 5)])
def test_streaming_and_decoding_equal_one_call(depth, chunk):
    inp = make_inputs(2, 13, 2, 4, 4, depth, seed=3, theta_max=1.5)
    kw = dict(chunk_size=chunk, normalize_step=True, output_final_state=True)
    args = [inp[n] for n in ("q", "k", "v", "theta", "eta", "alpha")]
    o_all, st_all = neural_memory_chunked(*args, inp["weights"], **kw)
    outs, st = [], None
    for lo, hi in [(0, 1), (1, 6), (6, 7), (7, 13)]:  # one-token calls take the decoding path
        piece = [x[:, lo:hi] for x in args]
        o, st = neural_memory_chunked(*piece, None if st else inp["weights"], initial_state=st, **kw)
        outs.append(o)
    assert_close("o", o_all, torch.cat(outs, 1), 1e-10)
    assert_states_close(st_all, st, 1e-10)


def test_matrix_memory_with_unit_keys_is_unchanged():
    inp = make_inputs(2, 11, 3, 5, 5, 1, seed=5, theta_max=0.9)  # unit keys: curvature 1
    kw = dict(chunk_size=4)
    o1, s1 = run(neural_memory_chunked, inp, **kw)
    o2, s2 = run(neural_memory_chunked, inp, normalize_step=True, **kw)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)


def test_large_curvature_steps_are_divided():
    """An MLP memory with large weights: its curvature exceeds 1 and normalised steps equal plain steps with
    theta / curvature (one token, so the anchor is the initial memory)."""
    inp = make_inputs(1, 1, 2, 4, 4, 2, seed=9, theta_max=1.0)
    weights = tuple(3.0 * w for w in inp["weights"])
    rho = step_curvature(inp["k"], inp["v"], weights)
    assert float(rho.min()) > 1.5
    args = [inp[n] for n in ("q", "k", "v")]
    o_norm, _ = neural_memory_chunked(*args, inp["theta"], inp["eta"], inp["alpha"], weights, normalize_step=True)
    o_plain, _ = neural_memory_chunked(*args, inp["theta"] / rho.double(), inp["eta"], inp["alpha"], weights)
    torch.testing.assert_close(o_norm, o_plain, rtol=1e-6, atol=1e-9)  # rho comes back in float32


def test_normalize_step_is_checked():
    """A non-bool normalize_step is a TypeError naming it (the kernels take it too: tests/ops/test_triton.py)."""
    inp = make_inputs(1, 4, 1, 4, 4, 2)
    args = [inp[n] for n in ("q", "k", "v", "theta", "eta", "alpha")]
    for impl in ("torch", "triton"):
        with pytest.raises(TypeError, match="normalize_step must be a bool"):
            neural_memory(*args, inp["weights"], normalize_step=1, impl=impl)
