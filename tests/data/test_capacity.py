import re

import pytest

from mnemos.data import PasskeyCapacityConfig, longest_length_at


def test_passkey_sweep_has_exact_lengths_and_stratified_depths():
    n = 8
    by_length = PasskeyCapacityConfig(lengths=(512, 2048), samples_per_length=n).build(seed=0)
    assert list(by_length) == [512, 2048]
    for length, samples in by_length.items():
        assert len(samples) == n
        for i, s in enumerate(samples):
            assert s.kind == "passkey" and s.input_ids.shape == (length,)
            assert i / n <= s.depth <= (i + 1) / n
            text = bytes(s.input_ids.tolist()).decode()
            (value,) = set(re.findall(r"\d+", text))
            assert value == s.answer
        assert len({s.answer for s in samples}) > 1


def test_seed_determinism():
    cfg = PasskeyCapacityConfig(lengths=(600,), samples_per_length=3)
    a, b, c = cfg.build(seed=4), cfg.build(seed=4), cfg.build(seed=5)
    assert [s.prompt for s in a[600]] == [s.prompt for s in b[600]]
    assert [s.prompt for s in a[600]] != [s.prompt for s in c[600]]


def test_longest_length_at():
    assert longest_length_at({1024: 1.0, 2048: 0.97, 4096: 0.6, 8192: 0.96}) == 2048
    assert longest_length_at({4096: 0.95, 1024: 1.0}) == 4096  # order of the mapping does not matter
    assert longest_length_at({1024: 0.5, 2048: 1.0}) is None
    assert longest_length_at({1024: 0.8, 2048: 0.7}, threshold=0.75) == 1024
    with pytest.raises(ValueError, match="threshold"):
        longest_length_at({1024: 1.0}, threshold=0.0)
    with pytest.raises(ValueError, match="acc_by_length"):
        longest_length_at({})
    with pytest.raises(ValueError, match=r"acc_by_length\[2048\]"):
        longest_length_at({1024: 0.1, 2048: 95.0})


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lengths=(64,)), "lengths"),
        (dict(lengths=()), "lengths"),
        (dict(samples_per_length=0), "samples_per_length"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PasskeyCapacityConfig(**kwargs)
