"""BASED's Taylor linear attention (mnemos.ops.based) against its token-by-token recurrence through the explicit
features, in float64: outputs, final state (KV and K sums) and the gradients of every input over random shapes,
chunk sizes and carried states; streaming cuts; gradcheck; the feature map's kernel; errors; and the layer."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mnemos.models import MnemosConfig, MnemosLM
from mnemos.models.based import BasedLinearAttention
from mnemos.models.cache import BasedState
from mnemos.models.config import variant_reads
from mnemos.ops.based import (based_linear_attention, based_linear_attention_reference, taylor_feature_dim,
                              taylor_feature_map)
from mnemos.testing import assert_close

F64 = torch.float64
NAMES = ("q", "k", "v", "kv0", "ks0")


def make(B, T, H, Fd, V, *, with_state, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    inp = dict(q=r(B, T, H, Fd), k=r(B, T, H, Fd), v=r(B, T, H, V), kv0=None, ks0=None)
    if with_state:  # the sums over a random prefix: a state the layer can reach (its normaliser >= prefix / 2)
        _, (kv0, ks0) = based_linear_attention_reference(r(B, 3, H, Fd), r(B, 3, H, Fd), r(B, 3, H, V),
                                                         output_final_state=True)
        inp["kv0"], inp["ks0"] = kv0, ks0
    return {n: (t.requires_grad_() if t is not None else None) for n, t in inp.items()}


def call(fn, inp, **kw):
    state = None if inp["kv0"] is None else (inp["kv0"], inp["ks0"])
    return fn(inp["q"], inp["k"], inp["v"], initial_state=state, output_final_state=True, **kw)


def outputs_and_grads(fn, inp, seed=7, **kw):
    y, (kv, ks) = call(fn, inp, **kw)
    g = torch.Generator().manual_seed(seed)
    w = lambda t: torch.randn(t.shape, generator=g, dtype=F64)  # noqa: E731
    loss = (y * w(y)).sum() + (kv * w(kv)).sum() + (ks * w(ks)).sum()
    names = [n for n in NAMES if inp[n] is not None]
    return y, (kv, ks), dict(zip(names, torch.autograd.grad(loss, [inp[n] for n in names]), strict=True))


def _configs(n=24, seed=1):
    rnd = random.Random(seed)
    return [dict(B=rnd.choice([1, 2]), T=rnd.choice([1, 2, 5, 16, 17, 33, 63]), H=rnd.choice([1, 2]),
                 Fd=rnd.choice([1, 2, 3, 4]), V=rnd.choice([1, 2, 3]), Q=rnd.choice([1, 2, 3, 16, 64]),
                 with_state=rnd.random() < 0.5, seed=i) for i in range(n)]


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: "B{B}-T{T}-H{H}-F{Fd}-V{V}-C{Q}{s}".format(
    s="-state" if c["with_state"] else "", **c))
def test_chunked_equals_the_recurrence(cfg):
    cfg = dict(cfg)
    Q = cfg.pop("Q")
    inp = make(**cfg)
    y_r, (kv_r, ks_r), g_r = outputs_and_grads(based_linear_attention_reference, inp)
    y_c, (kv_c, ks_c), g_c = outputs_and_grads(based_linear_attention, inp, chunk_size=Q)
    assert_close("y", y_r, y_c, 1e-10)
    assert_close("kv", kv_r, kv_c, 1e-10)
    assert_close("k_sum", ks_r, ks_c, 1e-10)
    for name in g_r:
        if g_r[name].pow(2).mean().sqrt() < 1e-9:
            # one token and no state: y = v K / (K + eps), so the q and k gradients are O(eps) and only rounding
            # is left to compare
            assert (g_r[name] - g_c[name]).abs().max() < 1e-13, f"grad {name}"
        else:
            assert_close(f"grad {name}", g_r[name], g_c[name], 1e-9)


def test_feature_map_inner_product_is_the_taylor_kernel():
    """phi(q) . phi(k) == 1 + q.k / sqrt(d) + (q.k)^2 / (2 d), the 2nd-order Taylor expansion of exp(q.k / sqrt d)."""
    g = torch.Generator().manual_seed(0)
    for d in (1, 3, 16):
        q, k = torch.randn(50, d, generator=g, dtype=F64), torch.randn(50, d, generator=g, dtype=F64)
        phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
        assert phi_q.shape == (50, taylor_feature_dim(d)) and taylor_feature_dim(16) == 273
        s = (q * k).sum(-1)
        assert_close(f"kernel d={d}", 1 + s / math.sqrt(d) + s**2 / (2 * d), (phi_q * phi_k).sum(-1), 1e-14)
        # its minimum is 1/2 (at q.k = -sqrt d): every normaliser is at least (tokens summed) / 2
        assert bool(((phi_q * phi_k).sum(-1) >= 0.5 - 1e-12).all())


def test_recurrence_written_out():
    """The reference is BASED's formula: y_t = sum_s K(q_t, k_s) v_s / sum_s K(q_t, k_s) over s <= t."""
    inp = {n: (t.detach() if t is not None else None) for n, t in make(1, 6, 1, 3, 2, with_state=False,
                                                                       seed=3).items()}
    q, k, v = inp["q"][0, :, 0], inp["k"][0, :, 0], inp["v"][0, :, 0]
    s = q @ k.T / math.sqrt(3)
    K = (1 + s + s**2 / 2).tril()
    y, _ = call(based_linear_attention_reference, inp, eps=0.0)
    assert_close("y", ((K @ v) / K.sum(-1, keepdim=True))[None, :, None], y, 1e-14)


