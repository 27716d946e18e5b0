"""Checkpoints round-trip exactly, restore every RNG, and fail loudly on corrupt or mismatched files."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from mnemos.checkpoint import CheckpointError
from mnemos.train.checkpoint import load_checkpoint, save_checkpoint


class Tiny(nn.Module):
    def __init__(self, width=5, tied=True):
        super().__init__()
        self.emb = nn.Embedding(7, width)
        self.head = nn.Linear(width, 7, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


def _trained(seed=0):
    torch.manual_seed(seed)
    m = Tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        m(torch.tensor([1, 2, 3])).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return m, opt, sched


def test_round_trip_model_optimizer_scheduler_rng(tmp_path):
    m, opt, sched = _trained()
    random.random(), np.random.rand(), np.random.randn(), torch.rand(1)
    save_checkpoint(tmp_path / "ck", m, step=3, optimizer=opt, scheduler=sched, best_metric=0.5, config={"a": 1})
    after = (random.random(), np.random.randn(), torch.rand(2))

    m2 = Tiny()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    state = load_checkpoint(tmp_path / "ck", m2, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 3 and state["best_metric"] == 0.5 and state["config"] == {"a": 1}
    again = (random.random(), np.random.randn(), torch.rand(2))
    assert again[:2] == after[:2] and torch.equal(again[2], after[2])
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert m2.head.weight is m2.emb.weight  # tying survives
    assert sched2.last_epoch == sched.last_epoch
    # identical next optimizer step
    for mm, oo in ((m, opt), (m2, opt2)):
        mm(torch.tensor([4, 5])).sum().backward()
        oo.step()
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_overwrite_is_atomic_and_complete(tmp_path):
    m, opt, _ = _trained()
    save_checkpoint(tmp_path / "ck", m, step=1)
    save_checkpoint(tmp_path / "ck", m, step=2)
    assert load_checkpoint(tmp_path / "ck", Tiny())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    m, _, _ = _trained()
    save_checkpoint(tmp_path / "ck", m, step=1)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path / "ck", Tiny(width=6))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "ck", _with_extra())
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck", Tiny())
    save_checkpoint(tmp_path / "ck2", m, step=1)
    (tmp_path / "ck2" / "trainer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck2", Tiny())
    with pytest.raises(CheckpointError, match="not a mnemos checkpoint"):
        load_checkpoint(tmp_path / "nowhere", Tiny())


def _with_extra():
    t = Tiny()
    t.extra = nn.Linear(2, 2)
    return t
