"""mqar_recall_metrics on predictions built by hand, where every number is known, and against a plain loop."""

import doctest
import math

import pytest
import torch

import mnemos.data.scoring
from mnemos.data import IGNORE_INDEX, MQARConfig, mqar_recall_metrics

X = IGNORE_INDEX


def test_hand_built_predictions():
    # K = 3 pairs 2->10, 5->12, 7->9 (row 0) and 3->14, 6->8, 1->11 (row 1); L = 14, reach 6.
    inputs = torch.tensor([
        [2, 10, 5, 12, 7, 9, 7, 0, 5, 2, 13, 2, 4, 15],  # queries: 7 at t=6 (dist 2), 5 at 8 (dist 6), 2 at 11 (11)
        [3, 14, 6, 8, 1, 11, 0, 6, 3, 1, 15, 3, 4, 6],  # queries: 6 at t=7 (dist 5), 1 at 9 (5), 3 at 11 (11)
    ])
    # row 0, t=9 and row 1, t=8 / t=13 hold a key as noise (Zoology's noise may repeat keys): not queries
    labels = torch.full_like(inputs, X)
    labels[0, [6, 8, 11]] = torch.tensor([9, 12, 10])
    labels[1, [7, 9, 11]] = torch.tensor([8, 11, 14])
    pred = torch.full_like(inputs, 10)  # non-query positions answer 10: never counted
    pred[0, [6, 8, 11]] = torch.tensor([9, 9, 4])  # near right, near wrong (a context value), far wrong (a key)
    pred[1, [7, 9, 11]] = torch.tensor([8, 11, 12])  # near right, near right, far wrong (another row's value)
    m = mqar_recall_metrics(pred, inputs, labels, 3, reach=6, vocab_size=16)
    assert (m["n"], m["correct"], m["accuracy"]) == (6, 3, 0.5)
    assert (m["n_near"], m["near_correct"], m["near_accuracy"]) == (4, 3, 0.75)
    assert (m["n_far"], m["far_correct"], m["far_accuracy"]) == (2, 0, 0.0)
    assert (m["context_values"], m["context_value_rate"]) == (4, 4 / 6)
    assert (m["far_context_values"], m["far_context_value_rate"]) == (0, 0.0)
    assert m["any_value_level"] == 1 / 3 and m["chance"] == 1 / 8 and m["reach"] == 6
    # reach 5 moves row 0's query of 5 (6 back) to far; without a reach there is no split
    m5 = mqar_recall_metrics(pred, inputs, labels, 3, reach=5)
    assert (m5["n_near"], m5["near_correct"], m5["n_far"], m5["far_context_values"]) == (3, 3, 3, 1)
    assert "near_accuracy" not in mqar_recall_metrics(pred, inputs, labels, 3) and "chance" not in m5


def test_a_repeated_key_maps_to_its_first_slot():
    inputs = torch.tensor([[4, 9, 4, 8, 0, 0, 4, 0]])  # key 4 twice: slot 0 (position 0) is its pair
    labels = torch.tensor([[X, X, X, X, X, X, 9, X]])
    m = mqar_recall_metrics(torch.full_like(inputs, 9), inputs, labels, 2, reach=5)
    assert (m["n_near"], m["n_far"], m["accuracy"]) == (0, 1, 1.0) and math.isnan(m["near_accuracy"])


def test_random_context_value_scores_one_over_k():
    """Answering every query with a uniformly drawn value of the sample's own context: context-value rate 1,
    accuracy 1 / K (within 4 standard errors), however far back the pair is."""
    K = 8
    inputs, labels = MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=K, num_examples=500).build(seed=3)
    values = inputs[:, 1 : 2 * K : 2]  # [N, K]
    g = torch.Generator().manual_seed(0)
    pred = values.gather(1, torch.randint(0, K, inputs.shape, generator=g))  # [N, L]
    m = mqar_recall_metrics(pred, inputs, labels, K, reach=10)
    n, p = m["n"], 1 / K
    assert n == 500 * K and m["context_value_rate"] == 1.0 and m["far_context_value_rate"] == 1.0
    assert abs(m["accuracy"] - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert m["any_value_level"] == p and m["n_near"] + m["n_far"] == n and m["n_near"] > 0 and m["n_far"] > 0


def _loop_reference(pred, inputs, labels, K, reach):
    out = {"near": [0, 0], "far": [0, 0], "ctx": 0}
    for r in range(inputs.shape[0]):
        where = {}
        for i in range(K):
            where.setdefault(int(inputs[r, 2 * i]), 2 * i)
        values = {int(v) for v in inputs[r, 1 : 2 * K : 2]}
        for t in (labels[r] != X).nonzero().flatten().tolist():
            bucket = out["near" if t - where[int(inputs[r, t])] <= reach else "far"]
            bucket[0] += int(pred[r, t] == labels[r, t])
            bucket[1] += 1
            out["ctx"] += int(pred[r, t]) in values
    return out


def test_equals_a_plain_loop_on_random_predictions():
    K = 6
    cfg = MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=K, num_examples=60, noise="zoology")
    inputs, labels = cfg.build(seed=1)
    is_key = (inputs[:, 2 * K :, None] == inputs[:, None, 0 : 2 * K : 2]).any(-1)  # [N, L - 2K]
    assert is_key.sum() > (labels != X).sum()  # the noise repeats keys, unscored: queries come from labels
    g = torch.Generator().manual_seed(1)
    choice = torch.randint(0, 3, inputs.shape, generator=g)  # 0: the label, 1: a context value, 2: any token
    ctx = inputs[:, 1 : 2 * K : 2].gather(1, torch.randint(0, K, inputs.shape, generator=g))
    pred = torch.where(choice == 0, labels.clamp_min(0), torch.where(choice == 1, ctx,
                                                                       torch.randint(0, 64, inputs.shape, generator=g)))
    ref = _loop_reference(pred, inputs, labels, K, reach=9)
    m = mqar_recall_metrics(pred, inputs, labels, K, reach=9)
    assert (m["near_correct"], m["n_near"], m["far_correct"], m["n_far"]) == (*ref["near"], *ref["far"])
    assert m["context_values"] == ref["ctx"] and 0 < m["correct"] < m["context_values"] < m["n"]


def test_errors_and_docstring():
    inputs = torch.tensor([[3, 9, 0, 4]])
    labels = torch.tensor([[X, X, X, 9]])
    with pytest.raises(ValueError, match="none of its row's 1 context keys"):
        mqar_recall_metrics(inputs, inputs, labels, 1)
    with pytest.raises(ValueError, match=r"must all be \[N, L\]"):
        mqar_recall_metrics(inputs[:, :3], inputs, labels, 1)
    with pytest.raises(ValueError, match="reach must be"):
        mqar_recall_metrics(inputs, inputs, labels, 1, reach=-1)
    assert doctest.testmod(mnemos.data.scoring).failed == 0
