"""The compiled CPU chunk loop (ops/memory_rule/cpu_scan.cpp) against the PyTorch loop it replaces and the per-token
reference: outputs, final states and every input's gradient in float64 on odd shapes (rows that do not fill a group of
lanes, odd chunk lengths and widths, depth 1-3, both activations and losses, normalize_step, a separate anchor);
float32 against float64; threads; the fallback when it is off or cannot be built."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys

import pytest
import torch

from mnemos.ops import MemoryState, neural_memory_chunked, neural_memory_reference
from mnemos.ops.memory_rule import cpu_scan
from mnemos.ops.memory_rule.chunked import chunk_coefficients
from mnemos.ops.memory_rule.cpu_scan import CpuChunkScan, cpu_kernel, from_lanes, to_lanes
from mnemos.ops.memory_rule.torch_scan import TorchChunkScan
from mnemos.testing import assert_close

from test_memory_rule import assert_states_close, leaves, make_inputs, run, state_loss

F64 = torch.float64
needs_kernel = pytest.mark.skipif(cpu_scan.unavailable_reason() is not None,
                                  reason=f"compiled loop unavailable: {cpu_scan.unavailable_reason()}")


def test_the_kernel_builds_where_there_is_a_compiler():
    """On a machine with a C++ compiler (CI's, this one) the loop must build: a silent fallback would hide a broken
    kernel behind the torch loop's speed."""
    if cpu_scan._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    with cpu_kernel(True):
        assert cpu_scan.unavailable_reason() is None


# ----------------------------------------------------------------------------------------------------------------------
# 1. the node: CpuChunkScan == TorchChunkScan, every output and every input's gradient


def _node_inputs(cfg, dtype=F64):
    """Chunk-major inputs of a scan node: tokens, the coefficients of real gates (chunk_coefficients) and starting
    states; A (a separate anchor for chunk 0) when cfg asks for one."""
    g = torch.Generator().manual_seed(cfg["seed"])
    nc, B, H, n, L = cfg["nc"], cfg["B"], cfg["H"], cfg["n"], cfg["depth"]
    K = cfg["K"]
    widths = [K] + [cfg["hidden"]] * (L - 1) + [K if cfg["residual"] else cfg["V"]]
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q = torch.nn.functional.normalize(randn(nc, B, H, n, K), dim=-1)
    # keys off the unit sphere: with unit keys a depth-1 memory's step curvature |k|^2 sits on normalize_step's kink
    # (max(1, rho) at rho = 1), where the branch two summation orders take is a matter of rounding
    k = torch.nn.functional.normalize(randn(nc, B, H, n, K), dim=-1) * (0.5 + torch.rand(nc, B, H, n, 1, generator=g,
                                                                                         dtype=F64))
    v = randn(nc, B, H, n, widths[-1])
    theta = 0.3 * torch.rand(nc, B, H, n, generator=g, dtype=F64)
    eta = 0.9 * torch.rand(nc, B, H, n, generator=g, dtype=F64)
    alpha = 0.3 * torch.rand(nc, B, H, n, generator=g, dtype=F64)
    b, e, f, G, P = chunk_coefficients(theta, eta, alpha)
    rows = (b[..., -1], e[..., -1], f[..., -1], G[..., -1, :], P[..., -1, :])
    WS = [randn(B, H, 2 * widths[i + 1], widths[i]) / widths[i] ** 0.5 for i in range(L)]
    A = [randn(B, H, widths[i + 1], widths[i]) / widths[i] ** 0.5 for i in range(L)] if cfg["anchor"] else []
    tensors = [q, k, v, b, f, G, *rows, *WS, *A]
    return [t.to(dtype).contiguous().requires_grad_() for t in tensors]


def _draw(n: int, seed: int = 7):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        residual = rng.random() < 0.6
        out.append(dict(
            nc=rng.choice([1, 2, 5]), B=rng.choice([1, 2, 3]), H=rng.choice([1, 3, 5]), n=rng.choice([1, 3, 4, 5, 8]),
            depth=1 + i % 3, K=rng.choice([2, 3, 5]), hidden=rng.choice([3, 7, 8]), V=rng.choice([2, 4, 6]),
            residual=residual, activation=rng.choice(["gelu", "silu"]), loss="dot" if rng.random() < 0.2 else "l2",
            normalize=rng.random() < 0.4, anchor=rng.random() < 0.3, seed=rng.randint(0, 2**31),
        ))
    return out


NODE_CONFIGS = _draw(36)


def _node_id(c):
    return (f"nc{c['nc']}-B{c['B']}-H{c['H']}-n{c['n']}-L{c['depth']}-K{c['K']}-h{c['hidden']}"
            f"{'-res' if c['residual'] else '-V' + str(c['V'])}-{c['activation']}-{c['loss']}"
            f"{'-norm' if c['normalize'] else ''}{'-anchor' if c['anchor'] else ''}")


def _apply(node, cfg, inputs):
    opts = dict(L=cfg["depth"], kw=dict(residual=cfg["residual"], activation=cfg["activation"], loss=cfg["loss"],
                                         normalize=cfg["normalize"]))
    return node.apply(opts, *inputs)


@needs_kernel
@pytest.mark.parametrize("cfg", NODE_CONFIGS, ids=[_node_id(c) for c in NODE_CONFIGS])
def test_node_matches_the_torch_loop(cfg):
    inputs = _node_inputs(cfg)
    outs_t = _apply(TorchChunkScan, cfg, inputs)
    outs_c = _apply(CpuChunkScan, cfg, inputs)
    L = cfg["depth"]
    names = ["o", *(f"WS_final[{i}]" for i in range(L)), *(f"last_anchor[{i}]" for i in range(L))]
    for name, a, b in zip(names, outs_t, outs_c, strict=True):
        assert_close(name, a, b, 1e-12)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    cots = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs_t]
    grads_t = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs_t, cots, strict=True)), inputs)
    grads_c = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs_c, cots, strict=True)), inputs)
    in_names = "q k v b f G bl el fl gl pl".split() + [f"WS[{i}]" for i in range(L)] + \
        [f"A[{i}]" for i in range(L if cfg["anchor"] else 0)]
    for name, a, b in zip(in_names, grads_t, grads_c, strict=True):
        assert_close(f"grad {name}", a, b, 1e-11)


