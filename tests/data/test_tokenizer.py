import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnemos.data import ByteTokenizer, Tokenizer, train_bpe_tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    assert tok.encode_tensor(text).tolist() == ids


def test_byte_tokenizer_specials_and_errors():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    ids = tok.encode("ab", add_bos=True, add_eos=True)
    assert ids == [257, 97, 98, 258]
    assert tok.decode(torch.tensor(ids)) == "ab"
    with pytest.raises(ValueError, match="259"):
        tok.decode([259])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    # a lone continuation byte is not UTF-8: replaced by default, an error when asked
    assert tok.decode([0xA9]) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xA9], errors="strict")


def test_bpe_without_tokenizers_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="tokenizers"):
        train_bpe_tokenizer(["some text"], vocab_size=300)


def test_bpe_vocab_size_is_validated():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["x"], vocab_size=100)


def test_bpe_round_trips_and_is_deterministic(tmp_path):
    pytest.importorskip("tokenizers", reason="optional dependency; the ImportError path is tested above")
    texts = ["The grass is green. The sky is blue.\n"] * 20 + ["héllo wörld 🎉\tand  spaces\n"]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in ["The sky is green.", "  naïve café ∑ 日本\n\n", "unseen: zqxj"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The grass is green.")) < len("The grass is green.")  # merges were learned
    assert train_bpe_tokenizer(texts, vocab_size=300).encode("The grass") == tok.encode("The grass")
    tok.save(str(tmp_path / "bpe.json"))
    assert type(tok).load(str(tmp_path / "bpe.json")).encode("The sky") == tok.encode("The sky")
