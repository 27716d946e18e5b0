import doctest
import hashlib

import numpy as np
import pytest
import torch

import mnemos.data.mqar as mqar_module
from mnemos.data import IGNORE_INDEX, MQAR_EXTRAPOLATION_GRID, MQAR_ZOOLOGY_GRID, MQARConfig, mqar_grid
from mnemos.eval.harness import config_from_dict, config_to_dict


def test_docstring_worked_example_is_true():
    result = doctest.testmod(mqar_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


def _scan(inputs_row, labels_row, K):
    """An independent reading of one sample: the key -> value dict from the first 2K tokens, and the queries."""
    row, lab = inputs_row.tolist(), labels_row.tolist()
    table = {row[2 * i]: row[2 * i + 1] for i in range(K)}
    scored = [(t, row[t], lab[t]) for t in range(len(row)) if lab[t] != IGNORE_INDEX]
    return table, scored


@pytest.mark.parametrize("noise", ["zoology", "disjoint", "values"])
@pytest.mark.parametrize("L,K", [(64, 4), (128, 8), (96, 24), (33, 8)])
def test_labels_point_at_the_values_of_queried_keys(L, K, noise):
    V = 512
    inputs, labels = MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=64, noise=noise).build(seed=3)
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
        repeats = sum(tok in table for tok in inputs[n, 2 * K :].tolist()) - K  # keys in the noise, unscored
        assert repeats == 0 if noise != "zoology" else repeats >= 0


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


# -- noise: as Zoology draws it, or disjoint from the keys -------------------------------------------------------------

