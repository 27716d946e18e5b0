"""Mamba-2's SSD (mnemos.ops.ssd) against its token-by-token recurrence in float64: outputs, final state and the
gradients of every input over random shapes, groups, chunk sizes and carried states; streaming cuts; gradcheck; the
reductions (Δ = 0 keeps the state, A = 0 is causal linear attention); errors; and the Mamba-2 layer around it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mnemos.models import MnemosConfig, MnemosLM
from mnemos.models.cache import Mamba2State
from mnemos.models.config import saved_model_config, variant_reads
from mnemos.models.mamba2 import Mamba2Mixer
from mnemos.ops.ssd import segment_sum_decay, ssd, ssd_reference
from mnemos.testing import assert_close

F64 = torch.float64
NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def make(Bsz, T, H, P, G, N, *, with_state, seed, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    dt = dt_scale * u(Bsz, T, H)
    dt[u(Bsz, T, H) < 0.1] = 0.0  # exact zeros among the steps: a = 1, no write
    inp = dict(x=r(Bsz, T, H, P), dt=dt, A=-4 * u(H), B=r(Bsz, T, G, N), C=r(Bsz, T, G, N),
               initial_state=r(Bsz, H, P, N) if with_state else None)
    return {n: (t.requires_grad_() if t is not None else None) for n, t in inp.items()}


def detached(inp):
    return {n: (t.detach() if t is not None else None) for n, t in inp.items()}


def call(fn, inp, **kw):
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], initial_state=inp["initial_state"],
              output_final_state=True, **kw)


def outputs_and_grads(fn, inp, seed=7, **kw):
    y, S = call(fn, inp, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=F64)).sum() + (S * torch.randn(S.shape, generator=g,
                                                                                        dtype=F64)).sum()
    leaves = [inp[n] for n in NAMES if inp[n] is not None]
    return y, S, dict(zip([n for n in NAMES if inp[n] is not None], torch.autograd.grad(loss, leaves), strict=True))


def _configs(n=40, seed=0):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        H = rnd.choice([1, 2, 4])
        out.append(dict(Bsz=rnd.choice([1, 2]), T=rnd.choice([1, 2, 5, 16, 17, 33, 63, 70]), H=H,
                        P=rnd.choice([1, 2, 3]), G=rnd.choice([g for g in (1, 2, 4) if H % g == 0]),
                        N=rnd.choice([1, 2, 4]), Q=rnd.choice([1, 2, 3, 16, 64]), with_state=rnd.random() < 0.5,
                        seed=i))
    return out


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: "B{Bsz}-T{T}-H{H}-P{P}-G{G}-N{N}-C{Q}{s}".format(
    s="-state" if c["with_state"] else "", **c))
def test_chunked_equals_the_recurrence(cfg):
    cfg = dict(cfg)
    Q = cfg.pop("Q")
    inp = make(**cfg)
    y_r, S_r, g_r = outputs_and_grads(ssd_reference, inp)
    y_c, S_c, g_c = outputs_and_grads(ssd, inp, chunk_size=Q)
    assert_close("y", y_r, y_c, 1e-10)
    assert_close("S_T", S_r, S_c, 1e-10)
    for name in g_r:
        assert_close(f"grad {name}", g_r[name], g_c[name], 1e-9)


def test_recurrence_written_out_for_two_steps():
    """The reference is the paper's formula: two steps from a known state, by hand."""
    inp = detached(make(1, 2, 1, 2, 1, 3, with_state=True, seed=3))
    x, dt, A, B, C = (inp[n] for n in ("x", "dt", "A", "B", "C"))
    S = inp["initial_state"][0, 0]  # [P, N]
    ys = []
    for t in range(2):
        d = dt[0, t, 0]
        S = torch.exp(d * A[0]) * S + d * torch.outer(x[0, t, 0], B[0, t, 0])
        ys.append(S @ C[0, t, 0])
    y, S_T = call(ssd_reference, inp)
    assert_close("y", torch.stack(ys)[None, :, None], y, 1e-14)
    assert_close("S_T", S[None, None], S_T, 1e-14)


def test_long_sequence_and_the_design_grid():
    """DESIGN.md's grid: chunk sizes 1, 2, 16, 64 at T = 1, 63, 100 (outputs and state; gradients above)."""
    for T in (1, 63, 100):
        inp = make(1, T, 2, 2, 1, 3, with_state=True, seed=T)
        with torch.no_grad():
            y_r, S_r = call(ssd_reference, inp)
            for Q in (1, 2, 16, 64):
                y_c, S_c = call(ssd, inp, chunk_size=Q)
                assert_close(f"y T{T} C{Q}", y_r, y_c, 1e-11)
                assert_close(f"S_T T{T} C{Q}", S_r, S_c, 1e-11)


