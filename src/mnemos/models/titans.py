"""The Titans token mixers (Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to Memorize at Test Time",
arXiv 2501.00663, sec. 4): LMM, MAC, MAG and MAL, built from :class:`~mnemos.layers.NeuralMemory` (long-term
memory), :class:`~mnemos.layers.Attention` (short-term memory) and learned persistent tokens.

Every mixer follows the block contract (``forward(x, state=None) -> (y, state)``, ``init_state``); the choices the
paper leaves open are listed in each class docstring and in docs/MODELS.md. Each takes its memory's settings as
``memory_config`` (a :class:`~mnemos.layers.MemorySettings`: a model config's ``memory``, as the registry passes it)
or as :class:`~mnemos.layers.NeuralMemory`'s keyword settings (``depth=2, chunk_size=8``), the memory rule included
(``rule="memora"``: every mixer runs any rule of the family; the memory's reads outside the op, MAC's retrieval, go
through the rule's effective weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Attention, MemorySettings, NeuralMemory, NeuralMemoryState, RMSNorm
from ..ops import MemoryState
from .cache import MACState, MAGState, MALState

__all__ = ["LongTermMemory", "MemoryAsContext", "MemoryAsGate", "MemoryAsLayer", "mac_attention_mask"]


class LongTermMemory(nn.Module):
    """LMM: the neural memory as the only token mixer, with persistent memory as a learned prefix.

    ``y = NeuralMemory([p_1 .. p_Np || x])[Np:]``: the N_p persistent tokens (learned, ``[N_p, d]``, in the
    mixer's input space) are written into the memory before the first real token of every stream, and their outputs
    are dropped. Their effect is a learned, input-independent starting state (beyond W_0: momentum, conv history
    and chunk phase included). ``init_state`` runs that prefix, so streaming and the parallel pass agree exactly.
    """

    def __init__(self, dim: int, heads: int, *, num_persistent: int = 0, memory_config: MemorySettings | None = None,
                 **memory_kwargs):
        super().__init__()
        self.memory = NeuralMemory(dim, heads, config=memory_config, **memory_kwargs)
        self.num_persistent = num_persistent
        # the mixer sees RMS-normalised inputs (unit scale per element), so the prefix starts at that scale
        self.persistent = nn.Parameter(torch.randn(num_persistent, dim)) if num_persistent else None

    def _prefix(self, batch: int, dtype: torch.dtype) -> Tensor:
        # contiguous: a bf16 matmul under autocast can round a strided (expanded) input differently from the same rows
        # inside the parallel pass's concatenation, and the stream must see what that pass sees
        return self.persistent.to(dtype).expand(batch, -1, -1).contiguous()  # [B, Np, d]

    def init_state(self, batch: int, device=None, dtype=None) -> NeuralMemoryState:
        state = self.memory.init_state(batch, device, dtype)
        if self.persistent is None:
            return state
        dtype = self.persistent.dtype if dtype is None else dtype
        _, state = self.memory(self._prefix(batch, dtype), state)
        return state

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        if state is not None:
            return self.memory(x, state)
        if self.persistent is None:
            return self.memory(x)
        y, state = self.memory(torch.cat([self._prefix(x.shape[0], x.dtype), x], dim=1))  # [B, Np + T, d]
        return y[:, self.num_persistent :], state


def mac_attention_mask(offset: int, n: int, num_persistent: int, device=None) -> Tensor:
    """MAC's attention mask, boolean ``[n, P + 2m]`` with ``m = offset + n``, True = visible.

    Keys are ``[persistent (P) || h_1..h_m || x_1..x_m]`` of the current segment; the n queries are the segment's
    tokens at positions ``offset .. offset + n - 1``. Query i sees every persistent key, the retrieved token h_j and
    the token x_j for ``j <= i`` only: h_j is read with token j's query, so it carries token j's content and a query
    that saw h_j for j > i would see the future.
    """
    m = offset + n
    qpos = torch.arange(offset, m, device=device)[:, None]  # [n, 1]
    kpos = torch.arange(m, device=device)[None, :]  # [1, m]
    causal = kpos <= qpos  # [n, m]
    return torch.cat([causal.new_ones(n, num_persistent), causal, causal], dim=1)  # [n, P + 2m]


class MemoryAsContext(nn.Module):
    """MAC: memory as a context. Tokens are processed in segments of N; for segment s (paper eq. 21-25)::

        h_t = M_{s-1}(q_t)                          retrieve: memory as it stood after segment s-1, no update
        y   = Attn([persistent || h || x_seg])      attention local to the segment, causal in h and x alike
        memory_residual=True (default): the memory is a residual layer on the mixer's input
            m_t = M_t(q(u_t)),  M_t = write(M_{t-1}, u_t),  u = RMSNorm(x)
            o_t = y_t + m_t
        memory_residual=False (the paper's eq. 24-25):
            m_t = M_t(q(u_t)),  M_t = write(M_{t-1}, u_t),  u = RMSNorm(y)
            o_t = y_t * sigmoid(m_t)                the paper's y ⊗ M(y)

    Choices the paper leaves open:

    - What the memory is written with, and how its read meets the output. The paper writes the attention output y
      and gates y with the read. On MQAR (64 tokens, 8 pairs, segments of 32) that form stayed on the 1/K plateau
      (0.136 at step 1500, seed 0) while the LMM left it by step 600-900: at initialisation the attention averages its
      segment, so keys and values computed from y do not identify their tokens, and a gate cannot carry a value the
      read found. Written with the segment's own (normalised) input, the tokens its retrieval queries come from, and
      with its read added to the output, MAC left the plateau with the LMM on one seed (0.60 at step 500), though
      not on every draw (docs/MODELS.md). That is the default; ``memory_residual=False`` keeps the paper's form (and
      that of checkpoints saved before).
    - Causality: the paper prepends h to the segment as visible context, but h_j is computed from token j. Here
      query i sees h_j only for j <= i (:func:`mac_attention_mask`; persistent tokens are visible to all), so the
      model is strictly causal and decoding equals the parallel pass.
    - h enters the attention as tokens: the read ``[B, n, H, D]`` is mapped to model width by ``retrieved_proj``,
      then through the attention's own k/v projections. The retrieval queries' conv (the memory's) runs over the
      stream of mixer inputs x, across segment boundaries.
    - Positions: RoPE counts from the segment start (h_j and x_j both at position j). Persistent keys are not
      rotated, so their scores depend on the query's own position: counting per segment makes every segment see
      them alike, and keeps angles small on long streams.
    - In the paper's form, ⊗ is ``y * sigmoid(m)``: the memory's read gates the attention output channel by channel,
      and the memory is written with ``RMSNorm(y)``, not y: like every other memory input it is normalised (the
      memory's gates are initialised for unit-scale inputs; raw attention outputs drove its momentum gate to 1 and
      the memory diverged in training).
    - Persistent tokens are learned keys/values of the attention (``attn.persistent_k/v``), not written into the
      memory.
    - Attention is local to the segment: segment s sees nothing of earlier segments except through the memory.
    - In the residual form the attention's output projection starts at ``attn_init_scale`` times its default init
      (``mac_attn_init_scale``, 0 in configs): the block starts as its memory alone and the attention grows in. At
      the default init the segment attention, which averages its segment at first and gives the "any value from the
      context" answer, took half of every output and MAC sat on the MQAR 1/K plateau (study setting, seed 0: .136 at
      step 1500); from 0, seeds 0 / 1 / 2 reached .933 / .909 / .377 (docs/MODELS.md). In the trained plateau model
      the second segment's tokens had collapsed onto one direction in the second layer (mean pairwise cosine .89 of
      its inputs, .999 of the attention's outputs).

    Decoding memory is O(N): the memory state, the segment-start weights and at most N - 1 tokens of K/V.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        segment_len: int,
        num_persistent: int = 0,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-6,
        memory_residual: bool = True,
        attn_init_scale: float = 1.0,
        memory_config: MemorySettings | None = None,
        **memory_kwargs,
    ):
        super().__init__()
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        if not (math.isfinite(attn_init_scale) and attn_init_scale >= 0):
            raise ValueError(f"attn_init_scale must be a finite number >= 0, got {attn_init_scale}")
        self.segment_len = segment_len
        self.memory_residual = memory_residual
        self.memory = NeuralMemory(dim, heads, config=memory_config, **memory_kwargs)
        self.attn = Attention(dim, heads, num_persistent=num_persistent, rope_base=rope_base)
        self.retrieved_proj = nn.Linear(self.memory.heads * self.memory.head_dim, dim, bias=False)
        self.write_norm = RMSNorm(dim, norm_eps)
        self.tail = self.memory.conv.kernel_size - 1  # x history the retrieval queries' conv needs
        if memory_residual and attn_init_scale != 1.0:  # the paper's form keeps it: its gate scales y, so y must not be 0
            with torch.no_grad():
                self.attn.o_proj.weight.mul_(attn_init_scale)  # no random numbers drawn: the other weights are as at 1

    def init_state(self, batch: int, device=None, dtype=None) -> MACState:
        p = self.attn.q_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        memory = self.memory.init_state(batch, device, dtype)
        empty = torch.zeros(batch, 0, self.attn.n_heads, self.attn.head_dim, device=device, dtype=dtype)
        x_tail = torch.zeros(batch, self.tail, self.attn.d_model, device=device, dtype=dtype)
        kv = None if self.attn.kv_policy is None else self.attn.init_state(batch, device, dtype)  # mnemos.kv
        if kv is not None and not callable(getattr(kv, "reset", None)):
            raise ValueError(f"MAC empties its KV cache at every segment boundary: the policy's cache "
                             f"({type(kv).__name__}) needs a reset() method")
        return MACState(memory, memory.memory.weights, x_tail, empty, empty.clone(), empty.clone(), empty.clone(), kv)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        """x ``[B, T, d]`` -> ``(y [B, T, d], state)``; x is cut at segment boundaries and run piece by piece."""
        if x.ndim != 3 or x.shape[-1] != self.attn.d_model:
            raise ValueError(f"x must be [B, T, {self.attn.d_model}], got shape {tuple(x.shape)}")
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        outs, t, T = [], 0, x.shape[1]
        while t < T:
            n = min(self.segment_len - state.segment_offset, T - t)
            y, state = self._piece(x[:, t : t + n], state)
            outs.append(y)
            t += n
        return torch.cat(outs, dim=1), state

    def _retrieve(self, xs: Tensor, state: MACState) -> Tensor:
        """h ``[B, n, d]``: the segment-start memory read with the queries of the n newest of xs ``[B, tail + n, d]``.

        retrieve reads only ``.weights`` of the memory state. The queries' conv history is carried as raw inputs
        (``x_tail``, the first ``tail`` rows of xs); zeros before them equal zero inputs, as the q/k/v projection has
        no bias, so the conv itself starts from zeros.
        """
        B = xs.shape[0]
        W = state.segment_memory
        conv0 = self.memory.conv.init_state(B, xs.device, xs.dtype)
        read_state = NeuralMemoryState(MemoryState(W, W, W, 0, self.memory.chunk_size), conv0)
        h = self.memory.retrieve(xs, read_state)[:, self.tail :]  # [B, n, H, D]
        return self.retrieved_proj(h.reshape(B, h.shape[1], -1))  # [B, n, H * D] -> [B, n, d]

    def _attend(self, x: Tensor, h: Tensor, state: MACState) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Segment attention over [persistent || h || x] (causal in h and x); returns y [B, n, d] and new buffers."""
        a = self.attn
        B, n, _ = x.shape
        H, D, off = a.n_heads, a.head_dim, state.segment_offset
        q = a.rope(a.q_proj(x).view(B, n, H, D), offset=off)  # [B, n, H, D]
        if state.kv is not None:
            return self._attend_cached(x, h, q, state)
        k_x = torch.cat([state.k_x, a.rope(a.k_proj(x).view(B, n, H, D), offset=off)], dim=1)  # [B, m, H, D]
        v_x = torch.cat([state.v_x, a.v_proj(x).view(B, n, H, D)], dim=1)
        k_h = torch.cat([state.k_h, a.rope(a.k_proj(h).view(B, n, H, D), offset=off)], dim=1)  # h_j at position j
        v_h = torch.cat([state.v_h, a.v_proj(h).view(B, n, H, D)], dim=1)
        keys, values = [k_h, k_x], [v_h, v_x]
        if a.persistent_k is not None:
            keys.insert(0, a.persistent_k.to(k_x.dtype).expand(B, -1, -1, -1))  # [B, P, H, D]
            values.insert(0, a.persistent_v.to(v_x.dtype).expand(B, -1, -1, -1))
        k, v = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # [B, P + 2m, H, D]
        mask = mac_attention_mask(off, n, a.num_persistent, x.device)  # [n, P + 2m]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        y = a.o_proj(o.transpose(1, 2).reshape(B, n, H * D))  # [B, H, n, D] -> [B, n, H * D] -> [B, n, d]
        return y, (k_h, v_h, k_x, v_x)

    def _attend_cached(self, x: Tensor, h: Tensor, q: Tensor, state: MACState) -> tuple[Tensor, tuple[Tensor, ...]]:
        """:meth:`_attend` under a KV policy: the segment's tokens through the policy's cache ``state.kv`` (which
        may keep a subset, at their positions in the segment), the retrieved tokens h all kept beside them and left
        out of its scores. Query i sees the persistent keys, h_j for j <= i and the kept x_j with j <= i."""
        a, kv = self.attn, state.kv
        B, n, _ = x.shape
        H, Hkv, D, off = a.n_heads, a.n_kv_heads, a.head_dim, state.segment_offset
        if kv.seen_tokens != off:
            raise ValueError(f"MAC's KV cache has seen {kv.seen_tokens} tokens of the segment, its state {off}")
        k_new = a.rope(a.k_proj(x).view(B, n, Hkv, D), offset=off)  # [B, n, Hkv, D]
        k_x, v_x, pos = kv.update_view(k_new, a.v_proj(x).view(B, n, Hkv, D), q=q)  # [B, S, Hkv, D]
        k_h = torch.cat([state.k_h, a.rope(a.k_proj(h).view(B, n, Hkv, D), offset=off)], dim=1)  # [B, m, Hkv, D]
        v_h = torch.cat([state.v_h, a.v_proj(h).view(B, n, Hkv, D)], dim=1)
        m, S = k_h.shape[1], k_x.shape[1]
        if pos is None:  # a contiguous run ending at the new tokens
            pos = torch.arange(m - S, m, device=x.device)[None, :, None].expand(B, S, Hkv)
        qpos = torch.arange(off, m, device=x.device)  # [n]
        seen_x = pos.permute(0, 2, 1)[:, :, None, :] <= qpos[None, None, :, None]  # [B, Hkv, n, S]
        seen_h = (torch.arange(m, device=x.device)[None, :] <= qpos[:, None]).expand(B, Hkv, n, m)
        keys, values, masks = [k_h, k_x], [v_h, v_x], [seen_h, seen_x]
        if a.persistent_k is not None:
            keys.insert(0, a.persistent_k.to(k_x.dtype).expand(B, -1, -1, -1))  # [B, P, Hkv, D]
            values.insert(0, a.persistent_v.to(v_x.dtype).expand(B, -1, -1, -1))
            masks.insert(0, seen_h.new_ones(B, Hkv, n, a.num_persistent))
        k, v = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # [B, P + m + S, Hkv, D]
        mask = torch.cat(masks, dim=-1).repeat_interleave(H // Hkv, dim=1)  # [B, H, n, P + m + S]
        k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        y = a.o_proj(o.transpose(1, 2).reshape(B, n, H * D))
        empty = state.k_x  # stays empty: the policy's cache holds the segment's tokens
        return y, (k_h, v_h, empty, empty)

    def _piece(self, x: Tensor, state: MACState) -> tuple[Tensor, MACState]:
        """Tokens that all belong to the current segment: retrieve -> attend -> write and read the memory."""
        xs = torch.cat([state.x_tail.to(x.dtype), x], dim=1)  # [B, tail + n, d]
        h = self._retrieve(xs, state)
        y, (k_h, v_h, k_x, v_x) = self._attend(x, h, state)
        u = self.write_norm(x if self.memory_residual else y)
        m, memory = self.memory(u, state.memory)  # write u_t, read M_t(q(u_t)) after the write
        out = y + m if self.memory_residual else y * torch.sigmoid(m)
        x_tail = xs[:, x.shape[1] :].clone()  # [B, tail, d]; a copy, so the state does not pin all of xs
        if k_h.shape[1] == self.segment_len:  # segment complete: the next one reads the memory as it is now
            empty = k_h.new_zeros(k_h.shape[0], 0, *k_h.shape[2:])  # fresh, not views that would pin the buffers
            if state.kv is not None:
                state.kv.reset()  # the policy's cache starts the next segment empty
            return out, MACState(memory, memory.memory.weights, x_tail, empty, empty, empty, empty, state.kv)
        return out, MACState(memory, state.segment_memory, x_tail, k_h, v_h, k_x, v_x, state.kv)


class MemoryAsGate(nn.Module):
    """MAG: memory as a gate. Two branches over the same input, each normalised, mixed by a data-dependent gate::

        y_a = SWA([persistent || x])          sliding-window attention; persistent keys visible to all
        y_m = NeuralMemory(x)                 the long-term memory, read after each token's write
        g   = sigmoid(W_g x + b_g)            per token and channel
        o   = g * RMSNorm_a(y_a) + (1 - g) * RMSNorm_m(y_m)

    Choices the paper leaves open: the paper writes ``o = y ⊗ M(x~)`` with both outputs normalised by learned
    vector weights and a non-linearity; here the non-linear combination is a sigmoid gate computed from the mixer
    input (a convex mix per channel). The gate starts memory-weighted, ``b_g = gate_bias`` (-2: 0.12 attention,
    0.88 memory): started even (b_g = 0), the attention branch, which cannot reach beyond its window, carries half
    of every output, and MAG stayed on the MQAR plateau to step ~1300 against ~600-800 at -2 (docs/MODELS.md).
    Persistent tokens enter the attention as learned keys/values only; the memory starts from its learned W_0.
    Decoding memory is O(window).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        window: int,
        num_persistent: int = 0,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-6,
        gate_bias: float = -2.0,
        memory_config: MemorySettings | None = None,
        **memory_kwargs,
    ):
        super().__init__()
        self.attn = Attention(dim, heads, window=window, num_persistent=num_persistent, rope_base=rope_base)
        self.memory = NeuralMemory(dim, heads, config=memory_config, **memory_kwargs)
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.memory_norm = RMSNorm(dim, norm_eps)
        self.gate = nn.Linear(dim, dim)
        nn.init.constant_(self.gate.bias, gate_bias)

    def init_state(self, batch: int, device=None, dtype=None) -> MAGState:
        return MAGState(self.attn.init_state(batch, device, dtype), self.memory.init_state(batch, device, dtype))

    def forward(self, x: Tensor, state: MAGState | None = None) -> tuple[Tensor, MAGState | None]:
        y_a, kv = self.attn(x, None if state is None else state.attn)
        y_m, memory = self.memory(x, None if state is None else state.memory)
        g = torch.sigmoid(self.gate(x))
        y = g * self.attn_norm(y_a) + (1 - g) * self.memory_norm(y_m)
        return y, (None if state is None else MAGState(kv, memory))


