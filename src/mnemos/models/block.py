"""The one block skeleton every model variant is built from: pre-norm residual mixer, then pre-norm residual MLP.

A *mixer* is any module with ``forward(x [B, T, d], state=None) -> (y [B, T, d], state)`` and
``init_state(batch, device, dtype) -> state``; ``state=None`` means "a whole sequence from position 0" (the
parallel training path; the returned state may then be None). :class:`mnemos.layers.Attention` and
:class:`mnemos.layers.NeuralMemory` are mixers as they are; the Titans hybrids and linear baselines in this package
follow the same contract.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Block", "SwiGLU"]


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases (Shazeer 2020, arXiv 2002.05202; the LLaMA / Transformer++ MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """``h = x + mixer(norm_1(x)); out = h + mlp(norm_2(h))``: the pre-norm residual block of Transformer++.

    Args:
        mixer: the token mixer (attention, neural memory, a Titans hybrid, a linear recurrence); see module doc.
        mlp: the channel mixer, ``[B, T, d] -> [B, T, d]`` (a :class:`SwiGLU` in every mnemos model).
        norm: a factory called twice, for the norm before the mixer and the one before the MLP
            (e.g. ``functools.partial(RMSNorm, d, eps)``).

    The norms sit on the branches, never on the residual stream, so the stream carries the sum of every branch's
    output unnormalised; the model applies one final norm before its head.
    """

    def __init__(self, mixer: nn.Module, mlp: nn.Module, norm: Callable[[], nn.Module]):
        super().__init__()
        self.mixer_norm = norm()
        self.mixer = mixer
        self.mlp_norm = norm()
        self.mlp = mlp

    def init_state(self, batch: int, device=None, dtype=None) -> Any:
        """The mixer's state at the start of a stream (the MLP is stateless)."""
        return self.mixer.init_state(batch, device, dtype)

    def forward(self, x: Tensor, state: Any = None, *relay: Any) -> tuple[Any, ...]:
        """x ``[B, T, d]`` -> ``(out [B, T, d], the mixer's state after x)``. ``relay``: for a relay mixer (LM2),
        the side channel ``MnemosLM`` passes between such blocks (:mod:`mnemos.models.lm`), one value handed to the
        mixer, whose next value is returned third."""
        y, state, *relay = self.mixer(self.mixer_norm(x), state, *relay)
        h = x + y
        return h + self.mlp(self.mlp_norm(h)), state, *relay
