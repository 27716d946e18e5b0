"""The Triton kernels (impl="triton") against the token-by-token reference: outputs, final state, every gradient.

Without a GPU the kernels run on the CPU under ``TRITON_INTERPRET=1`` (set below, before any kernel is defined), in
float64 where the comparison is tight; on a CUDA machine the same tests run the compiled kernels on the GPU, in
float32 and bfloat16. Every buffer the launchers allocate is NaN-filled first (``POISON_BUFFERS``), so an element a
kernel forgets to write, or reads before writing, fails the finiteness check of ``assert_close``.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mnemos.ops import MemoryState, neural_memory, neural_memory_chunked, neural_memory_reference  # noqa: E402
from mnemos.ops.memory_rule import triton_common  # noqa: E402
from mnemos.testing import assert_close  # noqa: E402

from test_memory_rule import F64, assert_states_close, leaves, make_inputs, run, state_loss  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if CUDA else "cpu"
EXACT = torch.float32 if CUDA else F64  # the tightest dtype the kernels run in here
TOL = (2e-5, 1e-4) if CUDA else (1e-10, 1e-9)  # (outputs and states, gradients)


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    monkeypatch.setattr(triton_common, "POISON_BUFFERS", True)
    # the depth-2 backward rebuilds chunk states from checkpoints; a spacing of 2 puts segment boundaries into
    # every multi-chunk test (test_triton_checkpoint_spacing covers others)
    monkeypatch.setattr(triton_common, "CHECKPOINT_EVERY", 2)


def to_device(inp, dtype=None):
    def move(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(move(t) for t in x)
        y = x.detach().to(DEVICE, dtype or x.dtype)
        return y.requires_grad_(x.requires_grad)

    return {n: move(x) for n, x in inp.items()}


def grads(o, s, inp, seed):
    cot = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(o.device, o.dtype)
    names, tensors = zip(*leaves(inp), strict=True)
    return names, torch.autograd.grad(state_loss(o, s, cot), tensors)


def _draw(n: int, seed: int = 99):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        depth = 1 + i % 2
        residual = rng.random() < 0.6
        out.append(dict(
            depth=depth, B=rng.choice([1, 2]), H=rng.choice([1, 2]), K=16, V=16 if residual else rng.choice([16, 32]),
            expansion=rng.choice([2, 4]), C=rng.choice([1, 3, 4, 8, 16, 16, 32]), T=rng.choice([1, 16, 23, 40, 71]),
            residual=residual, activation=rng.choice(["gelu", "silu"]), loss="dot" if rng.random() < 0.25 else "l2",
            shared=rng.random() < 0.5, with_momentum=rng.random() < 0.5, seed=rng.randint(0, 2**31),
        ))
    return out


CONFIGS = _draw(16)


def _id(c):
    return (f"L{c['depth']}-B{c['B']}-H{c['H']}-V{c['V']}-E{c['expansion']}-C{c['C']}-T{c['T']}"
            f"{'-res' if c['residual'] else ''}-{c['activation']}-{c['loss']}{'-shared' if c['shared'] else ''}"
            f"{'-mom' if c['with_momentum'] else ''}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_id(c) for c in CONFIGS])
def test_triton_matches_reference(cfg):
    inp = make_inputs(cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["V"], cfg["depth"], expansion=cfg["expansion"],
                      shared=cfg["shared"], with_momentum=cfg["with_momentum"], seed=cfg["seed"], requires_grad=True)
    kw = dict(chunk_size=cfg["C"], residual=cfg["residual"], activation=cfg["activation"], loss=cfg["loss"])
    o_ref, s_ref = run(neural_memory_reference, inp, **kw)
    names, g_ref = grads(o_ref, s_ref, inp, cfg["seed"])
    dev = to_device(inp, EXACT)
    o, s = run(neural_memory, dev, impl="triton", **kw)
    assert o.device.type == DEVICE
    assert_close("o", o_ref, o, TOL[0])
    assert_states_close(s_ref, s, TOL[0])
    _, g = grads(o, s, dev, cfg["seed"])
    for name, gr, gt in zip(names, g_ref, g, strict=True):
        assert_close(f"grad {name}", gr, gt, TOL[1])


NORMALIZE_CONFIGS = [  # (depth, B, H, V, T, residual, activation, loss, with_momentum, first, C): first > 0
    (1, 2, 2, 16, 40, True, "gelu", "l2", True, 0, 16),  # continues a stream cut mid-chunk after `first` tokens
    (1, 1, 2, 32, 23, False, "silu", "dot", False, 0, 16),
    (1, 2, 1, 16, 23, True, "gelu", "l2", True, 6, 4),  # chunks below the 16-token tile: padded inside it
    (2, 2, 1, 16, 71, True, "gelu", "l2", True, 0, 16),
    (2, 1, 2, 32, 40, False, "silu", "l2", False, 0, 16),
    (2, 2, 2, 16, 23, True, "silu", "dot", True, 0, 16),
    (2, 1, 2, 16, 50, True, "gelu", "l2", True, 21, 16),
    (2, 2, 1, 16, 30, True, "gelu", "l2", True, 5, 4),
    (2, 1, 2, 16, 17, True, "silu", "l2", False, 0, 3),
]


@pytest.mark.parametrize("cfg", NORMALIZE_CONFIGS, ids=lambda c: "L{}-B{}-H{}-V{}-T{}-{}-{}-first{}-C{}".format(
    c[0], c[1], c[2], c[3], c[4], c[6], c[7], c[9], c[10]))
def test_triton_normalize_step(cfg):
    """normalize_step on the kernels (depth 1: folded into the coefficients; depth 2: the curvature at the anchor
    inside the kernels, its gradient written out there) == the reference: outputs, final state, every gradient.
    Keys are scaled per token into [0.5, 1.7] so that the step scale is 1 for some tokens and below 1 for others
    (unit keys would sit on its kink for a matrix memory), which the test checks at the initial weights."""
    from mnemos.ops import step_curvature

    depth, B, H, V, T, residual, activation, loss, with_momentum, first, C = cfg
    seed = 7 * T + depth
    inp = make_inputs(B, T, H, 16, V, depth, expansion=2, with_momentum=with_momentum, seed=seed)
    scale = 0.5 + 1.2 * torch.rand(B, T, H, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)
    inp["k"] = inp["k"] * scale
    inp["alpha"] = inp["alpha"] * 0.05  # mild forgetting: a memory decayed towards zero has a curvature far below 1
    kw = dict(chunk_size=C, residual=residual, activation=activation, loss=loss, normalize_step=True)
    state0 = None
    if first:
        _, st = run(neural_memory_reference, {n: (x[:, :first] if isinstance(x, torch.Tensor) else x)
                                               for n, x in inp.items()}, **kw)
        inp = {n: (x[:, first:] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
        state0 = st
    start = inp["weights"] if state0 is None else state0.anchor  # the memory the call's first chunk anchors on
    rho = step_curvature(inp["k"], inp["v"], start, residual=residual, activation=activation)
    assert (rho > 1.05).float().mean() > 0.2 and (rho < 0.95).float().mean() > 0.05  # both sides of the kink
    inp = {n: (x if x is None else (tuple(t.detach().requires_grad_() for t in x) if isinstance(x, tuple)
                                    else x.detach().requires_grad_())) for n, x in inp.items()}
    results = []
    for fn, dev in ((neural_memory_reference, inp), ("triton", to_device(inp, EXACT))):
        call = fn if fn is neural_memory_reference else (lambda *a, **k: neural_memory(*a, impl="triton", **k))
        s0 = None
        if state0 is not None:
            target = dev["q"].device, dev["q"].dtype
            s0 = MemoryState(*(tuple(t.to(*target) for t in part) for part in
                               (state0.weights, state0.momentum, state0.anchor)), state0.offset, state0.chunk_size)
            dev = dict(dev, weights=None, momentum=None)
        o, s = call(dev["q"], dev["k"], dev["v"], dev["theta"], dev["eta"], dev["alpha"], dev["weights"],
                    momentum=dev["momentum"], initial_state=s0, output_final_state=True, **kw)
        cot = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(3)).to(o.device, o.dtype)
        names, tensors = zip(*[(n, t) for n, t in leaves(dev) if t is not None], strict=True)
        results.append((o, s, names, torch.autograd.grad(state_loss(o, s, cot), tensors)))
    (o_r, s_r, names, g_r), (o_t, s_t, _, g_t) = results
    assert_close("o", o_r, o_t, TOL[0])
    assert_states_close(s_r, s_t, TOL[0])
    for name, gr, gt in zip(names, g_r, g_t, strict=True):
        assert_close(f"grad {name}", gr, gt, TOL[1])


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("first, rest, C", [(5, 3, 16), (5, 30, 16), (16, 20, 16), (20, 12, 16), (5, 14, 4),
                                           (7, 6, 1)])
def test_triton_continues_a_stream(depth, first, rest, C):
    """A stream cut anywhere (mid-chunk: the kernels take the carried anchor for their first chunk) continues
    exactly, gradients through the carried state included; also with chunks below the kernels' 16-token tile."""
    inp = make_inputs(2, first + rest, 2, 16, 16, depth, expansion=2, with_momentum=True, seed=depth * 1000 + first)
    head = {n: (x[:, :first] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    _, st = run(neural_memory_reference, head, chunk_size=C)
    results = []
    for fn, dtype in ((neural_memory_reference, F64), ("triton", EXACT)):
        cast = lambda xs: tuple(x.detach().to(DEVICE if fn == "triton" else "cpu", dtype).requires_grad_() for x in xs)  # noqa: E731,B023
        s0 = MemoryState(cast(st.weights), cast(st.momentum), cast(st.anchor), st.offset, C)
        tail = {n: x[:, first:].detach().to(s0.weights[0].device, dtype).requires_grad_()
                for n, x in inp.items() if isinstance(x, torch.Tensor)}
        call = neural_memory_reference if fn is neural_memory_reference else \
            (lambda *a, **k: neural_memory(*a, impl="triton", **k))
        o, s = call(tail["q"], tail["k"], tail["v"], tail["theta"], tail["eta"], tail["alpha"], chunk_size=C,
                    initial_state=s0, output_final_state=True)
        cot = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(3)).to(o.device, dtype)
        tensors = [*tail.values(), *s0.weights, *s0.momentum, *(s0.anchor if st.offset else ())]
        results.append((o, s, torch.autograd.grad(state_loss(o, s, cot), tensors)))
    (o_r, s_r, g_r), (o_t, s_t, g_t) = results
    assert_close("o", o_r, o_t, TOL[0])
    assert_states_close(s_r, s_t, TOL[0])
    for i, (gr, gt) in enumerate(zip(g_r, g_t, strict=True)):
        assert_close(f"grad #{i}", gr, gt, TOL[1])


@pytest.mark.parametrize("depth, chunk", [(1, 16), (2, 16), (2, 4)])  # chunk 4: the layer's default, padded
def test_triton_low_precision(depth, chunk):
    """Issue 6's tolerances: bf16 inputs within 5e-3 relative RMSE of float64 for outputs and states and 1e-2 for
    gradients; float32 inputs within 1e-5 / 1e-4."""
    inp = make_inputs(2, 48, 2, 16, 16, depth, expansion=4, with_momentum=True, seed=5 + depth, requires_grad=True)
    for dtype, tol in ((torch.bfloat16, (5e-3, 1e-2)), (torch.float32, (1e-5, 1e-4))):
        low = {n: (x if n in ("weights", "momentum") else
                   (None if x is None else x.detach().to(dtype).to(F64).requires_grad_()))
               for n, x in inp.items()}  # the inputs as the low dtype sees them, so only the op's error is measured
        o_ref, s_ref = run(neural_memory_reference, low, chunk_size=chunk)
        names, g_ref = grads(o_ref, s_ref, low, 1)
        dev = {n: (to_device({n: x}, torch.float32)[n] if n in ("weights", "momentum") else to_device({n: x}, dtype)[n])
               for n, x in low.items()}
        o, s = run(neural_memory, dev, impl="triton", chunk_size=chunk)
        assert o.dtype == dtype and all(w.dtype == torch.float32 for w in s.weights + s.momentum)
        assert_close(f"o ({dtype})", o_ref, o, tol[0])
        assert_states_close(s_ref, s, tol[0])
        _, g = grads(o, s, dev, 1)
        for name, gr, gt in zip(names, g_ref, g, strict=True):
            assert_close(f"grad {name} ({dtype})", gr, gt, tol[1])


@pytest.mark.parametrize("every", [1, 3, 16])
def test_triton_checkpoint_spacing(every, monkeypatch):
    """Any checkpoint spacing of the depth-2 backward gives the same gradients (6 chunks: segments that divide the
    chunks evenly, unevenly, and one segment for all)."""
    monkeypatch.setattr(triton_common, "CHECKPOINT_EVERY", every)
    inp = make_inputs(1, 90, 2, 16, 16, 2, expansion=2, with_momentum=True, seed=every, requires_grad=True)
    o_ref, s_ref = run(neural_memory_chunked, inp)
    names, g_ref = grads(o_ref, s_ref, inp, 2)
    dev = to_device(inp, EXACT)
    o, s = run(neural_memory, dev, impl="triton")
    _, g = grads(o, s, dev, 2)
    for name, gr, gt in zip(names, g_ref, g, strict=True):
        assert_close(f"grad {name}", gr, gt, TOL[1])


def test_triton_runs_without_grad():
    inp = make_inputs(1, 40, 2, 16, 16, 2, expansion=2, seed=4)
    o_ref, s_ref = run(neural_memory_chunked, inp)
    with torch.no_grad():
        o, s = run(neural_memory, to_device(inp, EXACT), impl="triton")
    assert_close("o", o_ref, o, TOL[0])
    assert_states_close(s_ref, s, TOL[0])


def test_triton_refuses_what_it_does_not_cover():
    inp = make_inputs(1, 20, 1, 16, 16, 3, seed=0)
    with pytest.raises(ValueError, match="depth 1 and 2"):
        run(neural_memory, to_device(inp, EXACT), impl="triton")
    inp = make_inputs(1, 20, 1, 16, 16, 2, seed=0)
    with pytest.raises(ValueError, match="chunk_size in 1..64"):
        run(neural_memory, to_device(inp, EXACT), impl="triton", chunk_size=65)
    small = make_inputs(1, 20, 1, 4, 4, 2, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        run(neural_memory, to_device(small, EXACT), impl="triton")
    # auto never picks the kernels where they cannot run, and on the CPU it always takes the torch path
    o_auto, _ = run(neural_memory, small)
    o_torch, _ = run(neural_memory_chunked, small)
    assert torch.equal(o_auto, o_torch)


def test_auto_dispatch_picks_the_kernels_only_on_cuda(monkeypatch):
    """auto takes the kernels for CUDA tensors they cover (unless MNEMOS_TRITON=0), the torch path otherwise."""
    from mnemos.ops.memory_rule import dispatch

    calls = []
    monkeypatch.setattr(dispatch, "neural_memory_triton", lambda *a, **k: calls.append("triton") or (None, None))
    monkeypatch.setattr(dispatch, "neural_memory_chunked", lambda *a, **k: calls.append("torch") or (None, None))
    monkeypatch.setattr(dispatch, "triton_unsupported_reason", lambda *a: None)
    inp = make_inputs(1, 4, 1, 16, 16, 2, seed=0)

    class FakeCuda(torch.Tensor):  # only .device is consulted before the implementation is chosen
        @property
        def device(self):
            return torch.device("cuda")

    run(neural_memory, inp)
    run(neural_memory, dict(inp, q=inp["q"].as_subclass(FakeCuda)))
    monkeypatch.setenv("MNEMOS_TRITON", "0")
    run(neural_memory, dict(inp, q=inp["q"].as_subclass(FakeCuda)))
    assert calls == ["torch", "triton", "torch"]


@pytest.mark.skipif(CUDA, reason="checks the CPU-without-interpreter message")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inp = make_inputs(1, 20, 1, 16, 16, 2, seed=0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        run(neural_memory, inp, impl="triton")


@pytest.mark.parametrize("chunk", [16, None])  # None: the layer's default chunk (4), padded to the 16-token tile
def test_titans_layer_on_the_kernels(monkeypatch, chunk):
    """The Titans layer on impl="triton" == on impl="torch": outputs, parameter gradients, and a decoding stream of
    one-token steps (each a padded chunk continuing mid-chunk in the kernels)."""
    from mnemos.layers import NeuralMemory
    from mnemos.ops.memory_rule import triton_scan

    launched = []
    real = triton_scan._launchers
    monkeypatch.setattr(triton_scan, "_launchers", lambda depth: launched.append(depth) or real(depth))

    torch.manual_seed(0)
    kw = dict(dim=32, heads=2, head_dim=16, depth=2, expansion=2)  # the layer's defaults: normalize_step
    if chunk is not None:
        kw["chunk_size"] = chunk
    ref = NeuralMemory(**kw, impl="torch").to(EXACT)
    fast = NeuralMemory(**kw, impl="triton").to(EXACT)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 37, 32, dtype=EXACT)
    y_ref, s_ref = ref(x)
    y, s = fast.to(DEVICE)(x.to(DEVICE))
    assert_close("y", y_ref, y, TOL[0])
    y_ref.pow(2).sum().backward()
    y.pow(2).sum().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), fast.parameters(), strict=True):
        assert_close(f"grad {name}", p_ref.grad, p.grad, TOL[1])
    with torch.no_grad():
        for t in range(3):
            x_t = torch.randn(2, 32, dtype=EXACT)
            o_ref, s_ref = ref.step(x_t, s_ref)
            o, s = fast.step(x_t.to(DEVICE), s)
            assert_close(f"step {t}", o_ref, o, TOL[0])
    assert launched.count(2) == 5  # forward, backward, three steps: all on the kernels


def test_dot_precision_from_the_environment():
    """MNEMOS_TRITON_DOT_PRECISION picks the kernels' dot precision at import; an unknown value is an error naming
    the variable and the choices, not a silent fallback."""
    import subprocess
    import sys

    code = "from mnemos.ops.memory_rule import triton_common as t; print(t.DOT_PRECISION)"
    env = dict(os.environ, TRITON_INTERPRET="1")
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env=dict(env, MNEMOS_TRITON_DOT_PRECISION="tf32x3"))
    assert ok.returncode == 0 and ok.stdout.strip() == "tf32x3", ok.stderr[-1000:]
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(env, MNEMOS_TRITON_DOT_PRECISION="fp8"))
    assert bad.returncode != 0 and "MNEMOS_TRITON_DOT_PRECISION must be one of" in bad.stderr
