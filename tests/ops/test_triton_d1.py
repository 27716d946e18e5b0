"""Depth-1 Triton kernels (``triton_d1``) against the torch chunk loop (``torch_scan.scan`` / ``TorchChunkScan``),
under the Triton interpreter on the CPU, on hand-built chunk-major inputs."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mnemos.ops.memory_rule import chunked, triton_common, triton_d1  # noqa: E402
from mnemos.ops.memory_rule.backends import split_state  # noqa: E402
from mnemos.ops.memory_rule.torch_scan import TorchChunkScan, scan  # noqa: E402
from mnemos.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.triton

F64 = torch.float64
NAMES = ("q", "k", "v", "b", "f", "G", "bl", "el", "fl", "gl", "pl")


def make_inputs(nc, B, H, C, K, V, *, last_len=None, with_A=False, dtype=F64, seed=0):
    """Chunk-major inputs as ``neural_memory_chunked`` builds them: tokens ``[nc, B, H, C, D]``, the coefficients of
    ``chunk_coefficients`` on random gates and their rows at each chunk's last real token. The last chunk has
    ``last_len`` real tokens; its padding is zero in q, k, v and the gates (as the op pads)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    last_len = C if last_len is None else last_len
    q, k = (torch.nn.functional.normalize(randn(nc, B, H, C, K), dim=-1) for _ in range(2))
    v = randn(nc, B, H, C, V)
    theta, eta, alpha = 0.2 * rand(nc, B, H, C), rand(nc, B, H, C), rand(nc, B, H, C)
    for x in (q, k, v, theta, eta, alpha):
        x[-1, :, :, last_len:] = 0
    b, e, f, G, P = chunked.chunk_coefficients(theta, eta, alpha)
    ar = torch.arange(nc)
    last = torch.tensor([C - 1] * (nc - 1) + [last_len - 1])
    rows = lambda x: x.movedim(0, 2)[:, :, ar, last].movedim(2, 0)  # noqa: E731
    bl, el, fl, gl, pl = rows(b), rows(e), rows(f), rows(G), rows(P)
    W = randn(B, H, V, K) / K**0.5
    S = 0.1 * randn(B, H, V, K)
    WS = torch.cat((W, S), dim=-2)
    A = randn(B, H, V, K) / K**0.5 if with_A else None
    acc = F64 if dtype == F64 else torch.float32
    out = dict(zip(NAMES, (q, k, v, b, f, G, bl, el, fl, gl, pl), strict=True))
    out = {n: x.to(dtype if n in ("q", "k", "v") else acc).contiguous() for n, x in out.items()}
    out["WS"] = [WS.to(acc)]
    out["A"] = [A.to(acc)] if with_A else None
    return out


def as_f64(inp):
    """The same inputs in float64 (16-bit tokens rounded first, so that only the kernels' arithmetic differs)."""
    out = {n: inp[n].double() for n in NAMES}
    out["WS"] = [inp["WS"][0].double()]
    out["A"] = [inp["A"][0].double()] if inp["A"] is not None else None
    return out


