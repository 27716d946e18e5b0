"""Rotary position embedding (RoPE).

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" (arXiv 2104.09864).

A query or key at absolute position p is rotated, pair of channels by pair of channels, by the angle ``p * f_i`` with
``f_i = base^(-2i / D)``. A rotation by ``p`` followed by an inner product with a vector rotated by ``n`` equals an
inner product after a single rotation by ``p - n``, so attention scores depend on positions only through their
difference (the relative-position property, tested in ``tests/layers/test_attention.py``).

Channel pairing: channel ``i`` is paired with channel ``i + D/2`` (the "half-split" layout of GPT-NeoX and LLaMA),
not ``2i`` with ``2i + 1`` as written in the paper. The two differ by a fixed permutation of the head dimension,
which the learned q/k projections absorb, so they are equivalent models.

Positions are absolute and are given by an ``offset``: rotating a block of T tokens with ``offset=p`` gives exactly
the same numbers as rotating a longer sequence from position 0 and slicing out positions ``p .. p+T-1``. This is what
makes decoding with a KV cache equal the parallel pass. Angles are always computed in float64, because in float32 the
angle ``p * f_0`` for p ~ 10^6 carries an error of ~0.06 rad.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """Map channel pairs ``(a, b) -> (-b, a)`` with ``a = x[..., :D/2]``, ``b = x[..., D/2:]`` (a 90 degree turn)."""
    a, b = x.chunk(2, dim=-1)  # each [..., D/2]
    return torch.cat((-b, a), dim=-1)  # [..., D]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for ``[B, T, H, D]`` queries and keys (Su et al. 2021).

    Args:
        head_dim: D, the per-head size of the rotated vectors. Must be a positive even number.
        base: the frequency base; channel pair i turns by ``p * base^(-2i/D)`` radians at position p. Default 10000.

    The module has no parameters and no buffers: angles are recomputed in float64 on the input's device at each call
    (``T * D / 2`` numbers, negligible beside attention), so ``.to(dtype)`` / ``.half()`` cannot degrade them.

    Example:
        >>> rope = RotaryEmbedding(head_dim=8)
        >>> x = torch.randn(2, 5, 3, 8)  # [B, T, H, D]
        >>> y = rope(x, offset=0)
        >>> torch.allclose(rope(x[:, 3:], offset=3), y[:, 3:])
        True
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")
        if not float(base) > 1.0:
            raise ValueError(f"base must be a number greater than 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def cos_sin(self, offset: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Return float64 ``(cos, sin)``, each ``[T, D]``, for positions ``offset .. offset + length - 1``."""
        half = self.head_dim // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2.0 / self.head_dim)  # [D/2]
        pos = torch.arange(offset, offset + length, dtype=torch.float64, device=device)  # [T]
        angles = pos[:, None] * inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [T, D]: channel i and i + D/2 share an angle
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` (``[B, T, H, D]``) as if its tokens sat at absolute positions ``offset .. offset + T - 1``.

        Returns a tensor of x's shape and dtype. Half-precision inputs are rotated in float32 and cast back.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be [B, T, H, D] (rank 4), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x's last dim must equal head_dim={self.head_dim}, got shape {tuple(x.shape)}")
        if isinstance(offset, Tensor):
            if offset.numel() != 1:
                raise ValueError(f"offset must be a single integer, got a tensor of shape {tuple(offset.shape)}")
            offset = int(offset.item())
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        cos, sin = self.cos_sin(offset, x.shape[1], x.device)  # each [T, D]
        cos = cos.to(compute_dtype)[None, :, None, :]  # [1, T, 1, D]
        sin = sin.to(compute_dtype)[None, :, None, :]  # [1, T, 1, D]
        xc = x.to(compute_dtype)
        return (xc * cos + rotate_half(xc) * sin).to(x.dtype)
