"""Gate floors (``memory.write_floor``, ``memory.forget_floor``): theta and alpha as ``relu(sigmoid(z) - f) / (1 - f)``.

What must hold: floor 0 is today's sigmoid bit for bit (saved models unchanged); a floored gate is exactly 0 below its
floor, with no gradient there, and the affine map of the sigmoid above it; a token whose write gate is 0 leaves the
memory exactly as it was (over a long stream, too: the property the floors exist for); the layer still streams
exactly; bad floors and a forgetting gate that would start dead are errors naming the key.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnemos.layers import MemorySettings, NeuralMemory
from mnemos.layers.neural_memory import floored_sigmoid
from mnemos.models import MnemosConfig, MnemosLM, saved_model_config

F64 = torch.float64


def test_floor_zero_is_the_sigmoid_bit_for_bit():
    z = torch.randn(1000, dtype=F64) * 6
    assert torch.equal(floored_sigmoid(z, 0.0), torch.sigmoid(z))


@pytest.mark.parametrize("floor", [1e-4, 0.05, 0.3])
def test_a_floored_gate_is_zero_below_its_floor_and_affine_in_the_sigmoid_above(floor):
    z = torch.linspace(-20, 20, 4001, dtype=F64, requires_grad=True)
    g = floored_sigmoid(z, floor)
    s = torch.sigmoid(z.detach())
    below = s <= floor
    assert below.any() and (~below).any()
    assert torch.equal(g[below].detach(), torch.zeros_like(g[below]))
    torch.testing.assert_close(g[~below].detach(), (s[~below] - floor) / (1 - floor), rtol=1e-14, atol=0)
    assert 0 <= g.min() and g.max() <= 1
    g.sum().backward()
    assert torch.equal(z.grad[below], torch.zeros_like(z.grad[below]))  # no gradient where the gate is closed
    assert (z.grad[~below] > 0).all()


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = NeuralMemory(8, 2, chunk_size=3, **kw).double()
    with torch.no_grad():  # gates spread widely, so that some tokens sit below the floor and some above
        layer.to_gates.weight.mul_(40)
    return layer


def test_the_layer_floors_theta_and_alpha():
    x = torch.randn(2, 11, 8, dtype=F64)
    plain, floored = _layer(), _layer(write_floor=0.2, forget_floor=1e-4)
    with torch.no_grad():
        _, _, _, th0, _, al0, _, eta0, _ = plain._project(x, None)  # eta0: the momentum gate
        _, _, _, th1, _, al1, _, eta1, _ = floored._project(x, None)
    assert torch.equal(eta0, eta1)
    s = th0 / (plain.token_lr * (1 - eta0))  # the write gate's sigmoid
    torch.testing.assert_close(th1, plain.token_lr * torch.relu(s - 0.2) / 0.8 * (1 - eta0))
    torch.testing.assert_close(al1, torch.relu(al0 - 1e-4) / (1 - 1e-4))
    assert (th1 == 0).any() and (th1 > 0).any() and (al1 == 0).any()


def test_tokens_with_closed_gates_leave_the_memory_exactly_as_it_was():
    """A stream of tokens whose write and forget gates are both below their floors (momentum off, so nothing is in
    flight) ends with the memory it started from, bit for bit, however long: the floors' whole point."""
    layer = NeuralMemory(8, 2, chunk_size=4, momentum=False, write_floor=0.1, forget_floor=1e-4).double()
    with torch.no_grad():
        layer.to_gates.weight.zero_()
        layer.to_gates.bias.fill_(-12.0)  # sigmoid ~ 6e-6: below both floors, for every token
    start = layer.init_state(1, device="cpu", dtype=F64)
    with torch.no_grad():
        _, end = layer(torch.randn(1, 300, 8, dtype=F64), start)
    for a, b in zip(start.memory.weights, end.memory.weights, strict=True):
        assert torch.equal(a, b)
    # and the same tokens with the plain sigmoid do move it (the test can fail)
    plain = NeuralMemory(8, 2, chunk_size=4, momentum=False).double()
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        _, moved = plain(torch.randn(1, 300, 8, dtype=F64), plain.init_state(1, device="cpu", dtype=F64))
    assert any(not torch.equal(a, b) for a, b in zip(start.memory.weights, moved.memory.weights, strict=True))


def test_a_floored_layer_streams_exactly():
    layer = _layer(write_floor=0.1, forget_floor=1e-4)
    x = torch.randn(2, 13, 8, dtype=F64)
    with torch.no_grad():
        y, _ = layer(x)
        state, parts = None, []
        for a, b in ((0, 5), (5, 6), (6, 13)):
            out, state = layer(x[:, a:b], state)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory,match", [
    ({"write_floor": 1.0}, r"^model.memory.write_floor must be a number in \[0, 1\), got 1.0"),
    ({"write_floor": -0.1}, r"^model.memory.write_floor must be a number in \[0, 1\)"),
    ({"forget_floor": True}, r"^model.memory.forget_floor must be of type float, got True"),
    ({"forget_floor": 1e-3},
     r"^model.memory.forget_floor=0.001 is at or above sigmoid\(model.memory.forget_bias=-8.0\)"),
])
def test_bad_floors_name_the_key(memory, match):
    with pytest.raises(ValueError, match=match):
        MnemosConfig(variant="lmm", memory=memory)


def test_a_live_forgetting_gate_may_have_a_floor_below_its_start():
    cfg = MemorySettings(forget_bias=-6.0, forget_floor=1e-3)  # sigmoid(-6) = 2.5e-3
    assert cfg.forget_floor == 1e-3
    MemorySettings(forget_bias=-1000.0)  # no floor: any finite bias, no overflow in the check


def test_a_config_saved_before_the_floors_builds_the_same_model():
    new = MnemosConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, variant="lmm").to_dict()
    old = {**new, "memory": {k: v for k, v in new["memory"].items() if k not in ("write_floor", "forget_floor")}}
    cfg = MnemosConfig.from_dict(saved_model_config(old))
    assert cfg.memory.write_floor == 0.0 and cfg.memory.forget_floor == 0.0
    assert dataclasses.asdict(cfg.memory) == new["memory"]
    torch.manual_seed(0)
    a = MnemosLM(cfg)
    ids = torch.randint(0, 16, (1, 9))
    with torch.no_grad():
        torch.manual_seed(0)
        assert torch.equal(a(ids)[0], MnemosLM(MnemosConfig.from_dict(new))(ids)[0])