def _zoology_reference(V, L, K, N, seed, power_a=0.01):
    """Zoology's ``multiquery_ar`` (zoology/data/multiquery_ar.py; one pass, ``random_non_queries=True``) re-stated
    one sequence at a time: K distinct keys from [1, V/2), K distinct values from [V/2, V), K distinct gaps g in
    [0, (L - 2K) / 2) drawn in turn with probability ∝ (g + 1)^(a - 1) (``choice(..., replace=False, p=p)``, as
    Zoology calls it), key i asked at position 2K + 2 g_i (label: value i), and every other position after the
    context uniform over [0, V) (Zoology: ``torch.randint(vocab_size)`` wherever the sequence is still 0). A numpy
    Generator stands in for Zoology's legacy global sampler: the same distributions, several times faster."""
    rng = np.random.default_rng(seed)
    space = (L - 2 * K) // 2
    p = np.arange(1, space + 1) ** (power_a - 1.0)
    p = p / p.sum()
    inputs = np.zeros((N, L), dtype=np.int64)
    labels = np.full((N, L), IGNORE_INDEX, dtype=np.int64)
    for n in range(N):
        keys = rng.choice(np.arange(1, V // 2), size=K, replace=False)
        values = rng.choice(np.arange(V // 2, V), size=K, replace=False)
        gaps = rng.choice(space, size=K, replace=False, p=p)
        row = inputs[n]
        row[0 : 2 * K : 2], row[1 : 2 * K : 2] = keys, values
        row[2 * K + 2 * gaps] = keys
        labels[n, 2 * K + 2 * gaps] = values
        blank = row == 0  # keys and values are never 0: exactly the non-query positions after the context
        row[blank] = rng.integers(V, size=int(blank.sum()))
    return inputs, labels


def _in_own_row(tokens, sets, V):
    """``[N, M]`` bool: ``tokens[n, m]`` is in ``sets[n]`` (ids < V); row n is shifted by n * V so that one sorted
    array serves all rows."""
    shift = np.arange(len(tokens))[:, None] * V
    table, query = (np.sort(sets, axis=1) + shift).ravel(), tokens + shift
    at = np.minimum(np.searchsorted(table, query), table.size - 1)
    return table[at] == query


def _noise_stats(inputs, labels, V, K):
    """Per sequence: whether its noise repeats one of its keys; per position after the context, the share of
    sequences where it is a scored query, noise equal to an own key, to an own value, noise in the key range."""
    tail, scored = inputs[:, 2 * K :], labels[:, 2 * K :] != IGNORE_INDEX
    noise = ~scored
    is_key, is_value = _in_own_row(tail, inputs[:, 0 : 2 * K : 2], V), _in_own_row(tail, inputs[:, 1 : 2 * K : 2], V)
    per_position = {
        "query": scored.mean(0),
        "noise_is_own_key": (noise & is_key).mean(0),
        "noise_is_own_value": (noise & is_value).mean(0),
        "noise_in_key_range": (noise & (tail >= 1) & (tail < V // 2)).mean(0),
    }
    return (noise & is_key).any(1), per_position


def _within(a, b, n_a, n_b, sigmas=5.0):
    """Two binomial rates (arrays) agree within ``sigmas`` standard errors of their difference (floor: one event)."""
    pooled = (a * n_a + b * n_b) / (n_a + n_b)
    se = np.sqrt(np.maximum(pooled * (1 - pooled), 1.0 / (n_a + n_b)) * (1 / n_a + 1 / n_b))
    return np.abs(a - b) <= sigmas * se


@pytest.mark.parametrize("L,K,measured", [(64, 4, 0.026), (256, 16, 0.345), (512, 64, 0.926)])
def test_zoology_noise_matches_zoologys_generator(L, K, measured):
    """10k sequences each from mnemos and the re-statement above: the share of sequences whose noise repeats a key
    (also against its closed form 1 - (1 - K/V)^(L - 3K) and the rates measured on Zoology's own code) and, per
    position, the query / repeated-key / repeated-value / key-range rates agree within binomial error."""
    V, N = 8192, 10_000
    ours = [t.numpy() for t in MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=N).build(seed=1)]
    ref = _zoology_reference(V, L, K, N, seed=2)
    (rep_ours, pos_ours), (rep_ref, pos_ref) = _noise_stats(*ours, V, K), _noise_stats(*ref, V, K)
    exact = 1 - (1 - K / V) ** (L - 3 * K)  # L - 3K noise tokens, each one of the K keys with probability K / V
    assert _within(rep_ours.mean(), rep_ref.mean(), N, N), (rep_ours.mean(), rep_ref.mean())
    for rate in (rep_ours.mean(), rep_ref.mean()):
        assert abs(rate - exact) <= 5 * np.sqrt(exact * (1 - exact) / N), (rate, exact)
        assert abs(rate - measured) < 0.025  # the rates issue 12 quotes, measured on Zoology's code: roughly
    for name in pos_ours:
        ok = _within(pos_ours[name], pos_ref[name], N, N)
        assert ok.all(), (name, np.flatnonzero(~ok), pos_ours[name][~ok], pos_ref[name][~ok])


def test_zoology_noise_token_frequencies_match_zoologys_generator():
    """A small vocabulary, so each token's share of the noise is measurable: uniform over all V tokens (0, keys and
    values included) in both generators, per token within binomial error."""
    V, L, K, N = 64, 48, 4, 10_000
    counts = []
    for inputs, labels in (MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=N).build(seed=3),
                           _zoology_reference(V, L, K, N, seed=4)):
        inputs, labels = np.asarray(inputs), np.asarray(labels)
        noise = inputs[:, 2 * K :][np.asarray(labels)[:, 2 * K :] == IGNORE_INDEX]
        assert noise.size == N * (L - 3 * K)
        counts.append(np.bincount(noise, minlength=V) / noise.size)
    n = N * (L - 3 * K)
    assert _within(counts[0], counts[1], n, n).all()
    assert _within(counts[0], np.full(V, 1 / V), n, n).all()


def test_noise_modes_share_context_queries_and_labels():
    """Same seed: only the noise differs. Zoology's noise repeats keys (unscored); disjoint's never does."""
    V, L, K = 256, 128, 8
    zi, zl = MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=200).build(seed=5)
    di, dl = MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=200, noise="disjoint").build(seed=5)
    assert torch.equal(zl, dl)
    scored = zl != IGNORE_INDEX
    assert torch.equal(zi[:, : 2 * K], di[:, : 2 * K]) and torch.equal(zi[scored], di[scored])
    assert not torch.equal(zi, di)
    keys = zi[:, 0 : 2 * K : 2]
    repeats = (zi[:, 2 * K :, None] == keys[:, None, :]).any(-1) & ~scored[:, 2 * K :]  # [N, L - 2K]
    assert repeats.any(1).float().mean() > 0.8  # 1 - (1 - 8/256)^104 ≈ 0.96 of the sequences
    assert not ((di[:, 2 * K :, None] == keys[:, None, :]).any(-1) & ~scored[:, 2 * K :]).any()


def test_values_noise_holds_no_key_id_and_shares_everything_else():
    """``noise="values"``: after the context every token but the planted queries is a value id, uniform over them;
    the context, the queries and the labels are the disjoint mode's for the same seed."""
    V, L, K, N = 128, 1024, 8, 300
    vi, vl = MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=N, noise="values").build(seed=7)
    di, dl = MQARConfig(vocab_size=V, seq_len=L, num_kv_pairs=K, num_examples=N, noise="disjoint").build(seed=7)
    scored = vl != IGNORE_INDEX
    assert torch.equal(vl, dl) and torch.equal(vi[:, : 2 * K], di[:, : 2 * K]) and torch.equal(vi[scored], di[scored])
    noise = vi[:, 2 * K :][~scored[:, 2 * K :]]
    assert int(noise.min()) >= V // 2 and int(noise.max()) < V  # no key id, no blank
    assert ((di[:, 2 * K :][~scored[:, 2 * K :]]) < V // 2).float().mean() > 0.4  # disjoint's noise has them
    counts = np.bincount(noise.numpy() - V // 2, minlength=V // 2) / noise.numel()
    assert _within(counts, np.full(V // 2, 2 / V), noise.numel(), noise.numel()).all()  # uniform over the values
    # a key id follows the context only as a planted query
    after = vi[:, 2 * K :]
    assert torch.equal(after < V // 2, scored[:, 2 * K :])
    # a diagnostic for evals, not a training task
    from mnemos.train.config import TaskConfig

    with pytest.raises(ValueError, match=r"task.noise must be one of \('zoology', 'disjoint'\), got 'values'"):
        TaskConfig(kind="mqar", noise="values")


def test_disjoint_noise_is_unchanged():
    """``noise="disjoint"`` is bit for bit the generator before ``noise`` existed (outputs recorded then)."""
    inputs, labels = MQARConfig(vocab_size=32, seq_len=20, num_kv_pairs=3, num_examples=2,
                                noise="disjoint").build(seed=5)
    assert inputs.tolist() == [[12, 25, 9, 19, 1, 21, 9, 22, 12, 28, 1, 7, 18, 28, 28, 28, 10, 0, 25, 23],
                               [9, 31, 7, 30, 5, 16, 5, 0, 1, 17, 9, 15, 30, 6, 18, 12, 11, 26, 7, 12]]
    I = IGNORE_INDEX
    assert labels.tolist() == [[I, I, I, I, I, I, 19, I, 25, I, 21, I, I, I, I, I, I, I, I, I],
                               [I, I, I, I, I, I, 16, I, I, I, 31, I, I, I, I, I, I, I, 30, I]]
    inputs, labels = MQARConfig(vocab_size=8192, seq_len=256, num_kv_pairs=16, num_examples=50,
                                noise="disjoint").build(seed=1)
    digest = hashlib.sha256(inputs.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    assert digest == "802af10ea38f07891ee0d337b22666634188e4c2879f595739bf0aceec45f62b"


@pytest.mark.parametrize("noise", ["Zoology", "uniform", "", None, 1])
def test_bad_noise_names_the_field_and_choices(noise):
    with pytest.raises(ValueError, match=r"noise must be one of 'zoology', 'disjoint', 'values'"):
        MQARConfig(noise=noise)


def test_zoology_noise_needs_vocab_above_seq_len():
    with pytest.raises(ValueError, match=r"noise='zoology' needs vocab_size > seq_len.*vocab_size=64, seq_len=64"):
        MQARConfig(vocab_size=64, seq_len=64, num_kv_pairs=4)
    MQARConfig(vocab_size=65, seq_len=64, num_kv_pairs=4)
    inputs, _ = MQARConfig(vocab_size=32, seq_len=64, num_kv_pairs=4, num_examples=2, noise="disjoint").build(0)
    assert inputs.shape == (2, 64)


def test_noise_reaches_the_grid_and_the_recorded_config():
    assert {c.noise for c in mqar_grid()} == {"zoology"}
    assert {c.noise for c in mqar_grid(MQAR_EXTRAPOLATION_GRID, noise="disjoint")} == {"disjoint"}
    cfg = MQARConfig(vocab_size=256, seq_len=64, noise="disjoint")
    d = config_to_dict(cfg)
    assert d["noise"] == "disjoint" and config_from_dict(d) == cfg
