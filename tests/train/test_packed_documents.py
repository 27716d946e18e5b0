"""Packed documents in training (``task.pack_documents``): the corpus' documents keep their tokens, every token
knows its document, targets across a boundary are not scored, and the trainer runs each document of a window from a
fresh state (``MnemosLM(..., document_ids=...)``, whose exactness tests/models/test_padding.py checks)."""

from __future__ import annotations

import pytest
import torch

from mnemos.data import IGNORE_INDEX, LMDataConfig
from mnemos.models import MnemosLM
from mnemos.train.config import load_config
from mnemos.train.loop import TaskData, train

FILES = {"a.txt": "alpha beta gamma delta\n" * 3, "b.txt": "δέλτα — ünïcödé text " * 4, "c.md": "short"}


def _paths(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return (str(tmp_path),)


def test_documents_keep_the_tokens_and_each_token_knows_its_file(tmp_path):
    paths = _paths(tmp_path)
    plain = LMDataConfig(seq_len=8, paths=paths, val_fraction=0.2).build()
    packed = LMDataConfig(seq_len=8, paths=paths, val_fraction=0.2, documents=True).build()
    assert torch.equal(plain.train, packed.train) and torch.equal(plain.val, packed.val)  # byte tokens unchanged
    assert plain.train_docs is None and packed.train_docs.shape == packed.train.shape
    assert packed.val_docs.shape == packed.val.shape
    tokens = torch.cat([packed.train, packed.val])
    docs = torch.cat([packed.train_docs, packed.val_docs])
    assert docs.tolist() == sorted(docs.tolist())  # documents in order, each one contiguous
    texts = [packed.tokenizer.decode(tokens[docs == i].tolist()) for i in range(3)]
    # files in path order, each with the blank line that follows it (the last one without)
    assert texts == [FILES["a.txt"] + "\n\n", FILES["b.txt"] + "\n\n", FILES["c.md"]]
    builtin = LMDataConfig(seq_len=8, documents=True).build()
    first = builtin.train_docs == 0
    assert builtin.tokenizer.decode(builtin.train[first].tolist()).count("\n") == 1  # a paragraph and its newline
    with pytest.raises(ValueError, match="documents must be a bool"):
        LMDataConfig(documents="yes")


def _cfg(tmp_path, *extra):
    return load_config(None, [
        "task.kind=lm", f"task.paths=[{_paths(tmp_path)[0]}]", "task.seq_len=16", "task.val_fraction=0.2",
        "model.variant=gated_deltanet", "model.vocab_size=259", "model.d_model=16", "model.n_layers=1",
        "model.n_heads=2", "run.batch_size=4", "run.steps=2", "run.eval_every=2", "run.progress=false",
        f"run.out_dir={tmp_path / 'run'}", *extra])


def test_batches_mask_the_targets_across_a_boundary(tmp_path):
    packed, plain = TaskData(_cfg(tmp_path, "task.pack_documents=true")), TaskData(_cfg(tmp_path))
    assert plain.document_ids(3, 16, seed=0) is None
    x, y = packed.batch(3, 16, seed=0)
    x0, y0 = plain.batch(3, 16, seed=0)
    d = packed.document_ids(3, 16, seed=0)
    assert torch.equal(x, x0) and d.shape == x.shape  # the same windows
    # the target of position t is token t + 1: ignored exactly where token t + 1 starts another document
    nxt = torch.cat([d[:, 1:], torch.full_like(d[:, :1], -1)], 1)
    last = packed.lm.train_docs[  # the document of each window's target beyond its inputs
        torch.randint(0, packed.lm.train.numel() - 16, (16,), generator=torch.Generator().manual_seed(3))
        [:, None] + 16]
    nxt[:, -1] = last[:, 0]
    assert torch.equal(y == IGNORE_INDEX, nxt != d) and bool((nxt != d).any())
    assert torch.equal(y[y != IGNORE_INDEX], y0[y != IGNORE_INDEX])


def test_the_trainer_reads_each_document_from_a_fresh_state(tmp_path, monkeypatch):
    seen = []
    real = MnemosLM.forward

    def spy(self, input_ids, *args, **kwargs):
        seen.append(kwargs.get("document_ids"))
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(MnemosLM, "forward", spy)
    cfg = _cfg(tmp_path, "task.pack_documents=true")
    r = train(cfg)
    assert len(r.train_losses) == 2 and all(torch.isfinite(torch.tensor(r.train_losses)))
    data = TaskData(cfg)
    assert torch.equal(seen[0], data.document_ids(0, 4, seed=0))  # step 0's forward got its windows' documents
    assert all(s is not None for s in seen)  # training and validation alike
    with pytest.raises(ValueError, match="task.pack_documents=true .* needs task.kind=lm"):
        load_config(None, ["task.pack_documents=true"])
    with pytest.raises(ValueError, match="does not combine with task.doc_windows > 1"):
        _cfg(tmp_path, "task.pack_documents=true", "task.doc_windows=2")
