"""BASED's linear-attention layer (Arora et al. 2024, arXiv 2402.18668) as a mixer:
``forward(x [B, T, d], state=None) -> (y, state)``.

The layer (``based/models/mixers/linear_attention.py``; /work/shared/specs/memory-rules.md §5)::

    q, k = W_q x, W_k x                     [B, T, H, F]: a small feature dim F per head (16 in the paper)
    v    = W_v x                            [B, T, H, d / H]
    o_t  = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s / (sum_{s<=t} phi(q_t) . phi(k_s) + eps)
    y    = W_o o                            phi: the 2nd-order Taylor map, phi(q).phi(k) = 1 + q.k/sqrt F + (q.k)^2/(2F)

computed by :func:`mnemos.ops.based.based_linear_attention` (exact chunks; ``impl="reference"`` its token loop). The
paper's model is a hybrid: these layers, sliding-window attention layers and short-conv layers; this variant is the
linear-attention layer in every block (the hybrid stacks come with the layer patterns of issue 16).

State (:class:`~mnemos.models.cache.BasedState`): the KV sum ``[B, H, d / H, D_phi]`` and the K sum
``[B, H, D_phi]``, ``D_phi = 1 + F + F^2`` (273 at F = 16): ``H (d / H + 1) D_phi = (d + H) D_phi`` numbers per layer
and sequence, whatever the context length.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..ops.based import based_linear_attention, based_linear_attention_reference, taylor_feature_dim
from ..ops.memory_rule.common import compute_dtype
from ..layers import ShortConvolution
from .cache import BasedState, BaseConvState

__all__ = ["BasedLinearAttention", "BaseConv"]


def check_feature_attention_args(impl: str, **ints: tuple[int, int]) -> None:
    """The argument checks of a feature-map attention layer (this one, JRT-RNN's): each ``name=(value, low)`` an int
    >= low, ``heads`` dividing ``dim``, ``impl`` one of the two paths; a ``ValueError`` naming the argument."""
    for name, (value, low) in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if ints["dim"][0] % ints["heads"][0]:
        raise ValueError(f"heads ({ints['heads'][0]}) must divide dim ({ints['dim'][0]})")
    if impl not in ("chunked", "reference"):
        raise ValueError(f"impl must be 'chunked' or 'reference', got {impl!r}")


class BasedLinearAttention(nn.Module):
    """BASED's Taylor linear attention (see the module docstring).

    Args:
        dim: model width d. heads: H, which must divide d (the value head dim is d / H).
        feature_dim: F, the per-head dim of q and k before the feature map.
        chunk_size: tokens per chunk of the computation (exact for any value).
        eps: added to the normaliser.
        impl: ``"chunked"`` or ``"reference"`` (the token loop, for tests).
    """

    def __init__(self, dim: int, heads: int, *, feature_dim: int = 16, chunk_size: int = 64, eps: float = 1e-12,
                 impl: Literal["chunked", "reference"] = "chunked"):
        super().__init__()
        check_feature_attention_args(impl, dim=(dim, 1), heads=(heads, 1), feature_dim=(feature_dim, 1),
                                     chunk_size=(chunk_size, 1))
        self.dim, self.heads, self.head_dim, self.feature_dim = dim, heads, dim // heads, feature_dim
        self.chunk_size, self.eps, self.impl = chunk_size, eps, impl
        self.q_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch: int, device=None, dtype=None) -> BasedState:
        """Empty sums (float32 under half precision) for ``batch`` streams."""
        p = self.q_proj.weight
        device = p.device if device is None else device
        dtype = compute_dtype(p.dtype if dtype is None else dtype)
        D = taylor_feature_dim(self.feature_dim)
        return BasedState(torch.zeros(batch, self.heads, self.head_dim, D, device=device, dtype=dtype),
                          torch.zeros(batch, self.heads, D, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: BasedState | None = None) -> tuple[Tensor, BasedState]:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        if state is not None and not isinstance(state, BasedState):
            raise TypeError(f"state must be a BasedState (see init_state) or None, got {type(state).__name__}")
        B, T, _ = x.shape
        H, Fd, Dv = self.heads, self.feature_dim, self.head_dim
        q = self.q_proj(x).view(B, T, H, Fd)
        k = self.k_proj(x).view(B, T, H, Fd)
        v = self.v_proj(x).view(B, T, H, Dv)
        fn = based_linear_attention_reference if self.impl == "reference" else based_linear_attention
        o, (kv, k_sum) = fn(q, k, v, chunk_size=self.chunk_size, eps=self.eps, output_final_state=True,
                            initial_state=None if state is None else (state.kv, state.k_sum), check_values=False)
        return self.out_proj(o.reshape(B, T, H * Dv)), BasedState(kv, k_sum)

    def state_numel(self) -> int:
        """Numbers of the state per sequence: ``H (d / H + 1) D_phi``."""
        return self.heads * (self.head_dim + 1) * taylor_feature_dim(self.feature_dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, feature_dim={self.feature_dim}, chunk_size={self.chunk_size}"


class BaseConv(nn.Module):
    """The gated short convolution of BASED's hybrid (its "BaseConv" layers, kernel 3; the BASED paper's 360M model
    puts them at every layer that is neither linear nor sliding-window attention): ``y = conv(x) * (W x + b) + x``,
    ``conv`` a causal depthwise convolution of ``kernel_size`` taps over time. Our reading of the reference code
    (zoology's ``BaseConv`` with a short kernel, no activation), its inner ``+ x`` included: inside a mnemos block
    that is the normalised input added to the mixer's output, before the block's own residual.

    Args:
        dim: the model width d. kernel_size: the convolution's taps (>= 1).
    """

    def __init__(self, dim: int, *, kernel_size: int = 3):
        super().__init__()
        for name, value in (("dim", dim), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.dim = dim
        self.proj = nn.Linear(dim, dim)
        self.conv = ShortConvolution(dim, kernel_size)

    def init_state(self, batch: int, device=None, dtype=None) -> BaseConvState:
        return BaseConvState(self.conv.init_state(batch, device, dtype))

    def forward(self, x: Tensor, state: BaseConvState | None = None) -> tuple[Tensor, BaseConvState]:
        """x ``[B, T, d]`` -> ``(y [B, T, d], state)``; a stream continued with the state equals one call."""
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
        c, conv = self.conv(x, None if state is None else state.conv)
        return c * self.proj(x) + x, BaseConvState(conv)
