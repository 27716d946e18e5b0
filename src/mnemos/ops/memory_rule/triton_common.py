"""Pieces the Triton kernels share: activations and their derivatives, dtype and launch settings."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .backends import interpreting

_GELU, _SILU = 0, 1
_L2, _DOT = 0, 1

# ``tl.dot`` input precision for float32 operands on a GPU, for every kernel. "ieee" is exact float32 (CUDA cores);
# "tf32x3" (three TF32 tensor-core products, ~float32 accuracy) or "tf32" (one; ~1e-3 relative) are the faster
# candidates. The environment variable MNEMOS_TRITON_DOT_PRECISION picks one at import (benchmarks/gpu_session.sh
# measures them side by side); the tests' tolerances assume "ieee". The interpreter ignores it.
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
DOT_PRECISION = os.environ.get("MNEMOS_TRITON_DOT_PRECISION", "ieee")
if DOT_PRECISION not in DOT_PRECISIONS:
    raise ValueError(f"MNEMOS_TRITON_DOT_PRECISION must be one of {DOT_PRECISIONS}, got {DOT_PRECISION!r}")

# The depth-2 forward keeps the state at the start of every CHECKPOINT_EVERY-th chunk; its backward rebuilds the
# states in between (one more forward of the state update per chunk) instead of storing all of them: at B4 T4096 H8
# with a 64 x 256 MLP memory, all states are 2 GiB, checkpoints every 16 chunks 128 MiB plus 128 MiB of segment scratch.
CHECKPOINT_EVERY = 16

# Tests set this to fill every buffer a launcher allocates with NaN, so that an element a kernel forgets to write (or
# reads before writing) shows up in the results instead of passing by luck.
POISON_BUFFERS = False


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs and scratch (NaN-filled while ``POISON_BUFFERS`` is set)."""
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def act(x, ACT: tl.constexpr):
    """The memory's hidden activation: GELU (erf form) or SiLU."""
    if ACT == 0:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        return x * tl.sigmoid(x)


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    else:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))


@triton.jit
def act_grad2(x, ACT: tl.constexpr):
    if ACT == 0:
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return pdf * (2.0 - x * x)
    else:
        s = tl.sigmoid(x)
        return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


def acc_dtype(dtype: torch.dtype):
    """Triton dtype of the state and every accumulation for a compute dtype (float32, or float64 when interpreted)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_opts(activation: str, loss: str, acc: torch.dtype, hidden: int) -> dict:
    """Constexpr settings shared by the launches. BLOCK_H: hidden units per tile (32 keeps a tile's state, its
    gradient and their products in registers on an H100; an untuned choice, see docs/PERFORMANCE.md)."""
    opts = dict(
        ACT=_GELU if activation == "gelu" else _SILU,
        LOSS=_L2 if loss == "l2" else _DOT,
        ACC=acc_dtype(acc),
        PREC=DOT_PRECISION,
        BLOCK_H=min(hidden, 32),
    )
    if not interpreting():
        opts["num_warps"] = 8  # fewest spills at the GPU shape (benchmarks/compile_kernels.py)
    return opts