@pytest.mark.parametrize("cuts", [[1], [5, 6], [3, 16, 30]], ids=lambda c: "-".join(map(str, c)))
def test_a_stream_cut_in_pieces_equals_one_call(cuts):
    inp = make(2, 37, 2, 3, 1, 4, with_state=True, seed=11)
    with torch.no_grad():
        y, S = call(ssd, inp, chunk_size=8)
        S_carry, ys = inp["initial_state"], []
        for a, b in zip([0, *cuts], [*cuts, 37], strict=True):
            piece = {n: inp[n][:, a:b] for n in ("x", "dt", "B", "C")}
            y_p, S_carry = call(ssd, {**piece, "A": inp["A"], "initial_state": S_carry}, chunk_size=8)
            ys.append(y_p)
    assert_close("y pieces", y, torch.cat(ys, 1), 1e-12)
    assert_close("S_T pieces", S, S_carry, 1e-12)


def test_gradcheck():
    inp = make(1, 6, 2, 2, 1, 2, with_state=True, seed=5)
    args = [inp[n] for n in NAMES]

    def f(x, dt, A, B, C, S0):
        return ssd(x, dt, A, B, C, chunk_size=4, initial_state=S0, output_final_state=True, check_values=False)

    assert torch.autograd.gradcheck(f, args)


def test_zero_step_keeps_the_state():
    """Δ = 0: a = 1 and nothing is written, so the state stays the initial one and every output reads it."""
    inp = detached(make(2, 19, 2, 3, 1, 4, with_state=True, seed=2))
    inp["dt"] = torch.zeros_like(inp["dt"])
    for fn in (ssd, ssd_reference):
        y, S = call(fn, inp, chunk_size=4)
        assert torch.equal(S, inp["initial_state"]), fn.__name__
        read = torch.einsum("bhpn,bthn->bthp", inp["initial_state"], inp["C"].expand(-1, -1, 2, -1))
        assert_close(f"{fn.__name__} y", read, y, 1e-14)


def test_no_decay_is_causal_linear_attention():
    """A = 0: Y = tril(C B^T) (Δ x) per head (the dual form without decay)."""
    inp = detached(make(1, 13, 1, 3, 1, 4, with_state=False, seed=4))
    inp["A"] = torch.zeros_like(inp["A"])
    y, _ = call(ssd, inp, chunk_size=4)
    Bm, Cm, xbar = inp["B"][0, :, 0], inp["C"][0, :, 0], inp["dt"][0, :, :1] * inp["x"][0, :, 0]
    assert_close("y", ((Cm @ Bm.T).tril() @ xbar)[None, :, None], y, 1e-13)


def test_segment_sums_are_the_decay_products():
    log_a = -torch.rand(2, 7, dtype=F64)
    L = segment_sum_decay(log_a)
    for t in range(7):
        for s in range(7):
            want = torch.exp(log_a[:, s + 1: t + 1].sum(-1)) if s <= t else torch.zeros(2, dtype=F64)
            assert torch.allclose(L[:, t, s], want, rtol=1e-14, atol=0), (t, s)


def test_groups_identical_equal_one_group():
    inp = detached(make(1, 9, 4, 2, 1, 3, with_state=True, seed=8))
    y1, S1 = call(ssd, inp, chunk_size=4)
    y4, S4 = call(ssd, {**inp, "B": inp["B"].expand(-1, -1, 4, -1), "C": inp["C"].expand(-1, -1, 4, -1)},
                  chunk_size=4)
    assert_close("y", y1, y4, 1e-14)
    assert_close("S_T", S1, S4, 1e-14)


def test_half_precision_runs_in_float32():
    inp = detached(make(1, 20, 2, 2, 1, 3, with_state=True, seed=9))
    ref, S_ref = call(ssd_reference, inp)
    y, S = call(ssd, {n: t.to(torch.bfloat16) for n, t in inp.items()}, chunk_size=8)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_close("y bf16", ref, y.double(), 3e-2)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(1, 4, 2)), r"^x must be a \[B, T, H, P\]"),
    (dict(x=torch.zeros(1, 4, 2, 3, dtype=torch.long)), "^x must be a floating-point"),
    (dict(dt=torch.zeros(1, 4, 3)), r"^dt must be \[B, T, H\]"),
    (dict(dt=-torch.ones(1, 4, 2)), "^dt must be >= 0"),
    (dict(A=torch.zeros(3)), r"^A must be \[H\]"),
    (dict(A=torch.ones(2)), "^A must be <= 0"),
    (dict(B=torch.zeros(1, 4, 3, 5)), "^B must be .*G dividing H"),
    (dict(C=torch.zeros(1, 4, 1, 4)), "^C must have B's shape"),
    (dict(initial_state=torch.zeros(1, 2, 3, 4)), r"^initial_state must be a \[B, H, P, N\]"),
    (dict(chunk_size=0), "^chunk_size must be an int >= 1"),
    (dict(x=torch.full((1, 4, 2, 3), float("nan"))), "^x contains NaN"),
])
def test_bad_inputs_name_the_argument(change, match):
    args = dict(x=torch.zeros(1, 4, 2, 3), dt=torch.zeros(1, 4, 2), A=torch.zeros(2), B=torch.zeros(1, 4, 1, 5),
                C=torch.zeros(1, 4, 1, 5), initial_state=None, chunk_size=4)
    args.update(change)
    for fn in (ssd, ssd_reference):
        with pytest.raises(ValueError, match=match):
            fn(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=args["chunk_size"],
               initial_state=args["initial_state"])


