"""The chunked (gated) delta rule against the token-by-token recurrence, in float64: outputs, final state and the
gradients of every input, over random shapes, chunk sizes, decays and carried states; streaming; precision; errors."""

from __future__ import annotations

import random

import pytest
import torch

from mnemos.ops import delta_rule, delta_rule_reference
from mnemos.testing import assert_close

F64 = torch.float64


def make(B, T, H, K, V, *, gated, with_state, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    inp = dict(q=r(B, T, H, K), k=torch.nn.functional.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
               beta=2 * u(B, T, H), decay=None, initial_state=None)
    if gated:  # spread over (0, 1], with exact zeros and ones among them
        a = u(B, T, H) ** 3
        a[a < 0.02] = 0.0
        a[a > 0.9] = 1.0
        inp["decay"] = a
    if with_state:
        inp["initial_state"] = r(B, H, V, K)
    return {n: (x.to(dtype).requires_grad_() if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}


def call(fn, inp, **kw):
    return fn(inp["q"], inp["k"], inp["v"], inp["beta"], inp["decay"], initial_state=inp["initial_state"],
              output_final_state=True, **kw)


def leaves(inp):
    return [x for x in inp.values() if isinstance(x, torch.Tensor)]


def outputs_and_grads(fn, inp, seed=7, **kw):
    o, S = call(fn, inp, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (S * torch.randn(S.shape, generator=g,
                                                                                            dtype=S.dtype)).sum()
    return o, S, torch.autograd.grad(loss, leaves(inp))


def _configs(n=60, seed=0):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        out.append(dict(B=rnd.choice([1, 2]), T=rnd.choice([1, 2, 5, 16, 17, 33, 64, 70]), H=rnd.choice([1, 3]),
                        K=rnd.choice([2, 4, 8]), V=rnd.choice([3, 4, 8]), C=rnd.choice([1, 2, 3, 16, 64]),
                        gated=rnd.random() < 0.6, with_state=rnd.random() < 0.5, seed=i))
    return out


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: "B{B}T{T}H{H}K{K}V{V}C{C}{g}{s}".format(
    g="-gated" if c["gated"] else "", s="-state" if c["with_state"] else "", **c))
def test_chunked_equals_the_recurrence(cfg):
    cfg = dict(cfg)
    C = cfg.pop("C")
    inp = make(**cfg)
    o_r, S_r, g_r = outputs_and_grads(delta_rule_reference, inp)
    o_c, S_c, g_c = outputs_and_grads(delta_rule, inp, chunk_size=C)
    assert_close("o", o_r, o_c, 1e-10)
    assert_close("S_T", S_r, S_c, 1e-10)
    for name, a, b in zip([n for n, x in inp.items() if isinstance(x, torch.Tensor)], g_r, g_c, strict=True):
        assert_close(f"grad {name}", a, b, 1e-9)


def test_recurrence_written_out_for_one_step():
    """The reference is the papers' formula: one step from a known state, by hand."""
    inp = make(1, 1, 1, 3, 2, gated=True, with_state=True, seed=3)
    q, k, v, b, a, S0 = (inp[n].detach()[0, 0, 0] if n != "initial_state" else inp[n].detach()[0, 0]
                         for n in ("q", "k", "v", "beta", "decay", "initial_state"))
    S1 = a * S0 @ (torch.eye(3, dtype=F64) - b * torch.outer(k, k)) + b * torch.outer(v, k)
    o, S = call(delta_rule_reference, {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in inp.items()})
    torch.testing.assert_close(S[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], S1 @ q)


@pytest.mark.parametrize("cuts", [[1, 2, 3, 4, 5, 6, 7], [5, 13], [31], [64, 65]])
def test_streaming_in_any_pieces_equals_one_call(cuts):
    inp = make(2, 70, 2, 4, 4, gated=True, with_state=True, seed=5)
    o_full, S_full = call(delta_rule, inp, chunk_size=16)
    outs, S = [], inp["initial_state"]
    for a, b in zip([0] + cuts, cuts + [70], strict=True):
        o, S = delta_rule(*(inp[n][:, a:b] for n in ("q", "k", "v", "beta", "decay")), initial_state=S,
                          chunk_size=16, output_final_state=True)
        outs.append(o)
    assert_close("o (streamed)", o_full, torch.cat(outs, 1), 1e-12)
    assert_close("S (streamed)", S_full, S, 1e-12)


def test_gates_at_their_limits():
    inp = make(1, 9, 2, 4, 4, gated=True, with_state=True, seed=1)
    d = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    _, S = call(delta_rule, {**d, "beta": torch.zeros_like(d["beta"]), "decay": torch.ones_like(d["decay"])})
    torch.testing.assert_close(S, d["initial_state"])  # beta = 0, a = 1: nothing is written or forgotten
    _, S = call(delta_rule, {**d, "decay": torch.zeros_like(d["decay"])})
    last = d["beta"][:, -1, :, None, None] * d["v"][:, -1, :, :, None] * d["k"][:, -1, :, None, :]
    torch.testing.assert_close(S, last)  # a = 0 forgets everything before the last token


def test_gradcheck():
    inp = make(1, 7, 2, 3, 2, gated=True, with_state=True, seed=2)
    names = ("q", "k", "v", "beta", "decay", "initial_state")
    fn = lambda *xs: delta_rule(*xs[:5], initial_state=xs[5], chunk_size=3, output_final_state=True)  # noqa: E731
    with torch.no_grad():  # keep the gates inside their ranges under gradcheck's perturbations
        inp["beta"].clamp_(0.1, 1.9)
        inp["decay"].clamp_(0.1, 0.9)
    assert torch.autograd.gradcheck(fn, tuple(inp[n] for n in names))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lower_precision_against_float64(dtype, tol):
    """float32 compute at chunk 64 (the triangular inverse included) stays close to float64 over a long stream."""
    inp = make(2, 300, 2, 16, 16, gated=True, with_state=True, seed=4)
    o64, S64 = call(delta_rule, inp)
    low = {n: (x.detach().to(dtype) if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    o, S = call(delta_rule, low)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_close("o", o64, o.double(), tol)
    assert_close("S", S64, S.double(), tol)


def _bad(mutate, exc, match):
    return pytest.param(mutate, exc, match, id=match[:30])


@pytest.mark.parametrize("mutate,exc,match", [
    _bad(lambda a: a.update(q=a["q"][0]), ValueError, "q must be a"),
    _bad(lambda a: a.update(k=a["k"][:, :-1]), ValueError, "k must have"),
    _bad(lambda a: a.update(v=a["v"][:, :, :1]), ValueError, "v must be"),
    _bad(lambda a: a.update(q=a["q"].long()), TypeError, "q must be a floating"),
    _bad(lambda a: a.update(beta=a["beta"][..., None]), ValueError, "beta must be a"),
    _bad(lambda a: a.update(beta=a["beta"] + 3), ValueError, "beta must lie"),
    _bad(lambda a: a.update(decay=-a["decay"] - 0.1), ValueError, "decay must lie"),
    _bad(lambda a: a.update(initial_state=a["initial_state"][0]), ValueError, "initial_state must be"),
    _bad(lambda a: a.update(v=a["v"].clone().fill_(float("nan"))), ValueError, "v contains NaN"),
    _bad(lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
])
@pytest.mark.parametrize("fn", [delta_rule, delta_rule_reference], ids=["chunked", "reference"])
def test_bad_input(fn, mutate, exc, match):
    args = {n: (x.detach() if isinstance(x, torch.Tensor) else x)
            for n, x in make(2, 5, 2, 4, 4, gated=True, with_state=True, seed=0).items()}
    mutate(args)
    kw = dict(chunk_size=args.pop("chunk_size", 4))
    with pytest.raises(exc, match=match):
        fn(args["q"], args["k"], args["v"], args["beta"], args["decay"], initial_state=args["initial_state"], **kw)
