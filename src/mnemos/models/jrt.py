"""JRT-RNN's prefix linear attention (Arora et al. 2024, "Just read twice", arXiv 2407.05483) as a mixer:
``forward(x [B, T, d], state=None) -> (y, state)``.

The layer (``based/models/mixers/prefix_linear_attention.py``; /work/shared/specs/recurrent-baselines.md §2)::

    q, k = W_q x, W_k x                  [B, T, H, F]     the decoder's queries and keys (F per head, 16 in the paper)
    v    = W_v x                         [B, T, H, d / H]
    k_e, v_e = W_ke x, W_ve x            the encoder's own keys and values, used on the prefix only (q is shared)
    S_enc = sum_{j < M} v_e,j phi(k_e,j)^T      z_enc = sum_{j < M} phi(k_e,j)          (non-causal: all of the prefix)
    o_i  = phi(q_i)^T (S_enc + sum_{j <= i} v_j phi(k_j)^T) / (phi(q_i) . (z_enc + sum_{j <= i} phi(k_j)) + eps)
    y    = W_o o

for every position i, the prefix's included: phi is BASED's 2nd-order Taylor map (:mod:`mnemos.ops.based`), and the
prefix tokens feed both the encoder sums (through k_e, v_e) and the causal sums (through k, v). This is causal BASED
linear attention started from the state ``(S_enc, z_enc)``, so the layer computes the encoder sums and hands them to
:func:`mnemos.ops.based.based_linear_attention` as its initial state (exact chunks; ``impl="reference"``: its token
loop). With an empty prefix (M = 0) it is that causal linear attention exactly.

The prefix. ``prefix_len`` (config ``model.based.prefix_len``) is M: the first M tokens of a stream are the prefix,
counted from the stream's start (``state=None`` or a fresh :meth:`init_state`; each packed document and each left-
padded row from its first real token). Within one call, every output sees the encoder sums of all the prefix tokens
of that call and of the calls before it, so:

- one call holding the whole prefix (a forward over a sequence, or a prefill whose prompt has >= M tokens) is the
  paper's layer: every output, inside the prefix or after it, sees the whole prefix;
- a stream cut into calls *at or after* the end of the prefix equals one call (the state carries the combined
  sums), and the outputs after the prefix are strictly causal;
- a call that ends inside the prefix (a prompt shorter than M, token-by-token decoding from the start) sees only the
  prefix tokens given so far: the layer's outputs are what it gives when the prefix is the tokens seen, and the
  later prefix tokens join the encoder sums when they come (the outputs already returned are not revised; in a stack
  the later blocks keep those earlier outputs in their causal sums). Decoding after a prefill of at least M tokens is
  the paper's setting ("the prefill must contain the whole prefix").

So strict causality, piecewise == one call and generate == forward hold for cuts at or beyond M; inside the prefix an
output depends on the later prefix tokens of its call (tests/models/test_jrt.py). The default M = 1 is a one-token
prefix, which is causal, so the registry's invariant harness (cuts from position 1 on) holds as for every variant;
set ``model.based.prefix_len`` to the prompt length to train and evaluate the paper's JRT-RNN (its models: length
2048 with M = 1024).

Where the paper leaves it open or its code differs (choices): the layer is the PLA layer alone in every block (the
paper's model is a hybrid with sliding-window and short-conv layers: ``model.layers`` builds such stacks); no MLM
loss on the prefix (the paper adds 0.25 x MLM at 15 % masking: a training-loop matter, not the layer's); the
feature map, its dim and eps are BASED's (``based.feature_dim``; ``based.chunk_size`` is how, not what).

A call with no prefix token (any call past position M) does not use the encoder projections: training with the
state carried across windows (``run.carry_state``) under DDP then needs ``find_unused_parameters``.

State (:class:`JRTState`): the combined sums ``kv`` ``[B, H, d / H, D_phi]`` and ``k_sum`` ``[B, H, D_phi]``
(encoder plus causal: one state the size of BASED's, ``(d + H) D_phi`` numbers per layer and sequence with
``D_phi = 1 + F + F^2``) and ``position``, the tokens the layer has seen (one integer: where the prefix ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..ops.based import based_linear_attention, based_linear_attention_reference, taylor_feature_dim, \
    taylor_feature_map
from ..ops.memory_rule.common import _no_autocast, compute_dtype
from .based import check_feature_attention_args

__all__ = ["JRTState", "PrefixLinearAttention", "prefix_linear_attention"]


@dataclass
class JRTState:
    """State of a JRT-RNN layer (:class:`PrefixLinearAttention`): the combined (encoder + causal) sums of
    ``v phi(k)^T``, ``kv`` ``[B, H, V, D_phi]``, and of ``phi(k)``, ``k_sum`` ``[B, H, D_phi]``, and ``position``,
    the tokens of the stream seen so far (the prefix is positions ``< prefix_len``). Batch-first, so
    :class:`~mnemos.models.Cache` serialises, reorders and moves it as it is."""

    kv: Tensor
    k_sum: Tensor
    position: int


def prefix_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_enc: Tensor,
    v_enc: Tensor,
    *,
    initial_state: tuple[Tensor, Tensor] | None = None,
    chunk_size: int = 64,
    eps: float = 1e-12,
    impl: Literal["chunked", "reference"] = "chunked",
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Prefix linear attention: causal BASED linear attention over ``q, k, v`` ``[B, T, H, F|F|V]`` whose every
    output also sees the non-causal encoder sums of ``k_enc`` ``[B, M, H, F]``, ``v_enc`` ``[B, M, H, V]`` (any
    M >= 0; M = 0 is plain causal linear attention), on top of ``initial_state`` (``(kv, k_sum)``, zeros when None).

    Returns ``(y [B, T, H, V] in q's dtype, (kv, k_sum))``: the state after the T tokens, encoder sums included."""
    B, _, H, Fd = q.shape
    init = initial_state
    if k_enc.shape[1] > 0:
        cdt = compute_dtype(q.dtype)
        with _no_autocast(q.device):
            phi = taylor_feature_map(k_enc.to(cdt))  # [B, M, H, D_phi]
            kv_enc = torch.einsum("bmhv,bmhd->bhvd", v_enc.to(cdt), phi)  # [B, H, V, D_phi]
            ks_enc = phi.sum(1)  # [B, H, D_phi]
        init = (kv_enc, ks_enc) if init is None else (init[0].to(cdt) + kv_enc, init[1].to(cdt) + ks_enc)
    fn = based_linear_attention_reference if impl == "reference" else based_linear_attention
    y, state = fn(q, k, v, chunk_size=chunk_size, eps=eps, initial_state=init, output_final_state=True,
                  check_values=False)
    return y, state


