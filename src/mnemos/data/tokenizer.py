"""Tokenizers: a byte-level one that needs nothing, and an optional byte-level BPE trained with ``tokenizers``.

Every task generator in :mod:`mnemos.data` measures lengths in :class:`ByteTokenizer` tokens, which are the UTF-8
bytes of the text: ``len(ByteTokenizer().encode(s)) == len(s.encode("utf-8"))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes of the text, then ``pad`` 256, ``bos`` 257, ``eos`` 258.

    ``decode(encode(s)) == s`` for every ``str`` that UTF-8 can encode (all of them except lone surrogates).

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([tok.bos_id, 104, 195, 169, tok.eos_id])
    'hé'
    """

    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    vocab_size: int = 259

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """``text`` -> its UTF-8 bytes as ints, optionally framed by ``bos`` / ``eos``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_tensor(self, text: str) -> Tensor:
        """``text`` -> ``[T] int64`` bytes without a Python list in between (for corpora of many megabytes)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids: Sequence[int] | Tensor, *, errors: str = "replace") -> str:
        """ids -> text. Special ids (pad, bos, eos) are dropped; an id outside ``[0, vocab_size)`` is an error.

        ``errors`` is passed to ``bytes.decode``: the default ``"replace"`` turns byte sequences that are not UTF-8
        (which a model can generate) into U+FFFD; use ``"strict"`` to raise instead.
        """
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


_BPE_SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")


class BPETokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) from the ``tokenizers`` package, with the Tokenizer protocol.

    Build one with :func:`train_bpe_tokenizer`. Ids 0, 1, 2 are ``<|pad|>``, ``<|bos|>``, ``<|eos|>``; those literal
    strings in the input text are read as the special tokens, as Hugging Face tokenizers do.
    """

    def __init__(self, tokenizer):  # tokenizer: tokenizers.Tokenizer (untyped: the package is optional)
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(s) for s in _BPE_SPECIALS)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str) -> None:
        """Write the tokenizer as one JSON file (``tokenizers.Tokenizer.save``)."""
        self._tok.save(path)

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        return cls(tokenizers.Tokenizer.from_file(path))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "BPE tokenizers need the optional 'tokenizers' package (pip install tokenizers); "
            "the byte tokenizer (mnemos.data.ByteTokenizer) needs nothing"
        ) from e
    return tokenizers


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` with ``vocab_size`` ids (3 specials + 256 bytes + merges).

    Deterministic for the same texts and vocab size. Raises ImportError when ``tokenizers`` is not installed.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 259:
        raise ValueError(f"vocab_size must be an int >= 259 (3 specials + 256 bytes), got {vocab_size!r}")
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_BPE_SPECIALS),  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable, so decode round-trips
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return BPETokenizer(tok)
