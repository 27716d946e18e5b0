"""Properties every task generator shares: seed determinism, and docstring examples that are true."""

import doctest
import importlib

import pytest
import torch

from mnemos.data import BABILongConfig, MQARConfig, NIAHConfig, PasskeyCapacityConfig

CONFIGS = {
    "mqar": MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=8, num_examples=8),
    "niah-passkey": NIAHConfig(kind="passkey", lengths=(512,), depths=(0.2, 0.8), samples_per_cell=2),
    "niah-number": NIAHConfig(kind="number", lengths=(512,), depths=(0.2, 0.8), samples_per_cell=2),
    "niah-uuid": NIAHConfig(kind="uuid", lengths=(512,), depths=(0.2, 0.8), samples_per_cell=2),
    "babilong-qa1": BABILongConfig(task="qa1", lengths=(800,), samples_per_length=3),
    "babilong-qa2": BABILongConfig(task="qa2", lengths=(800,), samples_per_length=3),
    "babilong-qa3": BABILongConfig(task="qa3", lengths=(1024,), samples_per_length=3),
    "capacity": PasskeyCapacityConfig(lengths=(512,), samples_per_length=3),
}


def _flatten(data):
    """The token ids of a build, as one list of tensors."""
    if isinstance(data, tuple):  # MQAR
        return list(data)
    if isinstance(data, dict):  # capacity
        return [s.input_ids for samples in data.values() for s in samples]
    return [s.input_ids for s in data]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_same_data_other_seed_other_data(name):
    cfg = CONFIGS[name]
    a, b, c = _flatten(cfg.build(seed=0)), _flatten(cfg.build(seed=0)), _flatten(cfg.build(seed=1))
    assert len(a) == len(b) == len(c)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_negative_seed_is_rejected(name):
    with pytest.raises(ValueError, match="seed"):
        CONFIGS[name].build(seed=-1)


@pytest.mark.parametrize(
    "module", ["tokenizer", "corpus", "mqar", "niah", "babilong", "capacity", "scoring"]
)
def test_docstring_examples(module):
    mod = importlib.import_module(f"mnemos.data.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