class PrefixLinearAttention(nn.Module):
    """JRT-RNN's prefix linear attention (see the module docstring).

    Args:
        dim: model width d. heads: H, which must divide d (the value head dim is d / H).
        feature_dim: F, the per-head dim of q, k and k_e before the Taylor map.
        prefix_len: M, the stream's first tokens read by the non-causal encoder (0: none, causal linear attention).
        chunk_size: tokens per chunk of the computation (exact for any value).
        eps: added to the normaliser.
        impl: ``"chunked"`` or ``"reference"`` (the op's token loop, for tests).
    """

    def __init__(self, dim: int, heads: int, *, feature_dim: int = 16, prefix_len: int = 1, chunk_size: int = 64,
                 eps: float = 1e-12, impl: Literal["chunked", "reference"] = "chunked"):
        super().__init__()
        check_feature_attention_args(impl, dim=(dim, 1), heads=(heads, 1), feature_dim=(feature_dim, 1),
                                     prefix_len=(prefix_len, 0), chunk_size=(chunk_size, 1))
        self.dim, self.heads, self.head_dim, self.feature_dim = dim, heads, dim // heads, feature_dim
        self.prefix_len, self.chunk_size, self.eps, self.impl = prefix_len, chunk_size, eps, impl
        self.q_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.k_enc_proj = nn.Linear(dim, heads * feature_dim, bias=False)  # the encoder's keys (the prefix only)
        self.v_enc_proj = nn.Linear(dim, dim, bias=False)  # and values
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch: int, device=None, dtype=None) -> JRTState:
        """Empty sums (float32 under half precision) at position 0 for ``batch`` streams."""
        p = self.q_proj.weight
        device = p.device if device is None else device
        dtype = compute_dtype(p.dtype if dtype is None else dtype)
        D = taylor_feature_dim(self.feature_dim)
        return JRTState(torch.zeros(batch, self.heads, self.head_dim, D, device=device, dtype=dtype),
                        torch.zeros(batch, self.heads, D, device=device, dtype=dtype), 0)

    def forward(self, x: Tensor, state: JRTState | None = None) -> tuple[Tensor, JRTState]:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        if state is not None and not isinstance(state, JRTState):
            raise TypeError(f"state must be a JRTState (see init_state) or None, got {type(state).__name__}")
        B, T, _ = x.shape
        H, Fd, Dv = self.heads, self.feature_dim, self.head_dim
        start = 0 if state is None else state.position
        m = max(0, min(self.prefix_len - start, T))  # this call's prefix tokens: positions start .. start + m - 1
        q = self.q_proj(x).view(B, T, H, Fd)
        k = self.k_proj(x).view(B, T, H, Fd)
        v = self.v_proj(x).view(B, T, H, Dv)
        xp = x[:, :m]
        k_enc = self.k_enc_proj(xp).view(B, m, H, Fd)
        v_enc = self.v_enc_proj(xp).view(B, m, H, Dv)
        o, (kv, k_sum) = prefix_linear_attention(
            q, k, v, k_enc, v_enc, initial_state=None if state is None else (state.kv, state.k_sum),
            chunk_size=self.chunk_size, eps=self.eps, impl=self.impl)
        return self.out_proj(o.reshape(B, T, H * Dv)), JRTState(kv, k_sum, start + T)

    def state_numel(self) -> int:
        """Numbers of the state per sequence: ``H (d / H + 1) D_phi`` (the position counter aside)."""
        return self.heads * (self.head_dim + 1) * taylor_feature_dim(self.feature_dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, feature_dim={self.feature_dim}, prefix_len={self.prefix_len}, "
                f"chunk_size={self.chunk_size}")