class MemoryAsLayer(nn.Module):
    """MAL: memory as a layer, then sliding-window attention (paper eq. 29-31: ``y = M(x)``, ``o = SWA(y)``)::

        m = M(x)                                    the long-term memory, read after each token's write
        o = m + SWA([persistent || RMSNorm(x + m)])     memory_residual=True (default)
        o = SWA([persistent || RMSNorm(m)])             memory_residual=False

    Choices the paper leaves open: how the two layers meet the residual stream. By default each is a residual layer
    of its own: the memory's read joins the stream and the attention reads the stream after it (the block's residual
    adds x), as when two layer types are stacked. With ``memory_residual=False`` (the form before, and of checkpoints
    saved without the key) the read reaches the stream only through the attention: at initialisation the attention
    spreads each token over its window, so a token's own read arrives mixed with its neighbours' reads, which on
    MQAR are the answers to neighbouring queries; MAL then sat on the 1/K plateau until the attention learned to
    single out its own position, which took 500 to more than 1500 steps depending on the seed (docs/MODELS.md).
    An RMSNorm sits between the two (the attention sees normalised inputs, as after any pre-norm); persistent tokens
    enter the attention as learned keys/values, not the memory. Decoding memory is O(window).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        window: int,
        num_persistent: int = 0,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-6,
        memory_residual: bool = True,
        memory_config: MemorySettings | None = None,
        **memory_kwargs,
    ):
        super().__init__()
        self.memory_residual = memory_residual
        self.memory = NeuralMemory(dim, heads, config=memory_config, **memory_kwargs)
        self.mid_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, heads, window=window, num_persistent=num_persistent, rope_base=rope_base)

    def init_state(self, batch: int, device=None, dtype=None) -> MALState:
        return MALState(self.memory.init_state(batch, device, dtype), self.attn.init_state(batch, device, dtype))

    def forward(self, x: Tensor, state: MALState | None = None) -> tuple[Tensor, MALState | None]:
        m, memory = self.memory(x, None if state is None else state.memory)
        y, kv = self.attn(self.mid_norm(x + m if self.memory_residual else m), None if state is None else state.attn)
        return (m + y if self.memory_residual else y), (None if state is None else MALState(memory, kv))
