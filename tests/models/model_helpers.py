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
