"""What the model tests share: random token ids and a max-error check with a readable message."""

from __future__ import annotations

import torch


def random_ids(vocab: int, B: int, T: int, seed: int = 1) -> torch.Tensor:
    """``[B, T]`` token ids in ``[0, vocab)`` from a generator seeded by ``seed``."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float = 1e-10) -> None:
    """Same shape and ``max |ref - out| <= tol``, the error named in the message."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (ref - out).abs().max().item()
    assert err <= tol, f"{name}: max |ref - out| = {err:.3e} > {tol:.0e}"


def check_training_resumes_bit_exactly(tmp_path, model_args: list[str], changed: str, key: str) -> None:
    """3 steps of a tiny MQAR training of ``model_args`` (``model.*`` overrides) in one run equal 2 steps, a stop and
    a resume, loss for loss; resuming with the override ``changed`` (a field the model reads) is refused naming
    ``key``."""
    import re

    import pytest

    from mnemos.train.config import load_config
    from mnemos.train.loop import train

    args = model_args + [
        "model.n_layers=2", "model.vocab_size=32", "model.d_model=16", "model.n_heads=2", "model.window=4",
        "task.vocab_size=32", "task.seq_len=16", "task.num_kv_pairs=2", "task.train_examples=32",
        "task.eval_examples=8", "run.batch_size=4", "run.eval_every=1000", "run.progress=false", "run.steps=3",
        "optim.lr=1e-2", "optim.warmup_steps=0"]
    full = train(load_config(None, args + [f"run.out_dir={tmp_path / 'full'}"]))
    cut = args + [f"run.out_dir={tmp_path / 'cut'}"]
    first = train(load_config(None, cut + ["run.stop_after=2"]))
    rest = train(load_config(None, cut), resume=True)
    assert first.train_losses + rest.train_losses == full.train_losses
    with pytest.raises(ValueError, match=re.escape(key)):  # the model reads it: a different model
        train(load_config(None, cut + [changed]), resume=True)
