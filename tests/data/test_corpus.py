import re

import pytest

from mnemos.data import builtin_corpus, filler_text, load_text


def test_builtin_corpus_is_ascii_prose():
    text = builtin_corpus()
    assert text is builtin_corpus()  # cached
    assert len(text) > 300_000
    assert text.isascii()
    assert text.startswith("The Zen of Python, by Tim Peters\nBeautiful is better than ugly.\n")
    lines = text.splitlines()
    assert len(lines) == len(set(lines))  # deduplicated
    assert not any(">>>" in line for line in lines)
    prose = sum(len(re.findall(r"[A-Za-z ]", line)) for line in lines)
    assert prose > 0.9 * len(text)


@pytest.mark.parametrize("n", [3, 17, 100, 4096])
def test_filler_text_has_exact_length_and_word_edges(n):
    for seed in range(5):
        s = filler_text(n, seed=seed)
        assert len(s.encode("utf-8")) == n
        assert s[-1].isspace() and not s[0].isspace()
        assert s == filler_text(n, seed=seed)
    assert len({filler_text(n, seed=seed) for seed in range(5)}) > 1


def test_filler_text_wraps_around_a_small_multibyte_corpus():
    corpus = "Ünïcode wörds here. Ça va très bien, merci.\nAnd 日本語 too. "
    for n in [5, 40, 1000]:  # 1000 is longer than the corpus: it repeats
        s = filler_text(n, seed=1, corpus=corpus)
        assert len(s.encode("utf-8")) == n
        assert s[-1].isspace()
        assert all(word in corpus for word in s.split())
    assert filler_text(0, seed=0) == ""


def test_filler_text_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_tokens"):
        filler_text(-1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        filler_text(10, seed=-3)
    with pytest.raises(ValueError, match="n_tokens=1"):
        filler_text(1, seed=0, corpus="abc def ")  # a 1-byte span cannot start at a word and end on a space
    with pytest.raises(ValueError, match="empty"):
        filler_text(4, seed=0, corpus="   ")


def test_load_text_reads_files_and_directories(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zeta", encoding="utf-8")
    (tmp_path / "b" / "a.md").write_text("alpha ü", encoding="utf-8")
    (tmp_path / "b" / "skip.py").write_text("code", encoding="utf-8")
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "b" / "deep" / "c.txt").write_text("gamma", encoding="utf-8")
    single = tmp_path / "single.rst"
    single.write_text("given explicitly", encoding="utf-8")
    assert load_text(tmp_path / "b") == "alpha ü\n\ngamma\n\nzeta"  # recursive, sorted by path, .py skipped
    assert load_text([str(single), tmp_path / "b" / "z.txt"]) == "given explicitly\n\nzeta"
    assert load_text(tmp_path / "b", suffixes=(".py",)) == "code"


def test_load_text_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.txt"):
        load_text(tmp_path / "bin.txt")
    with pytest.raises(ValueError, match="paths"):
        load_text([])