@pytest.mark.parametrize("cuts", [[1], [4, 5], [2, 17, 30]], ids=lambda c: "-".join(map(str, c)))
def test_a_stream_cut_in_pieces_equals_one_call(cuts):
    inp = make(2, 37, 2, 3, 2, with_state=True, seed=11)
    with torch.no_grad():
        y, (kv, ks) = call(based_linear_attention, inp, chunk_size=8)
        state, ys = (inp["kv0"], inp["ks0"]), []
        for a, b in zip([0, *cuts], [*cuts, 37], strict=True):
            y_p, state = based_linear_attention(inp["q"][:, a:b], inp["k"][:, a:b], inp["v"][:, a:b], chunk_size=8,
                                                initial_state=state, output_final_state=True)
            ys.append(y_p)
    assert_close("y pieces", y, torch.cat(ys, 1), 1e-12)
    assert_close("kv pieces", kv, state[0], 1e-12)
    assert_close("k_sum pieces", ks, state[1], 1e-12)


def test_gradcheck():
    inp = make(1, 5, 1, 2, 2, with_state=True, seed=5)

    def f(q, k, v, kv0, ks0):
        y, (kv, ks) = based_linear_attention(q, k, v, chunk_size=2, initial_state=(kv0, ks0), output_final_state=True)
        return y, kv, ks

    assert torch.autograd.gradcheck(f, [inp[n] for n in NAMES])


def test_half_precision_runs_in_float32():
    inp = {n: (t.detach() if t is not None else None) for n, t in make(1, 20, 2, 4, 3, with_state=False,
                                                                       seed=9).items()}
    ref, _ = call(based_linear_attention_reference, inp)
    y, (kv, ks) = call(based_linear_attention, {n: (t.to(torch.bfloat16) if t is not None else None)
                                                for n, t in inp.items()}, chunk_size=8)
    assert y.dtype == torch.bfloat16 and kv.dtype == ks.dtype == torch.float32
    assert_close("y bf16", ref, y.double(), 3e-2)


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.zeros(1, 4, 2)), r"^q must be a \[B, T, H, F\]"),
    (dict(k=torch.zeros(1, 4, 2, 3, dtype=torch.int32)), "^k must be a floating-point"),
    (dict(k=torch.zeros(1, 4, 2, 2)), "^k must have q's shape"),
    (dict(v=torch.zeros(1, 5, 2, 3)), r"^v must be \[B, T, H, V\]"),
    (dict(initial_state=torch.zeros(1, 2, 3, 13)), "^initial_state must be a pair"),
    (dict(initial_state=(torch.zeros(1, 2, 3, 12), torch.zeros(1, 2, 13))), "^initial_state must be a pair"),
    (dict(chunk_size=1.5), "^chunk_size must be an int >= 1"),
    (dict(eps=-1.0), "^eps must be a number >= 0"),
    (dict(v=torch.full((1, 4, 2, 3), float("inf"))), "^v contains NaN"),
])
def test_bad_inputs_name_the_argument(change, match):
    args = dict(q=torch.zeros(1, 4, 2, 3), k=torch.zeros(1, 4, 2, 3), v=torch.zeros(1, 4, 2, 3), initial_state=None,
                chunk_size=4, eps=1e-12)
    args.update(change)
    for fn in (based_linear_attention, based_linear_attention_reference):
        with pytest.raises(ValueError, match=match):
            fn(args["q"], args["k"], args["v"], chunk_size=args["chunk_size"], initial_state=args["initial_state"],
               eps=args["eps"])


# ----------------------------------------------------------------------------------------------------------------------
# the layer


def test_layer_chunked_equals_its_reference_with_gradients():
    torch.manual_seed(0)
    m = BasedLinearAttention(12, 3, feature_dim=4, chunk_size=5).double()
    ref = BasedLinearAttention(12, 3, feature_dim=4, chunk_size=5, impl="reference").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 13, 12, dtype=F64)
    _, state = m(torch.randn(2, 4, 12, dtype=F64))  # a reachable state: 4 tokens' sums
    state = BasedState(state.kv.detach(), state.k_sum.detach())
    y, st = m(x, state)
    y_r, st_r = ref(x, state)
    assert_close("y", y_r, y, 1e-12)
    assert_close("kv", st_r.kv, st.kv, 1e-12)
    assert_close("k_sum", st_r.k_sum, st.k_sum, 1e-12)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), list(m.parameters()))
    grads_r = torch.autograd.grad((y_r * w).sum(), list(ref.parameters()))
    for (name, _), a, b in zip(m.named_parameters(), grads_r, grads, strict=True):
        assert_close(f"grad {name}", a, b, 1e-10)
    assert m.state_numel() == 3 * (4 + 1) * 21 == st.kv[0].numel() + st.k_sum[0].numel()


def test_config_section_is_read_by_based_only():
    base = dict(variant="based", vocab_size=16, d_model=8, n_layers=1, n_heads=2)
    ids = torch.randint(0, 16, (1, 11))

    def logits(**kw):
        torch.manual_seed(0)
        with torch.no_grad():
            return MnemosLM(MnemosConfig.from_dict({**base, **kw})).double()(ids)[0]

    ref = logits()
    assert variant_reads("based", "based.feature_dim") and not variant_reads("based", "based.chunk_size")
    assert not torch.equal(ref, logits(based={"feature_dim": 3}))
    assert_close("chunk 3", ref, logits(based={"chunk_size": 3}), 1e-12)  # how, not what
    assert not variant_reads("mamba2", "based.feature_dim") and not variant_reads("based", "mamba2.d_state")
    cfg = MnemosConfig.from_dict({**base, "based": {"feature_dim": 4}})
    assert MnemosConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"model\.based\.feature_dim must be >= 1"):
        MnemosConfig(based={"feature_dim": 0})
    with pytest.raises(TypeError, match=r"model\.based must be a BasedConfig or a dict"):
        MnemosConfig(based=16)