@needs_kernel
@pytest.mark.parametrize("nc,anchor", [(32, False), (33, True), (70, False), (97, True)])
def test_node_backward_over_several_segments(nc, anchor):
    """The backward re-runs the forward 32 chunks at a time from states a first pass found (cpu_scan.cpp, kSegment):
    chunk counts on, just past and well past a segment boundary, with and without a separate anchor."""
    cfg = dict(nc=nc, B=2, H=3, n=2, depth=2, K=3, hidden=5, V=3, residual=True, activation="gelu", loss="l2",
               normalize=True, anchor=anchor, seed=nc)
    inputs = _node_inputs(cfg)
    outs = [_apply(node, cfg, inputs) for node in (TorchChunkScan, CpuChunkScan)]
    for a, b in zip(*outs, strict=True):
        assert_close("output", a, b, 1e-12)
    cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64) for o in outs[0]]
    grads = [torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cots, strict=True)), inputs) for out in outs]
    for i, (a, b) in enumerate(zip(*grads, strict=True)):
        assert_close(f"grad {i}", a, b, 1e-11)


@needs_kernel
def test_node_gradients_with_some_outputs_unused():
    """Outputs whose gradient is None (the final state, the last anchor) count as zero."""
    cfg = dict(nc=3, B=2, H=3, n=4, depth=2, K=3, hidden=5, V=3, residual=True, activation="gelu", loss="l2",
               normalize=True, anchor=False, seed=3)
    inputs = _node_inputs(cfg)
    grads = []
    for node in (TorchChunkScan, CpuChunkScan):
        o = _apply(node, cfg, inputs)[0]
        grads.append(torch.autograd.grad((o * o).sum(), inputs))
    for a, b in zip(*grads, strict=True):
        assert_close("grad", a, b, 1e-11)


