"""Causal depthwise short convolution with an explicit state, so that streaming equals one parallel pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time: ``y_t = sum_{i<K} w_i * x_{t-K+1+i}`` per channel.

    Used after the q/k/v projections of memory layers (Titans §4.4, as in Mamba and DeltaNet). The state is the
    last ``K - 1`` inputs, ``[B, channels, K - 1]`` (zeros at the start of a stream).
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv1d's default

    def init_state(self, batch: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch, self.channels, self.kernel_size - 1, device=device, dtype=dtype)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x ``[B, T, channels]`` -> ``(y [B, T, channels], state [B, channels, K-1])``."""
        B, T, Ch = x.shape
        if Ch != self.channels:
            raise ValueError(f"x must have {self.channels} channels, got shape {tuple(x.shape)}")
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        elif tuple(state.shape) != (B, Ch, self.kernel_size - 1):
            raise ValueError(f"conv state must be {(B, Ch, self.kernel_size - 1)}, got {tuple(state.shape)}")
        xt = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, Ch, K-1+T]
        y = F.conv1d(xt, self.weight.to(x.dtype), groups=Ch)  # [B, Ch, T]
        # clone: a view would keep the whole call's input alive for as long as the state lives
        return y.transpose(1, 2), xt[..., xt.shape[-1] - (self.kernel_size - 1):].clone()
