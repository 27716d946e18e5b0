"""Comparison helpers for tests: relative-RMSE checks that name the tensor that failed."""

from __future__ import annotations

import torch
from torch import Tensor


def rel_rmse(ref: Tensor, fast: Tensor) -> float:
    """RMSE(ref - fast) / RMS(ref), computed in float64 on the CPU (0 when both are exactly zero); the two may live on
    different devices (a CPU reference against a GPU kernel)."""
    ref, fast = ref.detach().double().cpu(), fast.detach().double().cpu()
    err = (ref - fast).pow(2).mean().sqrt()
    scale = ref.pow(2).mean().sqrt()
    if scale == 0:
        return float(err)
    return float(err / scale)


def assert_close(name: str, ref: Tensor, fast: Tensor, ratio: float) -> None:
    """Fail unless fast matches ref in shape, is finite, and ``rel_rmse(ref, fast) <= ratio``."""
    if ref.shape != fast.shape:
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref.shape)}")
    if not bool(torch.isfinite(fast).all()):
        raise AssertionError(f"{name}: non-finite values (NaN or inf) in the fast result")
    r = rel_rmse(ref, fast)
    if not r <= ratio:
        raise AssertionError(f"{name}: relative RMSE {r:.3e} > {ratio:.1e}")