# ----------------------------------------------------------------------------------------------------------------------
# the layer


def tiny_mixer(seed=0, **kw):
    torch.manual_seed(seed)
    return Mamba2Mixer(12, 3, **{"d_state": 4, "chunk_size": 5, **kw}).double()


def test_layer_chunked_equals_its_reference_with_gradients():
    x = torch.randn(2, 13, 12, dtype=F64)
    m = tiny_mixer()
    ref = tiny_mixer(impl="reference")
    state = m.init_state(2)
    state = Mamba2State(torch.randn_like(state.conv), torch.randn_like(state.ssm))
    y, st = m(x, state)
    y_r, st_r = ref(x, state)
    assert_close("y", y_r, y, 1e-12)
    assert_close("conv", st_r.conv, st.conv, 0)
    assert_close("ssm", st_r.ssm, st.ssm, 1e-12)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), list(m.parameters()))
    grads_r = torch.autograd.grad((y_r * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(m.named_parameters(), grads_r, grads, strict=True):
        assert_close(f"grad {name}", a, b, 1e-10)


def test_layer_with_zero_steps_keeps_its_state_and_outputs_the_skip_and_the_read():
    """Δ -> 0 (dt_bias -1000: softplus underflows to exactly 0): the SSM state stays the initial one, and the layer's
    output is out_proj(RMSNorm((S_0 C_t + D x_t) * silu(z_t)))."""
    m = tiny_mixer()
    with torch.no_grad():
        m.dt_bias.fill_(-1000.0)
    x = torch.randn(2, 9, 12, dtype=F64)
    s0 = m.init_state(2)
    s0 = Mamba2State(torch.randn_like(s0.conv), torch.randn_like(s0.ssm))
    with torch.no_grad():
        y, st = m(x, s0)
        xs, dt, Bm, Cm, z, _ = m.features(x, s0.conv)
        assert torch.equal(dt, torch.zeros_like(dt))
        read = torch.einsum("bhpn,btn->bthp", s0.ssm, Cm[:, :, 0])  # [B, T, H, P]
        want = m.out_proj(m.norm((read + m.D[:, None] * xs).reshape(2, 9, -1) * F.silu(z)))
    assert torch.equal(st.ssm, s0.ssm)
    assert_close("y", want, y, 1e-13)


def test_layer_init_and_state_size():
    m = Mamba2Mixer(32, 4, d_state=8, expand=2)
    dt = F.softplus(m.dt_bias)
    assert bool(((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()), dt
    assert bool(((-m.A_log.exp() <= -1) & (-m.A_log.exp() >= -16)).all())
    assert m.head_dim == 16 and m.state_numel() == {"ssm": 4 * 16 * 8, "conv": (64 + 16) * 3}
    st = m.init_state(2)
    assert st.ssm.shape == (2, 4, 16, 8) and st.conv.shape == (2, 80, 3)
    with pytest.raises(ValueError, match="heads"):
        Mamba2Mixer(10, 3, expand=1)


def test_config_section_is_read_by_mamba2_only_and_round_trips():
    base = dict(variant="mamba2", vocab_size=16, d_model=8, n_layers=1, n_heads=2)
    ids = torch.randint(0, 16, (1, 11))

    def logits(**kw):
        torch.manual_seed(0)
        with torch.no_grad():
            return MnemosLM(MnemosConfig.from_dict({**base, **kw})).double()(ids)[0]

    ref = logits()
    for key, value in (("d_state", 3), ("expand", 1), ("conv_size", 2)):
        assert variant_reads("mamba2", f"mamba2.{key}")
        out = logits(mamba2={key: value})
        assert out.shape != ref.shape or not torch.equal(out, ref), key
    # the chunk size changes how, not what: not a read (resuming may change it)
    assert not variant_reads("mamba2", "mamba2.chunk_size")
    assert_close("chunk 3", ref, logits(mamba2={"chunk_size": 3}), 1e-12)
    assert not variant_reads("deltanet", "mamba2.d_state") and not variant_reads("mamba2", "memory.chunk_size")
    cfg = MnemosConfig.from_dict({**base, "mamba2": {"d_state": 4}})
    assert MnemosConfig.from_dict(cfg.to_dict()) == cfg and cfg.mamba2.d_state == 4
    # a config saved before the section existed loads with its defaults
    old = {k: v for k, v in MnemosConfig(variant="deltanet").to_dict().items() if k not in ("mamba2", "based")}
    assert MnemosConfig.from_dict(saved_model_config(old)) == MnemosConfig(variant="deltanet")
    with pytest.raises(ValueError, match=r"model\.mamba2\.d_state must be >= 1"):
        MnemosConfig(mamba2={"d_state": 0})
    with pytest.raises(TypeError, match=r"model\.mamba2\.expand must be of type int"):
        MnemosConfig(mamba2={"expand": 2.5})
    with pytest.raises(ValueError, match=r"unknown Mamba2Config keys \['model\.mamba2\.dstate'\]"):
        MnemosConfig(mamba2={"dstate": 8})
