"""benchmarks/init_probe.py: each probe init changes exactly the parameters it names, by exactly its amount."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import init_probe  # noqa: E402

from mnemos.layers import neural_memory  # noqa: E402
from mnemos.models import MnemosConfig, MnemosLM, baselines  # noqa: E402


@pytest.fixture
def restore(monkeypatch):
    """install() patches the layer classes of the process: put them back after the test."""
    monkeypatch.setattr(neural_memory.NeuralMemory, "reset_parameters", neural_memory.NeuralMemory.reset_parameters)
    monkeypatch.setattr(baselines.LinearRecurrence, "__init__", baselines.LinearRecurrence.__init__)


def _params(variant, qk_init="random"):
    torch.manual_seed(0)
    cfg = MnemosConfig(variant=variant, vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                       memory={"qk_init": qk_init})
    return dict(MnemosLM(cfg).named_parameters())


def test_shift_bumps_the_conv_taps_only(restore):
    before, succ = _params("lmm"), _params("lmm", "successor")
    init_probe.install("shift", None, with_baselines=False)
    after = _params("lmm")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["blocks.0.mixer.memory.conv.weight"]
    bump = (after[changed[0]] - before[changed[0]])[:, 0]  # [3 * 16, K]
    inner = bump.shape[0] // 3
    expected = torch.zeros_like(bump)
    expected[:inner, -1] = expected[2 * inner:, -1] = expected[inner:2 * inner, -2] = 1.0
    torch.testing.assert_close(bump, expected, atol=1e-6, rtol=0)
    # the library's successor init has the same conv (and W_k = W_q as well): the probe's shift is its conv part
    assert torch.equal(succ["blocks.0.mixer.memory.conv.weight"], after["blocks.0.mixer.memory.conv.weight"])


def test_theta_bias_sets_the_write_gate_bias_only(restore):
    before = _params("mag")
    init_probe.install("random", 2.0, with_baselines=False)
    after = _params("mag")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["blocks.0.mixer.memory.to_gates.bias"]
    bias = after[changed[0]]
    assert torch.equal(bias[:2], torch.full((2,), 2.0)) and torch.equal(bias[2:], before[changed[0]][2:])


def test_baselines_get_the_successor_init_only_when_asked(restore):
    """--baselines: successor goes through the library's model.delta_qk_init (the papers' init without it), shift
    through the patch (the conv part alone)."""
    d = {"model": {"variant": "gated_deltanet"}}
    assert init_probe.probe_config(d, "successor", False)["model"] == {"variant": "gated_deltanet",
                                                                      "memory": {"qk_init": "successor"}}
    assert init_probe.probe_config(d, "successor", True)["model"]["delta_qk_init"] == "successor"
    assert init_probe.probe_config(d, "shift", True)["model"]["delta_qk_init"] == "random"
    assert d == {"model": {"variant": "gated_deltanet"}}  # (the caller's dict is left as it was)
    before = _params("gated_deltanet")
    init_probe.install("shift", None, with_baselines=False)
    assert all(torch.equal(v, before[k]) for k, v in _params("gated_deltanet").items())
    init_probe.install("shift", None, with_baselines=True)
    after = _params("gated_deltanet")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["blocks.0.mixer.conv.weight"]
