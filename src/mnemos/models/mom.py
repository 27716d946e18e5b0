"""MoM, Mixture-of-Memories (Du et al. 2025, arXiv 2502.13685) as a mixer: ``forward(x [B, T, d], state=None) ->
(y, state)``; M Gated DeltaNet memories, each written only by the tokens a router sends it, plus a shared memory that
every token writes (/work/shared/specs/memory-rules.md §4)::

    p_t   = softmax(W_r x_t)                                          [M] router probabilities (W_r: d -> M, no bias)
    I_t   = TopK(p_t, k);   g_t^m = p_t^m / sum_{j in I_t} p_t^j  for m in I_t, else 0      renormalised weights
    q_t   = W_q x_t                                                    one query for every memory
    k^m, v^m, beta^m, a^m                                              memory m's own projections and gates
    S_t^m = a_t^m S_{t-1}^m (I - beta_t^m k_t^m k_t^mT) + beta_t^m v_t^m k_t^mT   if m in I_t
          = S_{t-1}^m                                                  otherwise: no decay, no write
    S_t^s = the same for the shared memory s, at every token
    o_t   = sum_m g_t^m S_t^m q_t + S_t^s q_t                          (= (sum_m g^m S^m + S^s) q: mixing the
                                                                        memories then reading = mixing the reads)
    y_t   = out_proj(RMSNorm_head(o_t) * silu(W_o x_t))                Gated DeltaNet's output stage

The front end is Gated DeltaNet's (:class:`~mnemos.models.baselines.LinearRecurrence`): q, every k^m and v^m through
one causal depthwise conv and SiLU, q and k l2-normalised; ``beta = sigmoid(W_beta x)``, ``log a = -exp(A_log)
softplus(W_a x + dt_bias)`` floored at ``a >= GDN_MIN_DECAY``, per memory and head.

**One delta-rule call.** A token that is not routed to memory m is, for that memory, a token with ``beta = 0`` and
``a = 1``: ``S (I - 0) * 1 + 0 = S``, exactly (multiplying by 1 and adding 0 are exact in floating point). The chunked
:func:`~mnemos.ops.delta_rule` keeps that exactness: a row with beta 0 contributes nothing to the triangular system
(its row of ``(I + A)^{-1}`` is the unit row) and its "new value" u is 0, so the memories (routed ones first, then the
shared one) run as ``S * H`` heads of one call, S = M (+ 1 with the shared memory). A memory no token of a call was
routed to comes back bit-identical (tested).

**Where mnemos differs from fla's layer** (``fla/layers/mom.py``, which regroups each memory's tokens and runs its
recurrence, and its short conv, over those tokens only): here the conv runs over the whole stream, so a memory's k
and v at a routed token also see the unrouted tokens just before it; each memory's state still changes only at its
routed tokens. fla adds the shared memory's read with weight 1, as here; its defaults (8 memories, no shared memory)
differ from the paper's (4, top-2, shared), which are mnemos's.

**Load balancing.** Each forward stores its auxiliary loss in ``self.aux_loss`` (a 0-d tensor, already scaled):
``aux_loss_scale * M * sum_m f_m P_m`` over the call's tokens, f_m the fraction of tokens routed to memory m and P_m
its mean router probability (the Switch Transformer's loss, in the top-k form fla and Mixtral use: k at a uniform
routing; :func:`load_balancing_loss`). :meth:`mnemos.models.MnemosLM.aux_loss` sums it over layers, and ``mnemos
train`` adds it to the language-model loss (the paper's scale, 1e-3, is the default).

State (:class:`~mnemos.models.cache.MoMState`): the M memories ``[B, M, H, D, D]``, the shared one ``[B, H, D, D]``
and the conv's last ``conv_size - 1`` inputs ``[B, (1 + 2 S) H D, conv_size - 1]``: ``S H D^2 + (1 + 2 S) H D
(conv_size - 1)`` numbers per layer and sequence, whatever the context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import GatedRMSNorm, ShortConvolution
from ..ops import delta_rule, delta_rule_reference
from ..ops.memory_rule.common import _no_autocast, compute_dtype
from .baselines import GDN_MIN_DECAY
from .cache import MoMState

__all__ = ["MixtureOfMemories", "load_balancing_loss"]


def load_balancing_loss(probs: Tensor, routed: Tensor) -> Tensor:
    """The Switch-style load-balancing loss ``M * sum_m f_m P_m`` (unscaled) of one routing.

    Args:
        probs: ``[..., M]`` the router's probabilities (each row sums to 1).
        routed: ``[..., M]`` bool, which memories each token was routed to (k per row).

    ``f_m`` is the fraction of tokens routed to memory m (``sum_m f_m = k``), ``P_m`` the mean of ``probs[..., m]``
    over the tokens. At a uniform routing (``f_m = k / M``, ``P_m = 1 / M``) it is k; it grows as the routing
    concentrates on the memories the router favours. Differentiable through ``probs`` only (f is a count).
    """
    M = probs.shape[-1]
    f = routed.reshape(-1, M).to(probs.dtype).mean(0)  # [M]
    P = probs.reshape(-1, M).mean(0)  # [M]
    return M * (f * P).sum()


class MixtureOfMemories(nn.Module):
    """MoM's layer (see the module docstring): ``forward(x [B, T, dim], state=None) -> (y [B, T, dim], state)``.

    Args:
        dim: model width. heads: H; head dim D = dim / H (of q, k and v, in every memory).
        num_memories: M, the routed memories. top_k: k, how many each token is routed to (1 <= k <= M).
        shared_memory: add the memory every token writes and reads with weight 1.
        aux_loss_scale: the factor of the load-balancing loss stored in ``aux_loss`` (0: it is 0).
        chunk_size: tokens per chunk of :func:`~mnemos.ops.delta_rule` (exact for any value).
        conv_size: width of the causal conv over q, k and v.
        impl: ``"reference"`` runs :func:`~mnemos.ops.delta_rule_reference` (the token loop, for tests); anything
            else the chunked :func:`~mnemos.ops.delta_rule` (as :class:`~mnemos.models.LinearRecurrence`).

    Attributes:
        aux_loss: the scaled load-balancing loss of the last forward call (0-d; None before the first).

    Parameters per memory (the routed ones first, then the shared one, along the memory axis): the k and v blocks of
    ``to_qkv`` (``[q | k_1..k_S | v_1..v_S]``, each ``H D`` wide) and of the conv, ``to_beta`` / ``to_decay`` rows
    ``m H .. (m + 1) H``, ``A_log[m]``, ``dt_bias[m]``; the router ``router.weight`` ``[M, dim]``.
    """

    def __init__(self, dim: int, heads: int, *, num_memories: int = 4, top_k: int = 2, shared_memory: bool = True,
                 aux_loss_scale: float = 1e-3, chunk_size: int = 64, conv_size: int = 4, impl: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("num_memories", num_memories), ("top_k", top_k),
                            ("chunk_size", chunk_size), ("conv_size", conv_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        if top_k > num_memories:
            raise ValueError(f"top_k ({top_k}) must be at most num_memories ({num_memories})")
        if not (isinstance(aux_loss_scale, (int, float)) and math.isfinite(aux_loss_scale) and aux_loss_scale >= 0):
            raise ValueError(f"aux_loss_scale must be a finite number >= 0, got {aux_loss_scale!r}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.num_memories, self.top_k, self.shared_memory = num_memories, top_k, bool(shared_memory)
        self.aux_loss_scale, self.chunk_size, self.impl = float(aux_loss_scale), chunk_size, impl
        self.slots = S = num_memories + int(self.shared_memory)  # memories the delta rule runs
        H, D = heads, self.head_dim
        self.router = nn.Linear(dim, num_memories, bias=False)  # W_r
        self.to_qkv = nn.Linear(dim, (1 + 2 * S) * H * D, bias=False)  # [q | k_1..k_S | v_1..v_S]
        self.conv = ShortConvolution((1 + 2 * S) * H * D, conv_size)
        self.to_beta = nn.Linear(dim, S * H)  # beta = sigmoid(.), per memory and head
        # Gated DeltaNet's decay per memory: log a = -exp(A_log) * softplus(W_a x + dt_bias)
        self.to_decay = nn.Linear(dim, S * H, bias=False)
        self.A_log = nn.Parameter(torch.empty(S, H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(S, H).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.to_out_gate = nn.Linear(dim, H * D, bias=False)
        self.out_norm = GatedRMSNorm(D)
        self.out_proj = nn.Linear(H * D, dim, bias=False)
        self.aux_loss: Tensor | None = None

    # ------------------------------------------------------------------------------------------------------------------

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The router on x ``[B, T, dim]``, in float32 at least (under autocast too).

        Returns ``(weights [B, T, M], routed [B, T, M] bool, probs [B, T, M])``: the renormalised top-k weights (0
        off the top k), which memories each token goes to, and the softmax probabilities."""
        dt = compute_dtype(x.dtype)
        with _no_autocast(x.device):
            probs = torch.softmax(F.linear(x.to(dt), self.router.weight.to(dt)), dim=-1)  # [B, T, M]
        top, index = probs.topk(self.top_k, dim=-1)  # [B, T, k]
        weights = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        routed = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)
        return weights, routed, probs

    def features(self, x: Tensor, conv_state: Tensor | None = None):
        """The delta rule's inputs for every memory, before routing.

        Returns ``(q [B, T, H, D], k [B, T, S, H, D], v [B, T, S, H, D], beta [B, T, S, H], a [B, T, S, H],
        conv_state)``: memory m's keys, values, write strengths and decays (S memories: the routed ones, then the
        shared one)."""
        B, T, _ = x.shape
        H, D, S = self.heads, self.head_dim, self.slots
        qkv, conv_state = self.conv(self.to_qkv(x), conv_state)  # [B, T, (1 + 2 S) H D]
        qkv = F.silu(qkv)
        q = F.normalize(qkv[..., : H * D].view(B, T, H, D), dim=-1)
        k, v = qkv[..., H * D :].view(B, T, 2, S, H, D).unbind(2)  # 2 x [B, T, S, H, D]
        k = F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.to_beta(x)).view(B, T, S, H)
        log_a = -self.A_log.exp() * F.softplus(self.to_decay(x).view(B, T, S, H) + self.dt_bias)  # <= 0
        a = log_a.clamp(min=math.log(GDN_MIN_DECAY)).exp()
        return q, k, v, beta, a, conv_state

    def init_state(self, batch: int, device=None, dtype=None) -> MoMState:
        """Empty memories (float32 under half precision) and a zero conv history (in ``dtype``) for ``batch``
        streams."""
        p = self.to_qkv.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        H, D, M = self.heads, self.head_dim, self.num_memories
        mdtype = compute_dtype(dtype)
        memories = torch.zeros(batch, M, H, D, D, device=device, dtype=mdtype)
        shared = torch.zeros(batch, H, D, D, device=device, dtype=mdtype) if self.shared_memory else None
        return MoMState(memories, shared, self.conv.init_state(batch, device, dtype))

    def forward(self, x: Tensor, state: MoMState | None = None) -> tuple[Tensor, MoMState]:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        if state is not None and not isinstance(state, MoMState):
            raise TypeError(f"state must be a MoMState (see init_state) or None, got {type(state).__name__}")
        B, T, _ = x.shape
        H, D, S, M = self.heads, self.head_dim, self.slots, self.num_memories
        weights, routed, probs = self.route(x)  # [B, T, M] each
        self.aux_loss = self.aux_loss_scale * load_balancing_loss(probs, routed)
        q, k, v, beta, a, conv = self.features(x, None if state is None else state.conv)
        # the shared memory is routed every token, with weight 1
        on = torch.cat([routed, routed.new_ones(B, T, S - M)], dim=-1)  # [B, T, S]
        mix = torch.cat([weights, weights.new_ones(B, T, S - M)], dim=-1)  # [B, T, S]
        beta = torch.where(on[..., None], beta, 0.0)  # an unrouted token writes nothing ...
        a = torch.where(on[..., None], a, 1.0)  # ... and does not decay the memory
        S0 = None
        if state is not None:
            mem = state.memories if state.shared is None else torch.cat([state.memories, state.shared[:, None]], 1)
            S0 = mem.reshape(B, S * H, D, D)  # [B, S H, V, K]
        fn = delta_rule_reference if self.impl == "reference" else delta_rule
        o, St = fn(q[:, :, None].expand(B, T, S, H, D).reshape(B, T, S * H, D), k.reshape(B, T, S * H, D),
                   v.reshape(B, T, S * H, D), beta.reshape(B, T, S * H), a.reshape(B, T, S * H), initial_state=S0,
                   chunk_size=self.chunk_size, output_final_state=True, check_values=False)
        o = o.view(B, T, S, H, D)
        o = (o.to(mix.dtype) * mix[..., None, None]).sum(2)  # [B, T, H, D]: the routing-weighted reads + shared
        St = St.view(B, S, H, D, D)
        memories = St[:, :M].contiguous()
        shared = St[:, M].contiguous() if self.shared_memory else None
        gate = self.to_out_gate(x).view(B, T, H, D)
        y = self.out_proj(self.out_norm(o.to(gate.dtype), gate).reshape(B, T, H * D))
        return y, MoMState(memories, shared, conv)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, num_memories={self.num_memories}, top_k={self.top_k}, "
                f"shared_memory={self.shared_memory}, aux_loss_scale={self.aux_loss_scale:g}")
