"""Mamba-2 (Dao & Gu 2024, arXiv 2405.21060) as a mixer: the selective SSM of :func:`mnemos.ops.ssd` in the block
skeleton, ``forward(x [B, T, d], state=None) -> (y, state)``.

The layer (``mamba_ssm.modules.mamba2.Mamba2``; /work/shared/specs/recurrent-baselines.md §1)::

    [z | xBC | dt] = in_proj(x)                    z [d_inner], xBC [d_inner + 2 N], dt [H]   (no bias)
    xBC   = silu(conv(xBC) + b_conv)               causal depthwise conv of width conv_size over x, B and C
    x, B, C = split(xBC)                           x [H, P]; B, C [N], one group shared by every head
    dt    = softplus(dt + dt_bias)                 Δ >= 0 per token and head
    A     = -exp(A_log)                            one decay rate per head; a_t = exp(Δ_t A) in (0, 1]
    y     = SSD(x, Δ, A, B, C) + D x               S_t = a_t S_{t-1} + Δ_t x_t B_t^T, y_t = S_t C_t (+ the D skip)
    out   = out_proj(RMSNorm(y * silu(z)))         the gate before the norm (Mamba-2's norm_before_gate=False)

Sizes: ``d_inner = expand * d_model``; the heads are the model's ``n_heads`` (so the head dim is
``P = d_inner / n_heads``; Mamba-2 fixes P = 64 and derives H instead: the same layer with a different split);
N = ``d_state``. Choices where mnemos departs from the reference code, each exact for what it computes: one group of
B/C (Mamba-2's default ``ngroups=1``; :func:`~mnemos.ops.ssd` takes any G), no ``dt_limit`` clamp (the default
``(0, inf)``), the conv's bias added after :class:`~mnemos.layers.ShortConvolution` (which has none), and the norm's
epsilon the model's ``norm_eps``.

Init as the reference: ``A_log = log U[1, 16]``; Δ's bias the inverse softplus of ``exp(U[ln 1e-3, ln 1e-1])``
(floored at 1e-4); ``D = 1``.

State (:class:`~mnemos.models.cache.Mamba2State`): the conv's last ``conv_size - 1`` raw xBC rows and the SSM state
``[B, H, P, N]``: ``d_inner * N + (d_inner + 2 N) (conv_size - 1)`` numbers per layer and sequence. The Stuffed
Mamba law's N_S counts the SSM part, ``H P N = d_inner N`` per layer, summed over layers (docs/MODELS.md).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import RMSNorm, ShortConvolution
from ..ops.memory_rule.common import compute_dtype
from ..ops.ssd import ssd, ssd_reference
from .cache import Mamba2State

__all__ = ["Mamba2Mixer"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Mamba2Mixer(nn.Module):
    """Mamba-2's layer (see the module docstring): ``forward(x [B, T, dim], state=None) -> (y [B, T, dim], state)``.

    Args:
        dim: model width d. heads: H, which must divide ``expand * dim``.
        d_state: N, the state size per head dim. expand: ``d_inner = expand * dim``.
        conv_size: width of the causal conv over x, B and C.
        chunk_size: tokens per chunk of :func:`~mnemos.ops.ssd` (exact for any value).
        norm_eps: epsilon of the output RMSNorm.
        impl: ``"chunked"`` (:func:`~mnemos.ops.ssd`) or ``"reference"`` (its token loop, for tests).
    """

    def __init__(self, dim: int, heads: int, *, d_state: int = 16, expand: int = 2, conv_size: int = 4,
                 chunk_size: int = 64, norm_eps: float = 1e-5, impl: Literal["chunked", "reference"] = "chunked"):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("d_state", d_state), ("expand", expand),
                            ("conv_size", conv_size), ("chunk_size", chunk_size)):
            _positive_int(name, value)
        if (expand * dim) % heads:
            raise ValueError(f"heads ({heads}) must divide d_inner = expand * dim = {expand * dim}")
        if impl not in ("chunked", "reference"):
            raise ValueError(f"impl must be 'chunked' or 'reference', got {impl!r}")
        self.dim, self.heads, self.d_state, self.expand = dim, heads, d_state, expand
        self.d_inner = expand * dim
        self.head_dim = self.d_inner // heads
        self.chunk_size, self.impl = chunk_size, impl
        H, N, d_inner = heads, d_state, self.d_inner
        self.conv_channels = d_inner + 2 * N  # x, B, C
        self.in_proj = nn.Linear(dim, d_inner + self.conv_channels + H, bias=False)  # [z | xBC | dt]
        self.conv = ShortConvolution(self.conv_channels, conv_size)
        bound = 1 / math.sqrt(conv_size)  # nn.Conv1d's bias init (fan_in = kernel size for a depthwise conv)
        self.conv_bias = nn.Parameter(torch.empty(self.conv_channels).uniform_(-bound, bound))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())  # A = -exp(A_log) in [-16, -1]
        dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.D = nn.Parameter(torch.ones(H))
        self.norm = RMSNorm(d_inner, norm_eps)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    # ------------------------------------------------------------------------------------------------------------------

    def features(self, x: Tensor, conv_state: Tensor | None = None):
        """The SSM's inputs: ``(xs [B, T, H, P], dt [B, T, H] (Δ, after the softplus), B [B, T, 1, N],
        C [B, T, 1, N], z [B, T, d_inner], conv_state [B, d_inner + 2 N, conv_size - 1])``."""
        Bsz, T, _ = x.shape
        H, P, N, d_inner = self.heads, self.head_dim, self.d_state, self.d_inner
        z, xBC, dt = self.in_proj(x).split([d_inner, self.conv_channels, H], dim=-1)
        xBC, conv_state = self.conv(xBC, conv_state)  # [B, T, d_inner + 2 N]
        xBC = F.silu(xBC + self.conv_bias.to(xBC.dtype))
        xs, Bm, Cm = xBC.split([d_inner, N, N], dim=-1)
        dt = F.softplus(dt + self.dt_bias)  # [B, T, H]
        return xs.reshape(Bsz, T, H, P), dt, Bm.unsqueeze(2), Cm.unsqueeze(2), z, conv_state

    def init_state(self, batch: int, device=None, dtype=None) -> Mamba2State:
        """Zero conv history (in ``dtype``) and zero SSM state (float32 under half precision) for ``batch`` streams."""
        p = self.in_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        ssm = torch.zeros(batch, self.heads, self.head_dim, self.d_state, device=device, dtype=compute_dtype(dtype))
        return Mamba2State(self.conv.init_state(batch, device, dtype), ssm)

    def forward(self, x: Tensor, state: Mamba2State | None = None) -> tuple[Tensor, Mamba2State]:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        if state is not None and not isinstance(state, Mamba2State):
            raise TypeError(f"state must be a Mamba2State (see init_state) or None, got {type(state).__name__}")
        Bsz, T, _ = x.shape
        xs, dt, Bm, Cm, z, conv = self.features(x, None if state is None else state.conv)
        A = -torch.exp(self.A_log)  # [H]
        fn = ssd_reference if self.impl == "reference" else ssd
        y, S = fn(xs, dt, A, Bm, Cm, chunk_size=self.chunk_size, initial_state=None if state is None else state.ssm,
                  output_final_state=True, check_values=False)  # y [B, T, H, P], S [B, H, P, N]
        y = y + self.D[:, None] * xs  # the D skip
        y = y.reshape(Bsz, T, self.d_inner)
        return self.out_proj(self.norm(y * F.silu(z))), Mamba2State(conv, S)

    def state_numel(self) -> dict[str, int]:
        """Numbers of the state per sequence: ``ssm`` (``H P N``, what the Stuffed Mamba law's N_S counts per layer)
        and ``conv``."""
        return {"ssm": self.heads * self.head_dim * self.d_state,
                "conv": self.conv_channels * (self.conv.kernel_size - 1)}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, d_state={self.d_state}, "
                f"expand={self.expand}, chunk_size={self.chunk_size}")