def cotangents(inp, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, v, ws = inp["q"], inp["v"], inp["WS"][0]
    acc = inp["b"].dtype
    do = torch.randn(*q.shape[:-1], v.shape[-1], generator=g, dtype=F64).to(acc)
    dws = torch.randn(ws.shape, generator=g, dtype=F64).to(acc)
    dlast = torch.randn(*ws.shape[:2], ws.shape[-2] // 2, ws.shape[-1], generator=g, dtype=F64).to(acc)
    return do, dws, dlast


def run_fwd(inp, save=True, **kw):
    return triton_d1.fwd(*(inp[n] for n in NAMES), inp["WS"], inp["A"], activation="gelu", save=save, **kw)


def reference(inp, do, dws, dlast, **kw):
    """Forward of ``torch_scan.scan`` and the gradients of ``TorchChunkScan`` for the given cotangents (None:
    zero)."""
    leaves = [inp[n].detach().clone().requires_grad_(True) for n in NAMES]
    states = [inp["WS"][0].detach().clone().requires_grad_(True)]
    if inp["A"] is not None:
        states.append(inp["A"][0].detach().clone().requires_grad_(True))
    kw = dict(activation="gelu", **kw)
    with torch.no_grad():
        o, WS, last_start, starts, _ = scan(*(inp[n] for n in NAMES), inp["WS"], inp["A"], save=True, **kw)
    o2, ws2, last2 = TorchChunkScan.apply(dict(L=1, kw=kw), *leaves, *states)
    loss = (o2 * do).sum()
    if dws is not None:
        loss = loss + (ws2 * dws).sum()
    if dlast is not None:
        loss = loss + (last2 * dlast).sum()
    grads = torch.autograd.grad(loss, leaves + states)
    fwd = dict(o=o, WS=WS[0], last=split_state(last_start[0])[0], starts=torch.stack([s[0] for s in starts]))
    return fwd, grads


def check(inp, ref_inp, *, tol_fwd, tol_bwd, none_cotangents=False, **kw):
    do, dws, dlast = cotangents(inp)
    if none_cotangents:
        dws = dlast = None
    o, WS, last, starts = run_fwd(inp, **kw)
    f64 = lambda x: None if x is None else x.double()  # noqa: E731
    ref, grads = reference(ref_inp, f64(do), f64(dws), f64(dlast), **kw)
    for name, x in (("o", o), ("WS", WS[0]), ("last_start", last[0]), ("starts", starts[0])):
        assert x.dtype == inp["b"].dtype, name
        assert_close(name, ref[{"WS": "WS", "last_start": "last", "starts": "starts"}.get(name, name)], x, tol_fwd)
    out = triton_d1.bwd(do, [dws], [dlast], *(inp[n] for n in NAMES), starts, inp["A"], activation="gelu", **kw)
    dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, dWS0, dA = out
    mine = [dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, dWS0[0]] + ([dA[0]] if dA is not None else [])
    assert (dA is None) == (inp["A"] is None)
    for name, r, x in zip([*NAMES, "WS", "A"][:len(mine)], grads, mine, strict=True):
        assert x.dtype == inp["b"].dtype, name
        assert_close(f"d{name}", r, x, tol_bwd)


CASES = [  # nc, C, K, V, last_len, with_A, residual, loss, BLOCK_V
    (3, 16, 16, 16, None, False, True, "l2", None),
    (3, 16, 16, 16, 11, True, True, "dot", None),
    (1, 16, 16, 32, 7, True, False, "l2", None),
    (3, 16, 16, 32, 5, False, False, "dot", None),
    (3, 16, 16, 32, None, True, False, "l2", 16),  # two V-blocks: partial sums over V
    (3, 32, 32, 32, 20, True, True, "l2", 16),  # two V-blocks with a residual (the block's columns of dq, dk)
]


@pytest.mark.parametrize("nc, C, K, V, last_len, with_A, residual, loss, block_v", CASES)
def test_float64_matches_torch(monkeypatch, nc, C, K, V, last_len, with_A, residual, loss, block_v):
    monkeypatch.setattr(triton_d1, "BLOCK_V", block_v)
    inp = make_inputs(nc, 2, 2, C, K, V, last_len=last_len, with_A=with_A, seed=nc + K + V)
    check(inp, inp, tol_fwd=1e-10, tol_bwd=1e-9, residual=residual, loss=loss)


def test_no_state_cotangents_and_no_save(monkeypatch):
    """dWS_final and d_last_anchor None (zero); the forward without ``save`` returns no starts."""
    inp = make_inputs(3, 2, 2, 16, 16, 16, last_len=9, with_A=True, seed=7)
    check(inp, inp, tol_fwd=1e-10, tol_bwd=1e-9, none_cotangents=True, residual=True, loss="l2")
    o, WS, last, starts = run_fwd(inp, save=False, residual=True, loss="l2")
    assert starts is None
    o2, WS2, last2, _ = run_fwd(inp, save=True, residual=True, loss="l2")
    assert torch.equal(o, o2) and torch.equal(WS[0], WS2[0]) and torch.equal(last[0], last2[0])


def test_float32():
    inp = make_inputs(3, 2, 2, 16, 16, 16, last_len=13, with_A=True, dtype=torch.float32, seed=3)
    check(inp, as_f64(inp), tol_fwd=1e-5, tol_bwd=1e-5, residual=True, loss="l2")


def test_bfloat16_inputs():
    inp = make_inputs(3, 2, 2, 16, 16, 32, with_A=False, dtype=torch.bfloat16, seed=4)
    assert inp["q"].dtype == torch.bfloat16 and inp["b"].dtype == torch.float32
    check(inp, as_f64(inp), tol_fwd=5e-3, tol_bwd=1e-2, residual=False, loss="l2")


@pytest.mark.parametrize("block_v", [None, 16])
def test_every_output_written(monkeypatch, block_v):
    """Every buffer the launchers allocate starts as NaN: an element the kernels leave unwritten shows up."""
    monkeypatch.setattr(triton_common, "POISON_BUFFERS", True)
    monkeypatch.setattr(triton_d1, "BLOCK_V", block_v)
    for with_A, loss in ((True, "l2"), (True, "dot"), (False, "l2")):
        inp = make_inputs(3, 2, 2, 16, 32, 32, last_len=6, with_A=with_A, seed=5)
        do, dws, dlast = cotangents(inp)
        o, WS, last, starts = run_fwd(inp, residual=True, loss=loss)
        outs = triton_d1.bwd(do, [dws], [dlast], *(inp[n] for n in NAMES), starts, inp["A"], activation="gelu",
                             residual=True, loss=loss)
        tensors = [o, WS[0], last[0], starts[0], *outs[:11], outs[11][0]] + ([outs[12][0]] if with_A else [])
        for i, x in enumerate(tensors):
            assert bool(torch.isfinite(x).all()), f"output {i} (with_A={with_A}, loss={loss}) has unwritten elements"