@needs_kernel
def test_gradcheck_of_the_node():
    cfg = dict(nc=2, B=1, H=3, n=3, depth=2, K=2, hidden=3, V=2, residual=True, activation="silu", loss="l2",
               normalize=True, anchor=True, seed=5)
    inputs = _node_inputs(cfg)
    fn = lambda *xs: _apply(CpuChunkScan, cfg, xs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 2. through the op: the compiled loop against the per-token reference and the torch loop


@needs_kernel
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize_step"])
@pytest.mark.parametrize("B,T,H,C,depth", [(3, 37, 5, 4, 2), (1, 29, 3, 5, 1), (2, 70, 2, 16, 3), (5, 9, 4, 3, 2)])
def test_op_matches_reference_and_the_torch_loop(B, T, H, C, depth, normalize):
    inp = make_inputs(B, T, H, 4, 4, depth, with_momentum=True, seed=B * 100 + T)
    inp["k"] = inp["k"] * 1.25  # off normalize_step's kink (see _node_inputs)
    inp = {n: (tuple(t.requires_grad_() for t in x) if isinstance(x, tuple) else x.requires_grad_())
           for n, x in inp.items()}
    kw = dict(chunk_size=C, normalize_step=normalize)
    names, tensors = zip(*leaves(inp), strict=True)
    results = []
    for fn, on in ((neural_memory_reference, False), (neural_memory_chunked, False), (neural_memory_chunked, True)):
        with cpu_kernel(on):
            o, s = run(fn, inp, **kw)
            cot = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
            results.append((o, s, torch.autograd.grad(state_loss(o, s, cot), tensors)))
    (o_r, s_r, g_r), (o_t, s_t, g_t), (o_c, s_c, g_c) = results
    assert_close("o vs reference", o_r, o_c, 1e-10)
    assert_states_close(s_r, s_c, 1e-10)
    assert_close("o vs torch loop", o_t, o_c, 1e-12)
    assert_states_close(s_t, s_c, 1e-12)
    for name, gr, gt, gc in zip(names, g_r, g_t, g_c, strict=True):
        assert_close(f"grad {name} vs reference", gr, gc, 1e-9)
        assert_close(f"grad {name} vs torch loop", gt, gc, 1e-11)


@needs_kernel
@pytest.mark.parametrize("first", [3, 6, 8])
def test_a_stream_continued_mid_chunk(first):
    """A state carried from a stopped stream (its anchor differs from its W mid-chunk): the compiled loop's chunk 0
    takes its gradients at the carried anchor, and every gradient, the carried state's included, matches the torch
    loop's."""
    C, T = 4, 19
    inp = make_inputs(2, T, 3, 3, 3, 2, with_momentum=True, seed=first)
    with cpu_kernel(False):
        head = {n: (x[:, :first] if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
        _, st = run(neural_memory_chunked, head, chunk_size=C)
    leaf = lambda xs: tuple(x.detach().clone().requires_grad_() for x in xs)  # noqa: E731
    st = MemoryState(leaf(st.weights), leaf(st.momentum), leaf(st.anchor), st.offset, st.chunk_size)
    tail = {n: x[:, first:].detach().requires_grad_() for n, x in inp.items() if isinstance(x, torch.Tensor)}
    tensors = [*tail.values(), *st.weights, *st.momentum, *st.anchor]
    results = []
    for on in (False, True):
        with cpu_kernel(on):
            o, s = neural_memory_chunked(tail["q"], tail["k"], tail["v"], tail["theta"], tail["eta"], tail["alpha"],
                                         chunk_size=C, initial_state=st, output_final_state=True)
            cot = torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
            results.append((o, s, torch.autograd.grad(state_loss(o, s, cot), tensors, allow_unused=True)))
    (o_t, s_t, g_t), (o_c, s_c, g_c) = results
    assert_close("o", o_t, o_c, 1e-12)
    assert_states_close(s_t, s_c, 1e-12)
    for i, (a, b) in enumerate(zip(g_t, g_c, strict=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(f"grad {i}", a, b, 1e-11)


@needs_kernel
@pytest.mark.parametrize("depth", [1, 2])
def test_float32_against_float64(depth):
    """float32 (its own exp and erf) stays within float32 rounding of the float64 reference."""
    inp = make_inputs(3, 41, 5, 8, 8, depth, with_momentum=True, seed=depth)
    o_ref, s_ref = run(neural_memory_reference, inp, chunk_size=4)
    inp32 = {n: (tuple(t.float() for t in x) if isinstance(x, tuple) else x.float()) for n, x in inp.items()}
    with cpu_kernel(True):
        o, s = run(neural_memory_chunked, inp32, chunk_size=4)
    assert o.dtype == torch.float32
    assert_close("o (float32)", o_ref, o, 1e-5)
    assert_states_close(s_ref, s, 1e-5)


@needs_kernel
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"),
                    reason="the kernel sets flush-to-zero on x86 and aarch64 only")
def test_subnormals_are_zero_inside_the_kernel_and_only_there():
    """The compiled loop flushes subnormal floats to zero (a decaying state's tail costs ~100x an operation on x86:
    docs/PERFORMANCE.md, "Subnormal floats"), and gives the caller's thread back its IEEE arithmetic. A memory holding
    only subnormal weights, read without the residual and never written (theta = alpha = 0): the torch loop reads
    tiny non-zero values, the kernel reads zero, and torch after the kernel still makes subnormals."""
    inp = make_inputs(2, 9, 3, 4, 4, 1, with_momentum=True, seed=5, dtype=torch.float32)
    inp["weights"] = tuple(w.sign() * 3e-39 for w in inp["weights"])  # every entry subnormal in float32
    inp["momentum"] = tuple(torch.zeros_like(m) for m in inp["momentum"])
    inp["theta"], inp["alpha"] = torch.zeros_like(inp["theta"]), torch.zeros_like(inp["alpha"])
    tiny = torch.finfo(torch.float32).tiny
    with cpu_kernel(True):
        o_c, s_c = run(neural_memory_chunked, inp, chunk_size=4, residual=False)
    assert (torch.tensor([tiny]) / 8).item() != 0.0, "the kernel left flush-to-zero on in the caller's thread"
    with cpu_kernel(False):
        o_t, s_t = run(neural_memory_chunked, inp, chunk_size=4, residual=False)
    assert o_t.abs().max() < tiny and (o_t != 0).float().mean() > 0.5  # the torch loop reads the subnormals
    assert (o_c == 0).all()
    assert torch.equal(s_t.weights[0], inp["weights"][0].expand_as(s_t.weights[0]))


@needs_kernel
@pytest.mark.parametrize("anchor", [False, True])
def test_the_forward_keeps_the_segment_starts_and_the_backward_uses_them(anchor, monkeypatch):
    """A training forward keeps the states at the backward's segment starts (chunks 32 and 64 of 70) when they fit
    in SAVED_BOUNDS_BYTES: they are the states a run of the first 32 / 64 chunks ends in, and the backward from them
    gives, bit for bit, the gradients of the backward that finds them itself (budget 0: nothing kept)."""
    cfg = dict(nc=70, B=2, H=3, n=2, depth=2, K=3, hidden=5, V=3, residual=True, activation="gelu", loss="l2",
               normalize=True, anchor=anchor, seed=5)
    inputs = _node_inputs(cfg)
    L, opts = cfg["depth"], dict(residual=True, activation="gelu", loss="l2", normalize=True)
    tokens, WS, A = inputs[:11], inputs[11:11 + L], (inputs[11 + L:] or None)
    with torch.no_grad():
        _, _, _, saved = cpu_scan.forward(tokens, WS, A, opts, save=True)
        bounds = saved[-1]
        assert len(saved) == 11 + L * (2 if anchor else 1) + 1 and bounds.shape[1] == 2 * sum(
            2 * w.shape[-2] // 2 * w.shape[-1] for w in WS)
        for i, end in enumerate((32, 64)):
            _, states, _, _ = cpu_scan.forward([t[:end] for t in tokens], WS, A, opts, save=False)
            lanes = torch.cat([to_lanes(s.reshape(-1, *s.shape[2:]), 0, bounds.shape[-1]).flatten(1, -2)
                               for s in states], dim=1)
            half = bounds.shape[1] // 2
            assert torch.equal(bounds[:, i * half:(i + 1) * half], lanes), f"segment start {end}"

    def grads():
        out = _apply(CpuChunkScan, cfg, inputs)
        cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=F64) for o in out]
        return torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cots, strict=True)), inputs)

    kept = grads()
    monkeypatch.setattr(cpu_scan, "SAVED_BOUNDS_BYTES", 0)
    with torch.no_grad():
        assert len(cpu_scan.forward(tokens, WS, A, opts, save=True)[3]) == 11 + L * (2 if anchor else 1)
    found = grads()
    for i, (a, b) in enumerate(zip(kept, found, strict=True)):
        assert torch.equal(a, b), f"grad {i} differs between kept and found segment starts"


