import pytest
import torch

from mnemos.data import LMDataConfig, builtin_corpus


def test_split_and_windows_come_from_the_corpus():
    data = LMDataConfig(seq_len=64, batch_size=4, val_fraction=0.1).build(seed=0)
    corpus = builtin_corpus()
    assert bytes(torch.cat([data.train, data.val]).tolist()).decode() == corpus
    assert abs(data.val.numel() - 0.1 * len(corpus)) <= 1
    train_text = bytes(data.train.tolist()).decode()
    val_text = bytes(data.val.tolist()).decode()
    for split, text in (("train", train_text), ("val", val_text)):
        batch = next(data.batches(split))
        assert batch.shape == (4, 65) and batch.dtype == torch.int64
        for row in batch:  # each row is a contiguous window of its own split
            assert bytes(row.tolist()).decode() in text


def test_batches_are_deterministic_per_seed_and_split():
    data = LMDataConfig(seq_len=32, batch_size=3).build(seed=1)
    first = [next(it) for it in [data.batches("train")] for _ in range(3)]
    again = [next(it) for it in [data.batches("train")] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
    other = next(LMDataConfig(seq_len=32, batch_size=3).build(seed=2).batches("train"))
    assert not torch.equal(first[0], other)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(data.get_batch("val", g1), data.get_batch("val", g2))
    with pytest.raises(ValueError, match="split"):
        data.get_batch("test", g1)


def test_user_text(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 100, encoding="utf-8")
    data = LMDataConfig(seq_len=16, batch_size=2, paths=(str(tmp_path),), val_fraction=0.5).build()
    assert data.train.numel() + data.val.numel() == 1300
    with pytest.raises(ValueError, match="seq_len"):
        LMDataConfig(seq_len=1000, paths=(str(tmp_path),), val_fraction=0.5).build()


def test_bpe_data():
    pytest.importorskip("tokenizers", reason="optional dependency (BPE tokenizer)")
    data = LMDataConfig(seq_len=32, batch_size=2, tokenizer="bpe", bpe_vocab_size=512).build(seed=0)
    assert data.tokenizer.vocab_size == 512
    assert int(data.train.max()) < 512
    assert data.train.numel() < 0.6 * len(builtin_corpus())  # merges compress the text
    assert next(data.batches("train")).shape == (2, 33)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(seq_len=0), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(tokenizer="wordpiece"), "tokenizer"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(val_fraction=0), "val_fraction"),
        (dict(bpe_vocab_size=10), "bpe_vocab_size"),
        (dict(paths="corpus.txt"), "paths"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LMDataConfig(**kwargs)
