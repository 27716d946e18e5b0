"""The Titans neural long-term memory as a sequence-mixing layer (Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663).

    x -> Linear q, k, v -> causal depthwise conv (4) -> SiLU -> l2-normalise q, k (and v: value_norm)
    x -> Linear -> theta = max_lr * sigmoid(.), eta = sigmoid(.), alpha = sigmoid(.)     (per token and head)
    (q, k, v, gates, W_0) -> memory rule (mnemos.ops.neural_memory) -> o
    o -> RMSNorm(o) * silu(Linear x) -> Linear -> y

Choices the paper leaves open, and what this layer does:
- Heads: H independent memories of head dim D (the paper's multi-head setting); each head has its own learned W_0.
- Convolution: one depthwise causal conv per q, k and v channel, no bias; SiLU after it on q, k and v; l2-norm on
  q and k, and on v with ``value_norm=True`` (the default): an MLP memory's inner problem is not scale-free, and
  values that outer training grows made it overflow (docs/MODELS.md, "Stability and write strength"); the read goes
  through an RMSNorm, so nothing downstream depends on the values' scale.
- Gates: a linear map of the layer input x (before the conv), with bias, one scalar per token and head:
  ``theta = max_lr * sigmoid(.) * (1 - eta)``, ``eta = sigmoid(.)``, ``alpha = sigmoid(.)``. The factor ``1 - eta``
  (``ema_momentum=True``, the default) makes the momentum an exponential moving average of the gradients, so a
  token's gradient moves the memory by at most max_lr in total, however close to 1 the learned eta gets; with
  ``ema_momentum=False`` theta is the paper's free ``max_lr * sigmoid(.)`` and one token's total step is
  ``theta / (1 - eta)``, up to 100x max_lr at eta = 0.99. max_lr defaults to 0.4 per token (titans-pytorch's
  bound is 1.0), with ``normalize_step=True`` (default) dividing each token's step by max(1, its curvature at the
  anchor) (:func:`mnemos.ops.step_curvature`: 3-6 for the default depth-2 memory, 1 for a matrix memory with unit
  keys), so the bound means the same for any depth; ``max_chunk_lr`` (default 1.0) bounds the summed step of a
  chunk's C tokens, all taken at one anchor: a token's bound is ``min(max_lr, max_chunk_lr / C)`` (0.25 at C = 4,
  0.0625 at C = 16). Without it a chunk of 16 tokens at 0.4 each summed to 6.4 and the memory diverged within the
  sequence (inner loss 2.4 -> 450 on the MQAR preset; docs/MODELS.md).
  Initial biases: sigmoid(0) = 0.5 for theta's and eta's, alpha = sigmoid(-8) ~ 3e-4 (a memory half-life of ~2000
  tokens); the outer model then learns data-dependent gates. Why: all C gradients of a chunk are taken at one
  anchor and add up, so near-identical keys within a chunk (repeated tokens, or MAC's attention outputs) make one
  large step. With the free theta and max_lr 0.1, untrained models diverged within 128 tokens of MQAR; in training
  the learned momentum gate climbed to ~0.9 and the memory diverged, and even at max_lr 0.05 one demo seed in six
  diverged (none with the EMA form; docs/MODELS.md, "Stability and write strength"). Strong initial forgetting
  (~0.02 per token) instead decays an MLP memory towards W = 0, a saddle where its inner gradients vanish.
- Initial memory W_0: learned; hidden layers ``[H, E*D, D]`` with expansion E (default 4), normal init with std
  1/sqrt(D_in); the last layer gets the same init, and with ``residual=True`` (default) M starts near identity + noise.
- Output: RMSNorm per head then a SiLU gate from x (as in Gated DeltaNet, which Titans follows), then a projection.
- Chunk size 4 (the paper's is 16: a fresher anchor and 4x fewer gradients per anchor made recall training faster
  and stable at the larger step; docs/MODELS.md), gradients anchored per chunk; decoding continues the same chunk
  bookkeeping, so token-by-token decoding equals the parallel pass exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import MemoryState, memory_read, neural_memory, step_curvature
from .conv import ShortConvolution
from .norm import GatedRMSNorm


@dataclass
class NeuralMemoryState:
    """Decoding state of one :class:`NeuralMemory` layer: the memory rule's state and the conv's last inputs."""

    memory: MemoryState
    conv: Tensor  # [B, 3 * H * D, conv_size - 1]

    def detach(self) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.detach(), self.conv.detach())

    def to(self, *args, **kwargs) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.to(*args, **kwargs), self.conv.to(*args, **kwargs))


@dataclass
class MemorySettings:
    """What a :class:`NeuralMemory` layer is besides its sizes, each value checked once, here (``__post_init__``).

    The layer builds one from its keyword arguments or takes one whole (``NeuralMemory(dim, heads, config=...)``);
    :class:`mnemos.models.MemoryConfig` is this class with the config's dict round trip and type checks, so a model
    config's ``memory`` section is what its layers take. Errors name the field with the class's ``_where`` prefix
    (``"max_lr must be > 0"`` here, ``"memory.max_lr must be > 0"`` from a model config).

    Defaults are the paper's (arXiv 2501.00663, sec. 4.4 and 5) where it gives one: a depth-2 MLP memory with
    expansion 4, gradients anchored per chunk, a causal conv of width 4 after the q/k/v projections.
    """

    _where = ""  # prefix of the field names in error messages

    depth: int = 2  # 1 = matrix memory; >= 2 = MLP memory (the paper finds deeper memories recall more)
    expansion: int = 4  # hidden width factor of an MLP memory
    residual: bool = True  # M(x) = MLP(x) + x: starts near the identity, which keeps early training stable
    activation: Literal["gelu", "silu"] = "gelu"
    chunk_size: int = 4  # tokens per gradient anchor (paper: 16); larger is faster on CPU but staler (docs/MODELS.md)
    # bound of a token's total inner step theta / (1 - eta), in units of the step's curvature with normalize_step.
    # Chosen from the sweep in docs/MODELS.md ("Stability and write strength"): with unit values, normalised steps
    # and chunk 4, 0.4 let the depth-2 LMM leave the MQAR plateau ~3x sooner than the old 0.01 with no skipped step
    max_lr: float = 0.4
    conv_size: int = 4  # causal depthwise conv after q/k/v (1 = no mixing over time)
    ema_momentum: bool = True  # theta = max_lr * sigmoid(.) * (1 - eta): bounds a token's summed step by max_lr
    # bound of a chunk's summed step (its C tokens' steps are all taken at one anchor): a token's bound is
    # min(max_lr, max_chunk_lr / C). 1.0 keeps the anchored step from increasing the error on the chunk's own keys for
    # any keys (docs/MODELS.md); None: no chunk bound (C * max_lr: the memory diverged within sequences at C 16)
    max_chunk_lr: float | None = 1.0
    value_norm: bool = True  # l2-normalise the values per head, like the keys: the inner problem has one scale
    # divide each token's step by max(1, its curvature at the anchor) (mnemos.ops.step_curvature): the bound above
    # then holds for an MLP memory as for a matrix memory with unit keys (torch path: not in the Triton kernels yet)
    normalize_step: bool = True
    # implementation of the memory rule, passed to mnemos.ops.neural_memory (tests use reference): auto (the Triton
    # kernels where they can run the call, else torch), triton (the kernels or a ValueError naming why not), torch,
    # reference (the token-by-token rule); the delta-rule baselines read reference as their token loop, else chunked
    impl: Literal["auto", "triton", "torch", "reference"] = "auto"

    def __post_init__(self):
        w = self._where
        for name in ("depth", "expansion", "chunk_size", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{w}{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_lr > 0:
            raise ValueError(f"{w}max_lr must be > 0, got {self.max_lr}")
        if self.activation not in ("gelu", "silu"):
            raise ValueError(f"{w}activation must be 'gelu' or 'silu', got {self.activation!r}")
        for name in ("ema_momentum", "normalize_step", "value_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{w}{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_chunk_lr is not None and not self.max_chunk_lr > 0:
            raise ValueError(f"{w}max_chunk_lr must be None or > 0, got {self.max_chunk_lr}")


class NeuralMemory(nn.Module):
    """Titans long-term memory layer: ``forward(x [B, T, dim], state=None) -> (y [B, T, dim], state)``.

    Args:
        dim: model width.
        heads: number of memory heads H.
        head_dim: D per head (default ``dim // heads``).
        config: the memory's :class:`MemorySettings` (a model config's ``memory`` section: already checked).
        **settings: or its fields by keyword (``depth=2, chunk_size=16``; the others take their defaults):
            ``depth`` L, ``expansion``, ``residual``, ``activation``, ``chunk_size`` C, ``max_lr`` (the bound of one
            token's inner step: of theta / (1 - eta) with ``ema_momentum``, else of theta), ``max_chunk_lr`` (each
            token's bound is ``min(max_lr, max_chunk_lr / C)``), ``ema_momentum``, ``conv_size``, ``value_norm``,
            ``normalize_step`` (torch path only), ``impl`` (passed to :func:`mnemos.ops.neural_memory`).
    """

    def __init__(self, dim: int, heads: int = 4, head_dim: int | None = None, *,
                 config: MemorySettings | None = None, **settings):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"heads ({heads}) must divide dim ({dim}) when head_dim is not given")
            head_dim = dim // heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if config is None:
            config = MemorySettings(**settings)  # the checks, in MemorySettings
        elif settings:
            raise TypeError(f"give config or keyword settings, not both (got config and {sorted(settings)})")
        elif not isinstance(config, MemorySettings):
            raise TypeError(f"config must be a MemorySettings (or a MemoryConfig), got {type(config).__name__}")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        for f in dataclasses.fields(MemorySettings):  # self.depth, self.chunk_size, ..., self.impl
            setattr(self, f.name, getattr(config, f.name))
        # the bound of one token's total step: max_lr, or its share of the chunk's summed-step bound if smaller
        self.token_lr = (self.max_lr if self.max_chunk_lr is None
                         else min(self.max_lr, self.max_chunk_lr / self.chunk_size))
        # memory health: when True, each forward stores scalar statistics of its writes in ``last_stats``
        # (see :meth:`_record_stats`); the trainer switches it on for logged steps only
        self.record_stats = False
        self.last_stats: dict[str, float] = {}
        H, D = heads, head_dim
        inner = H * D

        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.conv = ShortConvolution(3 * inner, self.conv_size)
        self.to_gates = nn.Linear(dim, 3 * H)  # theta, eta, alpha logits
        widths = [D] + [self.expansion * D] * (self.depth - 1) + [D]
        self.memory = nn.ParameterList(
            nn.Parameter(torch.empty(H, widths[i + 1], widths[i])) for i in range(self.depth)
        )  # W_0, layer i: [H, D_out, D_in]
        self.to_out_gate = nn.Linear(dim, inner, bias=False)
        self.out_norm = GatedRMSNorm(D)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.memory:
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-1]))
        H = self.heads
        nn.init.normal_(self.to_gates.weight, std=0.02)
        with torch.no_grad():
            self.to_gates.bias[:H].fill_(0.0)  # theta = max_lr / 2
            self.to_gates.bias[H : 2 * H].fill_(0.0)  # eta = 0.5
            self.to_gates.bias[2 * H :].fill_(-8.0)  # alpha ~ 3e-4: a memory half-life of ~2000 tokens

    # ------------------------------------------------------------------------------------------------------------------

    def init_state(self, batch: int, device=None, dtype=None) -> NeuralMemoryState:
        """The state at the start of a stream: W_0 for every sequence, zero momentum, zero conv history."""
        p = self.memory[0]
        device = p.device if device is None else device
        W = tuple(w.to(device).expand(batch, *w.shape) for w in self.memory)  # [B, H, D_out, D_in], tied to W_0
        S = tuple(torch.zeros(batch, *w.shape, device=device, dtype=w.dtype) for w in self.memory)
        mem = MemoryState(W, S, W, 0, self.chunk_size)
        return NeuralMemoryState(mem, self.conv.init_state(batch, device, dtype or p.dtype))

    def _project(self, x: Tensor, conv_state: Tensor | None):
        """x [B, T, dim] -> q, k, v [B, T, H, D], gates [B, T, H] each, new conv state."""
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        qkv, conv_state = self.conv(self.to_qkv(x), conv_state)  # [B, T, 3*H*D]
        q, k, v = F.silu(qkv).view(B, T, 3, H, D).unbind(2)  # 3 x [B, T, H, D]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.value_norm:  # unit targets: the inner problem has one scale whatever the projections learn
            v = F.normalize(v, dim=-1)
        g = self.to_gates(x).view(B, T, 3, H)
        g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g  # gates in float32 at least
        theta = self.token_lr * torch.sigmoid(g[:, :, 0])
        eta, alpha = torch.sigmoid(g[:, :, 1]), torch.sigmoid(g[:, :, 2])
        if self.ema_momentum:  # S is a moving average of -lr * gradient: one token's summed step is <= max_lr
            theta = theta * (1.0 - eta)
        return q, k, v, theta, eta, alpha, conv_state

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        B, T, H, D = o.shape
        gate = self.to_out_gate(x).view(B, T, H, D)
        return self.out_proj(self.out_norm(o.to(gate.dtype), gate).reshape(B, T, H * D))

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """Run the layer over x ``[B, T, dim]``, continuing ``state`` when given; returns ``(y, state after x)``."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        q, k, v, theta, eta, alpha, conv_state = self._project(x, None if state is None else state.conv)
        # the layer computes the op's inputs itself: no value checks (no GPU syncs; an overflow gives non-finite y)
        kwargs = dict(chunk_size=self.chunk_size, residual=self.residual, activation=self.activation, impl=self.impl,
                      check_values=False, normalize_step=self.normalize_step)
        if state is None:
            o, mem = neural_memory(q, k, v, theta, eta, alpha, tuple(self.memory), output_final_state=True, **kwargs)
        else:
            o, mem = neural_memory(q, k, v, theta, eta, alpha, initial_state=state.memory, output_final_state=True, **kwargs)
        if self.record_stats:
            start = tuple(self.memory) if state is None else state.memory.weights
            self._record_stats(q, k, v, theta, eta, alpha, o, start, mem.weights)
        return self._output(x, o), NeuralMemoryState(mem, conv_state)

    @torch.no_grad()
    def _record_stats(self, q, k, v, theta, eta, alpha, o, start, end) -> None:
        """Scalar health statistics of one forward, in ``self.last_stats`` (floats; one host sync, logged steps only).

        - ``theta_*``, ``eta_*``, ``alpha_*``: mean and max of the gates over tokens and heads;
        - ``step_max``: the largest total step one token's gradient takes, theta / (1 - eta) (<= max_lr with
          ``ema_momentum``);
        - ``inner_loss_start`` / ``inner_loss``: mean ||M(k_t) - v_t||^2 under the memory at the start of the call and
          after its last write (how much of what was written the memory holds);
        - ``memory_norm``: Frobenius norm of the weights after the call (all layers, mean over sequences and heads);
        - ``write_fraction``: RMS(o - M(q; W_start)) / RMS(o): the share of the read that the writes contributed;
        - ``curvature_max``: the largest :func:`mnemos.ops.step_curvature` of the keys under the final memory (1 for
          a matrix memory with unit keys): a token's step moves its own answer by up to step x curvature.
        """
        read = dict(residual=self.residual, activation=self.activation)
        q, k, v, o = (t.float() for t in (q, k, v, o))
        end = tuple(w.detach().float() for w in end)
        start = tuple(w.detach().float() for w in start)
        step = theta / (1.0 - eta).clamp_min(1e-6)
        o_start = memory_read(q, start, **read)
        norm2 = sum(w.pow(2).sum(dim=(-2, -1)) for w in end)  # [B, H]
        stats = torch.stack([
            theta.mean(), theta.max(), eta.mean(), eta.max(), alpha.mean(), alpha.max(), step.max(),
            (memory_read(k, start, **read) - v).pow(2).sum(-1).mean(),
            (memory_read(k, end, **read) - v).pow(2).sum(-1).mean(),
            norm2.sqrt().mean(),
            (o - o_start).pow(2).mean().sqrt() / o.pow(2).mean().sqrt().clamp_min(1e-12),
            step_curvature(k, v, end, **read).max(),
        ]).tolist()
        names = ("theta_mean", "theta_max", "eta_mean", "eta_max", "alpha_mean", "alpha_max", "step_max",
                 "inner_loss_start", "inner_loss", "memory_norm", "write_fraction", "curvature_max")
        self.last_stats = dict(zip(names, stats))

    def step(self, x: Tensor, state: NeuralMemoryState) -> tuple[Tensor, NeuralMemoryState]:
        """One decoding step: x ``[B, dim]`` -> ``(y [B, dim], state)``; equal to the parallel pass token for token."""
        if x.ndim != 2:
            raise ValueError(f"x must be [B, {self.dim}] for step, got shape {tuple(x.shape)}")
        y, state = self.forward(x.unsqueeze(1), state)
        return y.squeeze(1), state

    def retrieve(self, x: Tensor, state: NeuralMemoryState | None = None) -> Tensor:
        """Read the memory with x's queries and no update (MAC's retrieval): ``[B, T, dim] -> [B, T, H, D]``.

        Reads the memory as it stands in ``state`` (W_0 when None). Uses the query path only: the conv runs from the
        state's conv history but the state is not advanced.
        """
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        q = self._project(x, None if state is None else state.conv)[0]
        W = tuple(self.memory) if state is None else state.memory.weights
        return memory_read(q, W, residual=self.residual, activation=self.activation)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, depth={self.depth}, "
            f"expansion={self.expansion}, residual={self.residual}, activation={self.activation!r}, "
            f"chunk_size={self.chunk_size}, max_lr={self.max_lr}, max_chunk_lr={self.max_chunk_lr}, "
            f"ema_momentum={self.ema_momentum}, value_norm={self.value_norm}, normalize_step={self.normalize_step}"
        )