@needs_kernel
def test_the_reused_segment_buffers_carry_nothing_between_calls():
    """The backward's segment buffers belong to the thread and keep the last call's values (cpu_scan.cpp,
    segment_scratch): a backward run right after one on other inputs (larger values, a wider memory, more chunks)
    must give, bit for bit, the gradients it gives right after itself."""
    small = dict(nc=40, B=2, H=3, n=3, depth=2, K=4, hidden=6, V=4, residual=True, activation="gelu", loss="l2",
                 normalize=True, anchor=False, seed=11)
    other = dict(small, nc=70, H=5, hidden=9, depth=3, seed=12)

    def grads(cfg, scale=1.0):
        inputs = _node_inputs(cfg)
        inputs = (inputs[0], inputs[1], inputs[2] * scale, *inputs[3:])
        out = _apply(CpuChunkScan, cfg, inputs)
        cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=F64) for o in out]
        return torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cots, strict=True)), inputs)

    grads(small)
    after_itself = grads(small)
    grads(other, scale=1e3)
    after_other = grads(small)
    for i, (a, b) in enumerate(zip(after_itself, after_other, strict=True)):
        assert torch.equal(a, b), f"grad {i} depends on what the call before left in the buffers"


@needs_kernel
@pytest.mark.parametrize("T", [33, 141])  # 141: 36 chunks, two backward segments (the forward keeps the second's start)
def test_threads_split_groups_without_changing_a_bit(T):
    inp = make_inputs(4, T, 9, 4, 4, 2, with_momentum=True, seed=3, requires_grad=True, dtype=torch.float32)
    names, tensors = zip(*leaves(inp), strict=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            o, s = run(neural_memory_chunked, inp, chunk_size=4)
            results.append((o, torch.autograd.grad((o * o).sum(), tensors)))
    finally:
        torch.set_num_threads(before)
    (o1, g1), (o3, g3) = results
    assert torch.equal(o1, o3)
    assert all(torch.equal(a, b) for a, b in zip(g1, g3, strict=True))


# ----------------------------------------------------------------------------------------------------------------------
# 3. layout, support, fallback


@needs_kernel
@pytest.mark.parametrize("rows,width", [(1, 16), (15, 16), (16, 16), (33, 8)])
def test_lanes_round_trip(rows, width):
    x = torch.randn(3, rows, 4, 5)
    lanes = to_lanes(x, 1, width)
    assert lanes.shape == (3, -(-rows // width), 4, 5, width)
    assert lanes.is_contiguous() and lanes.data_ptr() % 64 == 0
    assert torch.equal(from_lanes(lanes, 1, rows), x)
    padded = from_lanes(lanes, 1, lanes.shape[1] * width)
    assert padded[:, rows:].abs().sum() == 0


def test_large_states_at_long_chunks_take_the_torch_loop():
    """The speed rule: a 4 MiB group state at chunk 16 runs compiled when its lanes are full, not when half are
    empty; at chunk 4, or for a small state, it runs compiled either way."""
    opts = dict(residual=True, activation="gelu", loss="l2")
    width = cpu_scan.lanes(torch.float32)  # 16 with AVX-512, else 8
    big = cpu_scan.GROUP_STATE_LIMIT // (4 * width)  # one row's [W; S] elements: a full group holds exactly the limit
    reason = lambda n, rows, state: cpu_scan.unsupported_reason(  # noqa: E731
        torch.device("cpu"), torch.float32, 2, n, opts, window=False, delta=False, rows=rows, state=state)
    ok = cpu_scan.unavailable_reason()
    assert reason(16, width, big) == ok and reason(16, 2 * width, big) == ok
    assert "runs faster in the torch loop" in reason(16, width // 2, big)
    assert "runs faster in the torch loop" in reason(16, width, 2 * big)
    assert reason(4, width // 2, big) == ok and reason(16, width // 2, 4096) == ok


def test_the_vector_width_follows_the_build(tmp_path):
    """MNEMOS_VECTOR_BYTES builds the kernel at that width, the module lays tensors out in as many lanes, and the
    compiled loop equals the torch loop in float64 at that width, and so does Memora with the kl read (a fresh process
    each: the library is loaded once per process); a bad value is refused by name."""
    code = ("import torch\nfrom mnemos.ops import neural_memory_chunked as op\n"
            "from mnemos.ops.memory_rule import cpu_scan\n"
            "g = torch.Generator().manual_seed(0); B, T, H, D = 3, 13, 2, 5  # 6 rows: part-filled groups\n"
            "x = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3)]\n"
            "gates = [0.3 * torch.rand(B, T, H, generator=g, dtype=torch.float64) for _ in range(3)]\n"
            "W = (torch.randn(H, 4 * D, D, generator=g, dtype=torch.float64) / 3, "
            "torch.randn(H, D, 4 * D, generator=g, dtype=torch.float64) / 5)\n"
            "outs = []\n"
            "for on in (True, False):\n"
            "    with cpu_scan.cpu_kernel(on):\n"
            "        outs.append(op(*x, *gates, W, chunk_size=4, normalize_step=True)[0])\n"
            "assert (outs[0] - outs[1]).abs().max() < 1e-12, (outs[0] - outs[1]).abs().max()\n"
            "from mnemos.ops import neural_memory\n"  # Memora: cpu_scan's kl read, its lanes across matrix rows
            "mem = []\n"
            "for on in (True, False):\n"
            "    with cpu_scan.cpu_kernel(on):\n"
            "        mem.append(neural_memory(*x, *gates, W, rule='memora', chunk_size=4)[0])\n"
            "assert (mem[0] - mem[1]).abs().max() < 1e-12, (mem[0] - mem[1]).abs().max()\n"
            "print(cpu_scan.unavailable_reason(), cpu_scan.lanes(torch.float32), cpu_scan.lanes(torch.float64))")
    env = {**os.environ, "MNEMOS_CACHE_DIR": str(tmp_path)}
    # 16 bytes: not the native width anywhere it is tested (32 or 64), 4 / 2 lanes; one build (~5-30 s)
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MNEMOS_VECTOR_BYTES": "16"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "4", "2"], out
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "MNEMOS_VECTOR_BYTES": "48"},
                         capture_output=True, text=True)
    assert "MNEMOS_VECTOR_BYTES must be 16, 32 or 64" in bad.stdout + bad.stderr


@pytest.mark.parametrize("change,match", [
    (dict(device=torch.device("meta")), "runs on the CPU"),
    (dict(dtype=torch.float16), "float32 or float64"),
    (dict(opts=dict(residual=True, activation="gelu", loss="lp")), "losses"),
    (dict(opts=dict(residual=True, activation="tanh", loss="l2")), "activations"),
    (dict(window=True), "Omega window"),
    (dict(delta=True), "huber"),
    (dict(depth=9), "depth <= 8"),
])
def test_unsupported_calls_name_the_reason(change, match):
    args = dict(device=torch.device("cpu"), dtype=torch.float32, depth=2, n=4,
                opts=dict(residual=True, activation="gelu", loss="l2"), window=False, delta=False)
    args.update(change)
    reason = cpu_scan.unsupported_reason(args["device"], args["dtype"], args["depth"], args["n"], args["opts"],
                                         window=args["window"], delta=args["delta"])
    assert reason is not None and match in reason


def _torch_loop_result(inp):
    with cpu_kernel(False):
        return run(neural_memory_chunked, inp, chunk_size=4)[0]


def test_a_failed_build_warns_once_and_runs_the_torch_loop(monkeypatch, tmp_path):
    """A compiler that fails (here ``false``) leaves the op working on the torch loop, with one RuntimeWarning that
    says why."""
    monkeypatch.setattr(cpu_scan, "_tried", False)
    monkeypatch.setattr(cpu_scan, "_library", None)
    monkeypatch.setattr(cpu_scan, "_reason", None)
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("MNEMOS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_scan, "_compiler", lambda: "false")
    inp = make_inputs(2, 13, 3, 4, 4, 2, seed=1)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        with cpu_kernel(True):
            o = run(neural_memory_chunked, inp, chunk_size=4)[0]
    assert cpu_scan.library() is None and "could not be built" in cpu_scan.unavailable_reason()
    assert torch.equal(o, _torch_loop_result(inp))


def test_the_environment_switch_turns_it_off():
    code = ("from mnemos.ops.memory_rule import cpu_scan; r = cpu_scan.unavailable_reason(); "
            "assert r is not None and 'switched off' in r, r")
    env = dict(os.environ, MNEMOS_CPU_KERNEL="0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
