"""Linear-recurrence baselines: linear attention runs the one memory rule (:func:`mnemos.ops.neural_memory`);
DeltaNet and Gated DeltaNet run the delta rule (:func:`mnemos.ops.delta_rule`), which is that rule with mapped gates.

With a depth-1 memory (a matrix ``W [V, K]`` per head, starting at 0), no residual and no momentum (eta = 0), the
rule ``W_t = (1 - alpha_t) W_{t-1} - theta_t grad_W loss(W_anchor k_t, v_t)``, ``o_t = W_t q_t`` becomes:

==================  =====================================================================  ===========================
baseline            recurrence                                                             rule arguments
==================  =====================================================================  ===========================
linear attention    ``W_t = W_{t-1} + v_t k_t^T``                                          dot loss, theta 1, alpha 0,
  (Katharopoulos                                                                           any chunk size (exact: the
  et al. 2020)                                                                             dot loss's gradient does
                                                                                           not depend on W)
DeltaNet            ``W_t = W_{t-1} - beta_t (W_{t-1} k_t - v_t) k_t^T``                   l2 loss, chunk 1, alpha 0,
  (Schlag et al.                                                                           theta = beta / 2 (the l2
  2021; Yang et                                                                            gradient is 2 (W k - v) k^T)
  al. 2024)
Gated DeltaNet      ``W_t = a_t W_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``        l2 loss, chunk 1,
  (Yang, Kautz,       ``= a W - beta a (W k - v / a) k^T``                                 1 - alpha = a,
  Hatamizadeh                                                                              theta = beta a / 2,
  2024)                                                                                    target v / a
==================  =====================================================================  ===========================

Gated DeltaNet is not the rule with the decay applied after the gradient step (that would be ``a W - beta (W k - v)
k^T``): its decay also scales the gradient's W term but not its v term, which the rescaled target ``v / a`` restores.
The decay is floored at ``a >= 1e-3`` (one such step already erases the memory; the floor keeps ``v / a`` finite
where the mapping above is used).

The table is what the rule computes (tested: tests/models/test_mixers.py). To run them, linear attention takes the
rule itself (chunk 64); DeltaNet and Gated DeltaNet take :func:`mnemos.ops.delta_rule`, the same recurrences in the
exact chunked (WY) form, 64 tokens per step of the loop instead of one (``impl="reference"``: its token loop).

The three share one front end and one output stage: q/k/v projections (DeltaNet and Gated DeltaNet add a causal
depthwise conv and SiLU, then l2-normalise q and k, as in their papers; linear attention uses the feature map
``phi(x) = 1 + elu(x)`` on q and k and no conv), and ``out_proj(RMSNorm_head(o) * silu(W_g x))``. The per-head RMSNorm
is scale-invariant, so it subsumes linear attention's normaliser ``sum_j phi(q_t) . phi(k_j)`` (a positive scalar
per token and head) up to its epsilon; it is not computed separately.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import QK_INITS, GatedRMSNorm, ShortConvolution, successor_init_
from ..ops import MemoryState, delta_rule, delta_rule_reference, neural_memory
from .cache import RecurrentState

__all__ = ["LinearRecurrence", "GDN_MIN_DECAY"]

GDN_MIN_DECAY = 1e-3  # floor of Gated DeltaNet's decay a_t, see the module docstring

Kind = Literal["linear_attention", "deltanet", "gated_deltanet"]


class LinearRecurrence(nn.Module):
    """Linear attention, DeltaNet or Gated DeltaNet as a mixer: ``forward(x [B, T, d], state=None) -> (y, state)``.

    Args:
        dim: model width. heads: H; head dim D = dim / H.
        kind: ``"linear_attention"``, ``"deltanet"`` or ``"gated_deltanet"``.
        chunk_size: tokens per step of the computation (exact for any value: linear attention's dot-loss rule and the
            delta rules' chunked form do not depend on it).
        conv_size: width of the causal conv of the delta rules.
        impl: implementation of the rule (see :func:`mnemos.ops.neural_memory`); for the delta rules ``"reference"``
            selects :func:`mnemos.ops.delta_rule_reference` and anything else the chunked :func:`mnemos.ops.delta_rule`.
        qk_init: ``"random"`` (the papers' init) or, for the delta rules, ``"successor"``: W_k starts as a copy of W_q
            and the conv's key taps the previous token (:func:`mnemos.layers.successor_init_`, the neural memory's
            default ``memory.qk_init``).
    """

    def __init__(
        self, dim: int, heads: int, kind: Kind, *, chunk_size: int = 64, conv_size: int = 4, impl: str = "auto",
        qk_init: str = "random",
    ):
        super().__init__()
        if kind not in ("linear_attention", "deltanet", "gated_deltanet"):
            raise ValueError(f"kind must be 'linear_attention', 'deltanet' or 'gated_deltanet', got {kind!r}")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        if qk_init not in QK_INITS:
            raise ValueError(f"qk_init must be one of {QK_INITS}, got {qk_init!r}")
        if qk_init == "successor" and (kind == "linear_attention" or conv_size < 2):
            raise ValueError(f"qk_init='successor' needs a delta rule's short conv of >= 2 taps (the key starts on the "
                             f"previous token); got kind={kind!r}, conv_size={conv_size}")
        self.dim, self.heads, self.head_dim, self.kind, self.impl = dim, heads, dim // heads, kind, impl
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.state_chunk = chunk_size if kind == "linear_attention" else 1  # the rule's anchor spacing (the state's)
        H, D = heads, self.head_dim
        inner = H * D
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.conv = None if kind == "linear_attention" else ShortConvolution(3 * inner, conv_size)
        if kind != "linear_attention":
            self.to_beta = nn.Linear(dim, H)  # beta = sigmoid(.): the delta rule's step size in (0, 1)
        if kind == "gated_deltanet":
            # Mamba2-style decay: log a = -exp(A_log) * softplus(W_a x + dt_bias); A in [1, 16], dt in [1e-3, 0.1]
            self.to_decay = nn.Linear(dim, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.to_out_gate = nn.Linear(dim, inner, bias=False)
        self.out_norm = GatedRMSNorm(D)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        if qk_init == "successor":  # after every random draw: the other parameters are those of "random"
            successor_init_(self.to_qkv, self.conv)

    # ------------------------------------------------------------------------------------------------------------------

    def features(self, x: Tensor, conv_state: Tensor | None = None):
        """The recurrence's inputs in the papers' terms.

        Returns ``(q, k, v, beta, a, conv_state)``: q, k, v ``[B, T, H, D]``; beta ``[B, T, H]`` (None for linear
        attention); a ``[B, T, H]`` the decay (None unless Gated DeltaNet); the conv's new state (None without conv).
        """
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        qkv = self.to_qkv(x)  # [B, T, 3 * H * D]
        if self.conv is None:
            q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
            return 1 + F.elu(q), 1 + F.elu(k), v, None, None, None
        qkv, conv_state = self.conv(qkv, conv_state)
        q, k, v = F.silu(qkv).view(B, T, 3, H, D).unbind(2)  # 3 x [B, T, H, D]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.to_beta(x))  # [B, T, H]
        a = None
        if self.kind == "gated_deltanet":
            log_a = -self.A_log.exp() * F.softplus(self.to_decay(x) + self.dt_bias)  # [B, T, H], <= 0
            a = log_a.clamp(min=math.log(GDN_MIN_DECAY)).exp()
        return q, k, v, beta, a, conv_state

    def rule_inputs(self, v: Tensor, beta: Tensor | None, a: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Map the papers' gates to the memory rule's ``(target, theta, eta, alpha)`` (see the module docstring).

        :meth:`forward` runs linear attention's mapping; the delta rules' mappings are the family claim that
        tests/models/test_mixers.py checks against :func:`mnemos.ops.delta_rule` (which the layer runs)."""
        gate_shape = v.shape[:3]  # [B, T, H]
        zero = v.new_zeros(gate_shape)
        if self.kind == "linear_attention":
            return v, v.new_ones(gate_shape), zero, zero
        if self.kind == "deltanet":
            return v, beta / 2, zero, zero
        return (v / a.unsqueeze(-1)).to(v.dtype), beta * a / 2, zero, 1 - a

    def output(self, x: Tensor, o: Tensor) -> Tensor:
        """o ``[B, T, H, D]`` -> ``out_proj(RMSNorm_head(o) * silu(W_g x))`` ``[B, T, dim]``."""
        B, T, H, D = o.shape
        gate = self.to_out_gate(x).view(B, T, H, D)
        return self.out_proj(self.out_norm(o.to(gate.dtype), gate).reshape(B, T, H * D))

    # ------------------------------------------------------------------------------------------------------------------

    def init_state(self, batch: int, device=None, dtype=None) -> RecurrentState:
        """Zero matrix memory (and zero conv history) for ``batch`` streams."""
        p = self.to_qkv.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        mdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # the rule's state dtype
        H, D = self.heads, self.head_dim
        W = torch.zeros(batch, H, D, D, device=device, dtype=mdtype)
        if self.kind == "linear_attention":  # the memory rule's state
            memory = MemoryState((W,), (W.clone(),), (W.clone(),), 0, self.state_chunk)
        else:  # a delta rule keeps its matrix alone: no momentum, and the anchor is the matrix itself
            memory = MemoryState((W,), (), (W.view_as(W),), 0, 1)
        conv = None if self.conv is None else self.conv.init_state(batch, device, dtype)
        return RecurrentState(memory, conv)

    def forward(self, x: Tensor, state: RecurrentState | None = None) -> tuple[Tensor, RecurrentState]:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        q, k, v, beta, a, conv = self.features(x, None if state is None else state.conv)
        if self.kind != "linear_attention":  # the delta rules, exactly, in their chunked form
            fn = delta_rule_reference if self.impl == "reference" else delta_rule
            S0 = None if state is None else state.memory.weights[0]
            o, S = fn(q, k, v, beta, a, initial_state=S0, chunk_size=self.chunk_size, output_final_state=True,
                      check_values=False)
            memory = MemoryState((S,), (), (S.view_as(S),), 0, 1)  # no momentum in a delta rule
            return self.output(x, o), RecurrentState(memory, conv)
        target, theta, eta, alpha = self.rule_inputs(v, beta, a)  # linear attention: the rule with the dot loss
        kwargs = dict(chunk_size=self.chunk_size, residual=False, loss="dot", output_final_state=True, impl=self.impl,
                      check_values=False)  # inputs computed here (as in NeuralMemory)
        if state is None:
            W0 = (q.new_zeros(self.heads, self.head_dim, self.head_dim),)  # [H, V, K]: the empty memory
            o, memory = neural_memory(q, k, target, theta, eta, alpha, W0, **kwargs)
        else:
            o, memory = neural_memory(q, k, target, theta, eta, alpha, initial_state=state.memory, **kwargs)
        return self.output(x, o), RecurrentState(memory, conv)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kind={self.kind!r}, chunk_size={self.chunk_size}"
