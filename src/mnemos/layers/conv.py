"""Causal depthwise short convolution with an explicit state, so that streaming equals one parallel pass."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _CausalDepthwiseConv(torch.autograd.Function):
    """``y[:, t] = sum_i w[:, i] * xt[:, t + i]`` over time-major ``xt = [state; x]`` ``[B, K-1+T, C]``: K shifted
    multiply-adds each way, in the channel-last layout of the projections around it. About 2x faster than
    ``F.conv1d(groups=C)`` forward + backward on a CPU (which also needs the channel-first layout and back)."""

    @staticmethod
    def forward(ctx, xt: Tensor, weight: Tensor) -> Tensor:  # weight [C, K]
        K, T = weight.shape[1], xt.shape[1] - weight.shape[1] + 1
        y = xt[:, K - 1:] * weight[:, K - 1]
        for i in range(K - 1):
            y.addcmul_(xt[:, i: i + T], weight[:, i])
        ctx.save_for_backward(xt, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        xt, weight = ctx.saved_tensors
        K, (B, T, C) = weight.shape[1], dy.shape
        dxt = dw = None
        if ctx.needs_input_grad[0]:
            dxt = torch.zeros_like(xt)
            for i in range(K):
                dxt[:, i: i + T].addcmul_(dy, weight[:, i])
        if ctx.needs_input_grad[1]:
            dw, prod = torch.empty_like(weight), torch.empty_like(dy)
            for i in range(K):
                dw[:, i] = torch.mul(dy, xt[:, i: i + T], out=prod).view(B * T, C).sum(0)
        return dxt, dw


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
        xt = torch.cat([state.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, K-1+T, Ch], time-major
        y = _CausalDepthwiseConv.apply(xt, self.weight[:, 0].to(x.dtype))  # [B, T, Ch]
        # a copy: a view would keep the whole call's input alive for as long as the state lives
        return y, xt[:, xt.shape[1] - (self.kernel_size - 1):].transpose(1, 2).contiguous()


QK_INITS = ("successor", "random")


@torch.no_grad()
def successor_init_(to_qkv: nn.Linear, conv: ShortConvolution, *, copy_q_to_k: bool = True) -> None:
    """The successor init of a ``[q; k; v]`` projection and the short conv after it (``memory.qk_init`` of the neural
    memory, ``model.delta_qk_init`` of the delta-rule baselines): W_k := W_q (``copy_q_to_k``) and +1 on the conv's
    tap of the current token for the q and v channels and of the previous token for the k channels, on top of their
    random init. Then the key computed at token t + 1 starts equal to the query at token t, before any nonlinearity:
    a write stores each token's successor under that token's query. Draws no random numbers. ``to_qkv`` must have
    3 equal row blocks and ``conv`` a kernel of at least 2 taps."""
    rows = to_qkv.weight.shape[0]
    if rows % 3 or conv.weight.shape[0] != rows:
        raise ValueError(f"successor_init_: to_qkv must have 3 equal row blocks matching the conv's channels, got "
                         f"{rows} rows and {conv.weight.shape[0]} channels")
    K = conv.weight.shape[-1]
    if K < 2:
        raise ValueError(f"successor_init_: the key starts on the previous token, so the conv needs >= 2 taps, got {K}")
    inner = rows // 3
    if copy_q_to_k:
        to_qkv.weight[inner:2 * inner] = to_qkv.weight[:inner]
    w = conv.weight  # [3 * inner, 1, K]; tap K - 1 multiplies the current token, K - 2 the one before
    w[:inner, 0, K - 1] += 1.0
    w[inner:2 * inner, 0, K - 2] += 1.0
    w[2 * inner:, 0, K - 1] += 1.0
