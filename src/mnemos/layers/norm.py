"""Normalisations shared by every block: RMSNorm and the gated RMSNorm used on memory outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim (Zhang & Sennrich 2019), computed in float32, learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm over {self.weight.shape[0]} features got input of shape {tuple(x.shape)}")
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * silu(gate)``: the output norm-and-gate of gated linear RNNs (Mamba2, Gated DeltaNet), which
    Titans adopts before the output projection."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        if gate.shape != x.shape:
            raise ValueError(f"gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
        return super().forward(x) * F.silu(gate)
