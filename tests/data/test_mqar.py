import doctest

import pytest
import torch

import mnemos.data.mqar as mqar_module
from mnemos.data import IGNORE_INDEX, MQAR_EXTRAPOLATION_GRID, MQAR_ZOOLOGY_GRID, MQARConfig, mqar_grid


def test_docstring_worked_example_is_true():
    result = doctest.testmod(mqar_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


def _scan(inputs_row, labels_row, K):
    """An independent reading of one sample: the key -> value dict from the first 2K tokens, and the queries."""
    row, lab = inputs_row.tolist(), labels_row.tolist()
    table = {row[2 * i]: row[2 * i + 1] for i in range(K)}
    scored = [(t, row[t], lab[t]) for t in range(len(row)) if lab[t] != IGNORE_INDEX]
    return table, scored


@pytest.mark.parametrize("L,K", [(64, 4), (128, 8), (96, 24), (33, 8)])
def test_labels_point_at_the_values_of_queried_keys(L, K):
    V = 512
    inputs, labels = MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=64).build(seed=3)
    assert inputs.shape == labels.shape == (64, L)
    assert inputs.dtype == labels.dtype == torch.int64
    assert int(inputs.min()) >= 0 and int(inputs.max()) < V
    for n in range(64):
        table, scored = _scan(inputs[n], labels[n], K)
        assert len(table) == K  # keys are distinct
        assert all(1 <= k < V // 2 for k in table) and all(V // 2 <= v < V for v in table.values())
        assert sorted(key for _, key, _ in scored) == sorted(table)  # every key is queried exactly once
        for t, key, label in scored:
            assert t >= 2 * K and (t - 2 * K) % 2 == 0  # query slots follow the context at even offsets
            assert table[key] == label
        tail = inputs[n, 2 * K :].tolist()
        assert sum(tok in table for tok in tail) == K  # noise never repeats a key: no unscored queries


def test_blank_non_queries_are_zero():
    inputs, labels = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=8,
                                random_non_queries=False).build(seed=0)
    tail = inputs[:, 8:]
    assert torch.equal(tail == 0, labels[:, 8:] == IGNORE_INDEX)


def test_seed_determinism():
    cfg = MQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=4, num_examples=16)
    a, b = cfg.build(seed=7), cfg.build(seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = cfg.build(seed=8)
    assert not torch.equal(a[0], c[0])


def test_power_law_puts_queries_early():
    def mean_slot(power_a):
        K, L = 16, 256
        _, labels = MQARConfig(seq_len=L, num_kv_pairs=K, num_examples=400, power_a=power_a).build(seed=0)
        pos = (labels != IGNORE_INDEX).nonzero()[:, 1].float()
        return ((pos - 2 * K) / 2).mean().item()

    uniform = mean_slot(1.0)  # slots 0..111 uniformly without replacement: mean ~55.5
    assert abs(uniform - 55.5) < 3
    assert mean_slot(0.01) < uniform - 10


def test_grids_build():
    assert [(c.seq_len, c.num_kv_pairs, c.vocab_size) for c in mqar_grid()] == [
        (64, 4, 8192), (128, 8, 8192), (256, 16, 8192)]
    assert MQAR_ZOOLOGY_GRID == ((64, 4), (128, 8), (256, 16))
    assert max(MQAR_EXTRAPOLATION_GRID) == (1024, 256)
    for cfg in mqar_grid(MQAR_EXTRAPOLATION_GRID, num_examples=2):
        inputs, labels = cfg.build(seed=0)
        assert inputs.shape == (2, cfg.seq_len)
        assert int((labels != IGNORE_INDEX).sum()) == 2 * cfg.num_kv_pairs


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(seq_len=15, num_kv_pairs=4), "seq_len"),
        (dict(vocab_size=8, num_kv_pairs=4, seq_len=64), "vocab_size"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(num_examples=0), "num_examples"),
        (dict(power_a=0.0), "power_a"),
        (dict(power_a=-1.0), "power_a"),
        (dict(random_non_queries=1), "random_non_queries"),
        (dict(seq_len=64.0), "seq_len"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MQARConfig(**kwargs)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        MQARConfig(num_examples=1).build(seed=-1)
