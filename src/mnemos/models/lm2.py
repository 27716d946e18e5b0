"""LM2, "Large Memory Models" (Kang et al. 2025, arXiv 2502.06049), as a *relay* mixer of :class:`MnemosLM`.

Each block keeps its own path, mnemos' sliding-window attention (:class:`mnemos.layers.Attention`, RoPE, window
``model.window``; a window >= the sequence is the paper's full-attention block), and beside it a memory bank ``M`` of
N slots, each d wide (N = ``model.lm2.num_slots``). Segments are N tokens long, counted from the stream's start, and
slot r <-> position r of a segment (the paper's T = N). The paper's equations (/work/shared/specs/recurrent-baselines.md
§3), for the token at position r of its segment, ``E`` the mixer's input (the block's normed input) and ``M`` the bank
this block reads in this segment::

    E_mem_r = softmax_{j<=r}( (E_r W_Q) . (M_j W_K) / sqrt(d) ) (M_j W_V)    read: causal slot mask, slots 0..r
    y_r     = E_attn_r + sigmoid(E_mem_r W_out + b_out) * M_r                the mixer's output (output gate)
    M'_r    = sigmoid(E_r W_in + b_in) * tanh(E_mem_r) + sigmoid(E_mem_r W_f + b_f) * M_r     write: row r

All six W are d x d (W_Q, W_K, W_V without bias; one head); the gates' biases start at 0, so at init they are the
paper's sigmoid(E W). An output-gate bias of -inf (:meth:`LM2Layer.close_output_gate`) gives g_out = 0 exactly: the
block is then its attention alone, the plain SWA block.

**The bank's flow.** Through depth (the paper): within a segment, LM2 block t reads the bank the previous LM2 block
wrote, ``M^t = M'^{t-1}``. Across segments (the spec's reading): the *last* LM2 block's updated bank is the first
LM2 block's bank in the next segment, ``M^first_{s+1} = M'^last_s``; the first segment's is the identity
(``eye(N, d)``, truncated or padded). Row r of every bank depends on the tokens <= r of its segment (and on earlier
segments through the carried bank) only, so the stack is strictly causal.

**How MnemosLM runs it** (the relay protocol, :mod:`mnemos.models.lm`). The bank crosses blocks *and* segments, so
no block can run over a whole call before the next one does (block 0 would need, at segment s + 1, what the last
block writes at segment s). :class:`LM2Layer` therefore declares ``relay_period = N``, and the model, for a stack
with such blocks, cuts every call at the segment boundaries and runs all blocks over each piece before the next;
the mixer takes and returns the side channel, ``forward(x, state, handed) -> (y, state, handed)``: ``handed`` is the
previous LM2 block's updated bank so far in this segment (rows ``0 .. r1 - 1`` at the piece's end r1; None for the
first LM2 block, which reads its own state's bank), and what it returns is its own, for the next. At each segment
end the model gives the last LM2 block's (complete) bank to the first's state (:meth:`LM2Layer.carry`). The model
marks the first LM2 block of a stack (``relay_first``; a mixer alone is a chain of one). No global state: the
hand-over is the model's, explicit, within one call and through the cache between calls. So a plain ``lm2`` stack
and a hybrid one (``model.layers=[lm2, swa, lm2, ...]``: the bank skips the other blocks) behave alike.

State (:class:`LM2State`): the attention's rolling KV cache; ``out`` ``[B, N, d]``, the block's updated bank rows
of the current segment so far (zeros after them); in the first LM2 block also ``bank`` ``[B, N, d]``, the bank it
reads this segment (the carry); the position. So ``(L + 1) N d`` numbers for L LM2 blocks, besides the KV caches.
Why these: a block hands on the whole segment so far (its rows from earlier calls too), so it keeps what it wrote and
the next block keeps nothing of it; the first block keeps its own copy of the carry, since the last block rewrites its
rows from the next segment's first token on. A mixer called alone (no ``MnemosLM``) runs inside one segment and
carries nothing; a call that crosses a segment end is an error.
Each piece recomputes the read's keys and values over the rows it reads (O(N d^2) per decoding step and block,
the projections of the bank not cached).

Not implemented: the authors' code variants (gates from the sequence mean, which leaks the future; no output gate;
the LN + MLP candidate; 8 memory heads; dropout 0.9), and detaching the carried bank between segments within a call
(gradients flow through it; :meth:`mnemos.models.Cache.detach` cuts it between calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Attention, KVCache
from ..ops.memory_rule.common import _no_autocast, compute_dtype

__all__ = ["LM2State", "LM2Layer"]


@dataclass
class LM2State:
    """State of an LM2 block (:class:`LM2Layer`): ``attn``, the sliding-window attention's cache; ``bank``
    ``[B, N, d]``, the bank the first LM2 block of a stack reads in the current segment (None in the others, which
    read what the previous LM2 block hands on); ``out`` ``[B, N, d]``, the block's updated bank rows of the current
    segment so far (zeros after them); ``position``, the tokens seen. Batch-first."""

    attn: KVCache
    bank: Tensor | None
    out: Tensor
    position: int


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in x's dtype (the bank's float32 under half-precision weights)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


class LM2Layer(nn.Module):
    """An LM2 block's mixer: sliding-window attention plus the memory bank beside it (see the module docstring).

    Args:
        dim: model width d. heads: the attention's heads. num_slots: N, the bank's slots = tokens per segment.
        window: the attention's sliding window. rope_base: its RoPE base.

    ``forward(x [B, T, d], state=None, handed=None) -> (y, state, handed)``, with the T tokens inside one segment
    (``MnemosLM`` cuts calls so). ``relay_first`` (set by ``MnemosLM``): whether this is the first LM2 block of its
    stack, which reads the bank in its state; the others read ``handed``.
    """

    def __init__(self, dim: int, heads: int, *, num_slots: int = 64, window: int = 512, rope_base: float = 10000.0):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("num_slots", num_slots), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.dim, self.num_slots = dim, num_slots
        self.relay_period = num_slots  # the relay protocol of MnemosLM: calls cut at multiples of N
        self.relay_first = True  # MnemosLM sets False on every LM2 block of a stack but the first
        self.attn = Attention(dim, heads, window=window, rope_base=rope_base)
        self.q_proj = nn.Linear(dim, dim, bias=False)  # W_Q (on E)
        self.k_proj = nn.Linear(dim, dim, bias=False)  # W_K (on the bank)
        self.v_proj = nn.Linear(dim, dim, bias=False)  # W_V (on the bank)
        self.out_gate = nn.Linear(dim, dim)  # W_out, b_out (on E_mem)
        self.in_gate = nn.Linear(dim, dim)  # W_in, b_in (on E)
        self.forget_gate = nn.Linear(dim, dim)  # W_f, b_f (on E_mem)
        for gate in (self.out_gate, self.in_gate, self.forget_gate):
            nn.init.zeros_(gate.bias)

    @torch.no_grad()
    def close_output_gate(self) -> None:
        """b_out = -inf: g_out = 0 exactly, the block's output is its attention's alone (the bank still flows)."""
        self.out_gate.bias.fill_(-math.inf)

    def initial_bank(self, batch: int, device=None, dtype=None) -> Tensor:
        """The bank of the first segment: ``eye(N, d)`` (truncated or padded), per sequence."""
        return torch.eye(self.num_slots, self.dim, device=device, dtype=dtype).expand(batch, -1, -1).clone()

    def init_state(self, batch: int, device=None, dtype=None) -> LM2State:
        """Position 0: an empty KV cache (``dtype``, the activations'), no rows written, and in the first LM2 block
        the identity bank (float32 under half precision)."""
        p = self.q_proj.weight
        device = p.device if device is None else device
        adt = p.dtype if dtype is None else dtype
        cdt = compute_dtype(adt)
        bank = self.initial_bank(batch, device, cdt) if self.relay_first else None
        out = torch.zeros(batch, self.num_slots, self.dim, device=device, dtype=cdt)
        return LM2State(self.attn.init_state(batch, device, adt), bank, out, 0)

    def carry(self, state: LM2State, bank: Tensor) -> LM2State:
        """The first LM2 block's state for the next segment: ``bank`` ``[B, N, d]``, the bank the last LM2 block of
        the stack finished the segment with (what it handed on), becomes the one this block reads."""
        if not self.relay_first or state.bank is None:
            raise RuntimeError("only the first LM2 block of a stack carries the bank into the next segment")
        if bank.shape != state.bank.shape:
            raise ValueError(f"the carried bank must be {tuple(state.bank.shape)}, got {tuple(bank.shape)}")
        return LM2State(state.attn, bank.to(state.bank.dtype), state.out, state.position)

    def _read(self, e: Tensor, bank: Tensor, r0: int) -> Tensor:
        """E_mem for the queries ``e`` ``[B, P, d]`` at segment positions r0 .. r0 + P - 1, reading the slots up to
        their position of ``bank`` ``[B, r0 + P, d]``."""
        n = bank.shape[1]
        scores = _linear(self.q_proj, e) @ _linear(self.k_proj, bank).transpose(1, 2) / math.sqrt(self.dim)
        later = torch.arange(n, device=e.device)[None, :] > torch.arange(r0, n, device=e.device)[:, None]
        return torch.softmax(scores.masked_fill(later, -math.inf), -1) @ _linear(self.v_proj, bank)  # [B, P, d]

    def forward(
        self, x: Tensor, state: LM2State | None = None, handed: Tensor | None = None
    ) -> tuple[Tensor, LM2State | None, Tensor]:
        """``x [B, T, d]`` (inside one segment) -> ``(y [B, T, d], state, handed)``: ``handed`` in, the previous LM2
        block's updated rows ``[B, >= r1, d]`` of this segment (None in the first LM2 block); out, this block's
        ``[B, r1, d]`` (r1: the segment position after x)."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        if state is not None and not isinstance(state, LM2State):
            raise TypeError(f"state must be an LM2State (see init_state) or None, got {type(state).__name__}")
        B, T, d = x.shape
        N = self.num_slots
        start = 0 if state is None else state.position
        r0 = start % N
        r1 = r0 + T
        if r1 > N:
            raise ValueError(f"an LM2 block runs inside one segment of {N} tokens: {T} tokens from segment position "
                             f"{r0} cross its end (MnemosLM cuts calls at the segment boundaries)")
        if self.relay_first != (handed is None):
            raise ValueError("the first LM2 block of a stack reads its own bank (handed=None); every later one reads "
                             "the bank the previous LM2 block handed on")
        if handed is not None and (handed.ndim != 3 or handed.shape[0] != B or handed.shape[1] < r1
                                   or handed.shape[2] != d):
            raise ValueError(f"handed must be the previous LM2 block's rows [B, >= {r1}, {d}], got "
                             f"{tuple(handed.shape)}")
        a, attn_state = self.attn(x, None if state is None else state.attn)
        with _no_autocast(x.device):
            cdt = compute_dtype(self.q_proj.weight.dtype)
            if handed is not None:
                bank = handed[:, :r1].to(cdt)
            else:
                bank = self.initial_bank(B, x.device, cdt) if state is None else state.bank[:, :r1].to(cdt)
            e = x.to(cdt)
            rows = bank[:, r0:r1]  # M_r of this piece's tokens (slot r <-> position r)
            e_mem = self._read(e, bank[:, :r1], r0)
            mem = torch.sigmoid(_linear(self.out_gate, e_mem)) * rows
            new = torch.sigmoid(_linear(self.in_gate, e)) * torch.tanh(e_mem) + \
                torch.sigmoid(_linear(self.forget_gate, e_mem)) * rows  # M'_r
            out = new if state is None or r0 == 0 else torch.cat([state.out[:, :r0].to(cdt), new], 1)  # [B, r1, d]
        y = a + mem.to(a.dtype)
        if state is None:
            return y, None, out
        kept = torch.cat([out, out.new_zeros(B, N - r1, d)], 1).to(state.out.dtype)
        return y, LM2State(attn_state, state.bank, kept, start + T), out

    def state_numel(self) -> int:
        """Numbers of the bank state per sequence, the formula of docs/MODELS.md: N d (its written rows), N d more
        in the first LM2 block of a stack (the bank it reads); the attention's KV cache aside."""
        return self.num_slots * self.dim * (2 if self.relay_first else 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_slots={self.num_slots}, relay_first={self.relay_first}"
