"""benchmarks/recall_by_distance.py: the distances and bins behind its table, on constructed MQAR rows."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from recall_by_distance import by_distance, mean_eta, query_distances  # noqa: E402

from mnemos.data import MQARConfig  # noqa: E402


def test_distances_on_a_hand_made_row():
    # pairs 3->9, 5->8 at positions 0..3; queries: 5 at t=5 (key at 2: distance 3), 3 at t=7 (key at 0: distance 7)
    inputs = torch.tensor([[3, 9, 5, 8, 1, 5, 0, 3]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 8, -100, 9]])
    rows, t, dist = query_distances(inputs, labels, 2)
    assert rows.tolist() == [0, 0] and t.tolist() == [5, 7] and dist.tolist() == [3, 7]


def test_distances_agree_with_the_generator():
    """Every query of generated data maps to a key slot holding its token, and the distance is positive."""
    cfg = MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=8, num_examples=50, noise="zoology")
    inputs, labels = cfg.build(3)
    rows, t, dist = query_distances(inputs, labels, 8)
    key_pos = t - dist
    assert bool((dist > 0).all()) and bool((key_pos % 2 == 0).all()) and bool((key_pos < 16).all())
    assert torch.equal(inputs[rows, key_pos], inputs[rows, t])
    assert torch.equal(inputs[rows, key_pos + 1], labels[rows, t])  # the value follows its key


def test_a_non_mqar_row_is_refused():
    inputs = torch.tensor([[3, 9, 5, 8, 1, 7]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 8]])
    with pytest.raises(ValueError, match="none of its row's context keys"):
        query_distances(inputs, labels, 2)


def test_bins_count_every_query_once():
    dist = torch.tensor([1, 2, 2, 4, 9, 100])
    hit = torch.tensor([True, False, True, True, False, True])
    bins = by_distance(hit, dist, [1, 2, 3, 9])
    assert [b["n"] for b in bins] == [1, 2, 1, 2]
    assert [b["accuracy"] for b in bins] == [1.0, 0.5, 1.0, 0.5]
    assert bins[1]["se"] == pytest.approx(math.sqrt(0.25 / 2))
    assert math.isnan(by_distance(hit, dist, [200])[0]["accuracy"])  # an empty bin: nan, not 0


def test_mean_eta_reads_the_last_training_lines(tmp_path):
    lines = [{"step": i, "split": "train", "mem.0.eta_mean": 0.1 * i} for i in range(1, 6)]
    lines.append({"step": 6, "split": "val", "val_accuracy": 0.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(__import__("json").dumps(x) for x in lines))
    assert mean_eta(tmp_path, last=2) == pytest.approx(0.45)
    assert mean_eta(tmp_path / "nowhere") is None


def test_instant_writes_lands_every_write_at_once():
    """The intervention's copy writes with eta = 0 and theta / (1 - eta) of the original's gates, leaves the
    original untouched, and so changes the outputs of a memory model with momentum."""
    from recall_by_distance import instant_writes

    from mnemos.eval.adapters import build_mnemos_model
    from mnemos.layers import NeuralMemory

    torch.manual_seed(0)
    base = build_mnemos_model("lmm", 64, overrides={"d_model": 32, "n_layers": 1, "n_heads": 2})
    probe = instant_writes(base)
    x = torch.randn(2, 9, 32)
    (m0,) = [m for m in base.model.modules() if isinstance(m, NeuralMemory)]
    (m1,) = [m for m in probe.model.modules() if isinstance(m, NeuralMemory)]
    with torch.no_grad():
        _, _, _, theta, _, alpha, _, eta, _ = m0._project(x, None)  # eta: the momentum gate
        _, _, _, theta1, eta1, alpha1, *_ = m1._project(x, None)
    assert bool((eta > 0).any()) and torch.equal(eta1, torch.zeros_like(eta))
    assert torch.allclose(theta1, theta / (1 - eta)) and torch.equal(alpha1, alpha)
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        a, _ = base.forward(ids, base.init_state(2))
        b, _ = probe.forward(ids, probe.init_state(2))
    assert not torch.allclose(a, b)


def test_delta_gates_report_beta_decay_and_retention():
    """On a small untrained Gated DeltaNet with one decay pinned per head, the probe's means and the retention
    exp(sum log a) over the sequence equal what the gates are; a DeltaNet has no decay; a model without delta
    mixers is refused."""
    from recall_by_distance import delta_gates

    from mnemos.models import MnemosConfig, MnemosLM

    torch.manual_seed(0)
    gdn = MnemosLM(MnemosConfig(variant="gated_deltanet", vocab_size=32, d_model=16, n_layers=2, n_heads=2))
    inputs = torch.randint(0, 32, (5, 12))
    for m in gdn.modules():
        if type(m).__name__ == "LinearRecurrence":
            torch.nn.init.zeros_(m.to_decay.weight)  # the decay then depends on the head only: a = exp(-A dt)
    out = delta_gates(gdn, inputs, batch=2)
    assert len(out) == 2 and all(g["kind"] == "gated_deltanet" for g in out)
    mixers = [m for m in gdn.modules() if type(m).__name__ == "LinearRecurrence"]
    for g, m in zip(out, mixers, strict=True):
        a = torch.exp(-m.A_log.exp() * torch.nn.functional.softplus(m.dt_bias)).clamp_min(1e-3).detach()
        assert g["a"] == pytest.approx(a.tolist(), rel=1e-5)
        assert g["retention"] == pytest.approx((a ** 12).tolist(), rel=1e-4)
        assert all(0 < b < 1 for b in g["beta"])
    dn = MnemosLM(MnemosConfig(variant="deltanet", vocab_size=32, d_model=16, n_layers=1, n_heads=2))
    assert delta_gates(dn, inputs)[0]["a"] is None and delta_gates(dn, inputs)[0]["retention"] is None
    with pytest.raises(ValueError, match="no DeltaNet or Gated DeltaNet"):
        delta_gates(MnemosLM(MnemosConfig(variant="transformer", vocab_size=32, d_model=16, n_layers=1, n_heads=2)),
                    inputs)
