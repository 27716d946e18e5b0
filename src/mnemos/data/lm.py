"""Language-modelling data: a tokenised corpus split into train / val, served as random windows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from mnemos.data._haystack import check_int
from mnemos.data.corpus import DOCUMENT_SEPARATOR, builtin_corpus, document_spans, load_documents
from mnemos.data.tokenizer import ByteTokenizer, Tokenizer, train_bpe_tokenizer

__all__ = ["LMData", "LMDataConfig", "Split", "TokenizerKind"]

Split = Literal["train", "val"]
TokenizerKind = Literal["byte", "bpe"]


@dataclass(frozen=True)
class LMDataConfig:
    """Next-token data from the built-in corpus (``paths`` empty) or the user's text files / directories.

    The text is cut at character ``round((1 - val_fraction) * len(text))``: the head is train, the tail val (no
    shuffling, so the split is the same every run). ``tokenizer="bpe"`` trains a byte-level BPE of
    ``bpe_vocab_size`` ids on the train part only (needs the optional ``tokenizers`` package).

    ``documents=True`` also records which document each token belongs to (:attr:`LMData.train_docs`): a document is
    a file of ``paths``, or a paragraph (line) of the built-in corpus; the separator after it belongs to it. Each
    document is tokenised on its own (byte tokens are the same as without; BPE tokens may differ at the seams), and
    a document cut by the train / val split is two pieces with one id.
    """

    seq_len: int = 256
    batch_size: int = 16
    paths: tuple[str, ...] = ()
    tokenizer: TokenizerKind = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    documents: bool = False

    def __post_init__(self):
        check_int("seq_len", self.seq_len, 1)
        check_int("batch_size", self.batch_size, 1)
        if not isinstance(self.paths, tuple):
            raise ValueError(f"paths must be a tuple of paths, got {self.paths!r}")
        if self.tokenizer not in get_args(TokenizerKind):
            raise ValueError(f"tokenizer must be one of {get_args(TokenizerKind)}, got {self.tokenizer!r}")
        check_int("bpe_vocab_size", self.bpe_vocab_size, 259)
        if not isinstance(self.documents, bool):
            raise ValueError(f"documents must be a bool, got {self.documents!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, float) \
                or not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be a float in (0, 1), got {self.val_fraction!r}")

    def build(self, seed: int = 0) -> LMData:
        """Read, split and tokenise the text. ``seed`` seeds :meth:`LMData.batches` (the split does not use it)."""
        check_int("seed", seed, 0)
        if self.paths:
            docs = load_documents(self.paths)
            text, sep = DOCUMENT_SEPARATOR.join(docs), len(DOCUMENT_SEPARATOR)
        else:
            text, sep = builtin_corpus(), 1
            docs = text.split("\n")[:-1]  # one paragraph per line, the text ends in a newline
        cut = round((1.0 - self.val_fraction) * len(text))
        train_text, val_text = text[:cut], text[cut:]
        tokenizer: Tokenizer
        if self.tokenizer == "byte":
            tokenizer = ByteTokenizer()
            train, val = tokenizer.encode_tensor(train_text), tokenizer.encode_tensor(val_text)
        else:
            tokenizer = train_bpe_tokenizer(train_text.splitlines(keepends=True), self.bpe_vocab_size)
            train = torch.tensor(tokenizer.encode(train_text), dtype=torch.int64)
            val = torch.tensor(tokenizer.encode(val_text), dtype=torch.int64)
        train_docs = val_docs = None
        if self.documents:
            spans = document_spans((len(d) for d in docs), sep, len(text))
            (train, train_docs), (val, val_docs) = (
                _tokens_by_document(tokenizer, text, spans, lo, hi) for lo, hi in ((0, cut), (cut, len(text))))
        for name, tokens in (("train", train), ("val", val)):
            if tokens.numel() < self.seq_len + 1:
                raise ValueError(
                    f"the {name} split has {tokens.numel()} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                    f"lower seq_len, change val_fraction={self.val_fraction} or give more text"
                )
        return LMData(tokenizer=tokenizer, train=train, val=val, seq_len=self.seq_len,
                      batch_size=self.batch_size, seed=seed, train_docs=train_docs, val_docs=val_docs)


def _tokens_by_document(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]], lo: int, hi: int
                        ) -> tuple[Tensor, Tensor]:
    """The tokens of ``text[lo:hi]``, each document's piece tokenised on its own, and each token's document index."""
    tokens, ids = [], []
    for i, (a, b) in enumerate(spans):
        a, b = max(a, lo), min(b, hi)
        if a < b:
            piece = tokenizer.encode(text[a:b])
            tokens += piece
            ids += [i] * len(piece)
    return torch.tensor(tokens, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64)


@dataclass(frozen=True)
class LMData:
    """Token streams ``train [N_train]`` and ``val [N_val]`` (int64) and the tokenizer that made them; with
    ``LMDataConfig.documents``, each token's document index ``train_docs`` / ``val_docs``."""

    tokenizer: Tokenizer
    train: Tensor
    val: Tensor
    seq_len: int
    batch_size: int
    seed: int
    train_docs: Tensor | None = None  # [N_train] the document of each token (LMDataConfig.documents), else None
    val_docs: Tensor | None = None

    def get_batch(self, split: Split, generator: torch.Generator) -> Tensor:
        """``[B, T + 1] int64`` windows at uniform random starts: inputs ``x[:, :-1]``, targets ``x[:, 1:]``."""
        tokens = self._tokens(split)
        starts = torch.randint(0, tokens.numel() - self.seq_len, (self.batch_size,), generator=generator)  # [B]
        return tokens[starts[:, None] + torch.arange(self.seq_len + 1)]  # [B, T + 1]

    def batches(self, split: Split) -> Iterator[Tensor]:
        """An endless stream of :meth:`get_batch` from a generator seeded by ``(seed, split)``: the same stream for
        the same build seed, and different streams for train and val."""
        self._tokens(split)
        state = np.random.SeedSequence([self.seed, get_args(Split).index(split)]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        while True:
            yield self.get_batch(split, generator)

    def _tokens(self, split: Split) -> Tensor:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
