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
- Initial q / k (``qk_init="successor"``, the default): W_k starts as a copy of W_q, and the conv with +1 on the
  current token's tap for q and v and on the previous token's for k, so the key written at token t + 1 matches the
  query of token t from the first step: the memory starts out storing each token's successor under that token's
  query (MQAR's key -> value; an induction head's lookup in text). Outer training had to find that alignment itself
  before: in one head of the first layer of every model that recalled, at a step that varied with the seed from
  ~500 to beyond 6000 (docs/MODELS.md, "How the memory learns to recall"). ``"random"``: the plain inits.
- Gates: a linear map of the layer input x (before the conv), with bias, one scalar per token and head:
  ``theta = max_lr * sigmoid(.) * (1 - eta)``, ``eta = sigmoid(.)``, ``alpha = sigmoid(.)``. The factor ``1 - eta``
  (``ema_momentum=True``, the default) makes the momentum an exponential moving average of the gradients, so a
  token's gradient moves the memory by at most max_lr in total, however close to 1 the learned eta gets; with
  ``ema_momentum=False`` theta is the paper's free ``max_lr * sigmoid(.)`` and one token's total step is
  ``theta / (1 - eta)``, up to 100x max_lr at eta = 0.99. That bound assumes the later etas do not rise; with
  ``momentum_clock=True`` (the default) the op's eta is ``eta_t * min(1, (1 - eta_t) / (1 - eta_(t-1)))``, so momentum
  charged at a low eta slows to a later, higher eta's rate and every gradient's total step is at most 2 max_lr for any
  gates (the layer's state carries the last token's gate for it). max_lr defaults to 0.4 per token (titans-pytorch's
  bound is 1.0), with ``normalize_step=True`` (default) dividing each token's step by max(1, its curvature at the
  anchor) (:func:`mnemos.ops.step_curvature`: 3-6 for the default depth-2 memory, 1 for a matrix memory with unit
  keys), so the bound means the same for any depth; ``max_chunk_lr`` (default 1.0) bounds the summed step of a
  chunk's C tokens, all taken at one anchor: a token's bound is ``min(max_lr, max_chunk_lr / C)`` (0.25 at C = 4,
  0.0625 at C = 16). Without it a chunk of 16 tokens at 0.4 each summed to 6.4 and the memory diverged within the
  sequence (inner loss 2.4 -> 450 on the MQAR preset; docs/MODELS.md).
  Initial biases: sigmoid(0) = 0.5 for theta's and eta's, alpha = sigmoid(-8) ~ 3e-4 (a memory half-life of ~2000
  tokens); the outer model then learns data-dependent gates. ``write_floor`` / ``forget_floor`` f > 0 replace
  theta's and alpha's sigmoid by ``relu(sigmoid(.) - f) / (1 - f)``, which can be exactly 0 (default 0: the
  sigmoid). Why the bounds: all C gradients of a chunk are taken at one anchor and add up, so near-identical keys
  within a chunk (repeated tokens, or MAC's attention outputs) make one large step. With the free theta and max_lr
  0.1, untrained models diverged within 128 tokens of MQAR; in training
  the learned momentum gate climbed to ~0.9 and the memory diverged, and even at max_lr 0.05 one demo seed in six
  diverged (none with the EMA form; docs/MODELS.md, "Stability and write strength"). Strong initial forgetting
  (~0.02 per token) instead decays an MLP memory towards W = 0, a saddle where its inner gradients vanish.
- Initial memory W_0: learned; hidden layers ``[H, E*D, D]`` with expansion E (default 4), normal init with std
  1/sqrt(D_in); the last layer gets the same init, and with ``residual=True`` (default) M starts near identity + noise.
- Output: RMSNorm per head then a SiLU gate from x (as in Gated DeltaNet, which Titans follows), then a projection.
- Chunk size 4 (the paper's is 16: a fresher anchor and 4x fewer gradients per anchor made recall training faster
  and stable at the larger step; docs/MODELS.md), gradients anchored per chunk; decoding continues the same chunk
  bookkeeping, so token-by-token decoding equals the parallel pass exactly.
- The rule: Titans' by default; ``rule`` (a preset of :data:`mnemos.ops.RULES`) and the per-axis settings pick any
  rule of the family (Miras, Atlas; docs/MEMORY_RULE.md, "Rules in models"). The layer then makes the gates that rule
  needs, from x like the others, per token and head: ``delta = max(softplus(W_delta x + b_delta), 1e-4)`` > 0 for the
  huber loss (bias init softplus^-1(1): delta = 1), ``gamma = sigmoid(W_gamma x + b_gamma)`` in [0, 1] for an Omega
  window w > 1 (bias init -log(w - 1): gamma = 1/w, a token's weights over the w writes that fit it summing to 1);
  ``momentum=False`` fixes eta = 0; ``poly_degree`` p > 0 feeds the memory Atlas' polynomial features of q and k
  (``[sqrt(a_i) vec(x^(x)i)]_{i <= p}``, learned a_i > 0 per head from 1/i!; Atlas' degree is 2). W_0 is then the
  initial accumulator A_0, and every read outside the op (MAC's retrieval, :meth:`retrieve`, the statistics) goes
  through ``effective_weights`` (:meth:`read_weights`). Titans' layer has no extra parameter and computes what it did
  before the rule existed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import RULES, MemoryRule, MemoryState, effective_weights, memory_read, neural_memory, step_curvature
from ..ops.memory_rule import chunked_unsupported_reason, torch_unsupported_reason
from ..ops.memory_rule.backends import auto_opt_out_reason, kernels_unsupported_reason
from .conv import QK_INITS, ShortConvolution, successor_init_
from .norm import GatedRMSNorm


# the Huber threshold delta = softplus(z) starts at 1 (z = its bias, softplus^-1(1)) and stays above DELTA_MIN
DELTA_BIAS = math.log(math.e - 1.0)
DELTA_MIN = 1e-4


def floored_sigmoid(z: Tensor, floor: float) -> Tensor:
    """``relu(sigmoid(z) - floor) / (1 - floor)``: a gate in [0, 1] that is exactly 0 wherever ``sigmoid(z) <=
    floor`` (no gradient there) and 1 at ``z -> inf``; ``floor = 0`` is ``sigmoid(z)`` itself, bit for bit."""
    s = torch.sigmoid(z)
    return s if floor == 0 else F.relu(s - floor) / (1.0 - floor)


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow for any finite x


@dataclass
class NeuralMemoryState:
    """Decoding state of one :class:`NeuralMemory` layer: the memory rule's state and the conv's last inputs."""

    memory: MemoryState
    conv: Tensor  # [B, 3 * H * D, conv_size - 1]
    # the momentum clock's last token, -log(1 - eta) per sequence and head [B, H] (``momentum_clock``; None: off, or
    # a stream's start, where it is 0)
    clock: Tensor | None = None

    def detach(self) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.detach(), self.conv.detach(),
                                 None if self.clock is None else self.clock.detach())

    def to(self, *args, **kwargs) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.to(*args, **kwargs), self.conv.to(*args, **kwargs),
                                 None if self.clock is None else self.clock.to(*args, **kwargs))


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
    # with ema_momentum (and momentum), the momentum carried into token t is scaled by min(1, (1 - eta_t) /
    # (1 - eta_(t-1))): eta_t' = eta_t * that. The same rule while eta is constant; when a token's eta rises above the
    # previous token's, the momentum charged at the lower eta is scaled to the new one's rate. Without it a gradient's
    # total step is bounded by max_lr only while the later etas do not rise: momentum charged at eta ~ .5 and then
    # carried by eta ~ .999 kept moving the memory for hundreds of tokens (inner loss 2.9 -> 103 within a sequence,
    # zero skipped steps; docs/MODELS.md, "The momentum clock"). With it every gradient's total step is <= 2 max_lr
    # for any gates
    momentum_clock: bool = True
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
    # the memory rule (mnemos.ops.MemoryRule; docs/MEMORY_RULE.md): a preset of mnemos.ops.RULES, "titans" (l2 loss,
    # decay, momentum, window 1), "moneta", "yaad", "memora", "omeganet", "atlas", "linear_attention", "deltanet"; each
    # axis below overrides the preset's value where set (None: the preset's own), and :attr:`memory_rule` resolves the
    # two to one MemoryRule
    rule: str = "titans"
    loss: Literal["l2", "dot", "lp", "huber"] | None = None  # the attentional bias; huber: the layer makes delta
    p: float | None = None  # exponent of loss "lp" (>= 1)
    retention: Literal["decay", "lq", "kl"] | None = None  # how the memory reads its accumulator A: W = F(A)
    lq: float | None = None  # norm of retention "lq" (>= 1)
    softmax_scale: float | None = None  # the simplex's total of retention "kl" (> 0)
    softmax_dim: Literal["row", "all"] | None = None  # what retention "kl" normalises: each row, or each matrix
    optimizer: Literal["momentum", "muon"] | None = None  # the inner optimiser; muon: Newton-Schulz on the momentum
    ns_steps: int | None = None  # Newton-Schulz iterations of optimizer "muon" (>= 0)
    window: int | None = None  # Omega window: tokens each write fits (>= 1); above 1 the layer makes gamma
    # a learned, data-dependent momentum gate eta (Titans, Atlas); False: eta = 0, plain gradient descent (Miras'
    # Moneta, Yaad and Memora), and the gate projection has no eta row
    momentum: bool = True
    # the forgetting gate's initial bias: alpha = sigmoid(bias + w.x) starts at sigmoid(-8) ~ 3.4e-4 per token, a
    # memory half-life of ~2,000 tokens. Training at a few hundred tokens barely moves it (docs/RESULTS.md, the
    # passkey probe), so it sets how far past the training length a write survives: -12 ~ 6e-6, ~110K tokens
    forget_bias: float = -8.0
    # gate floors (0, the default, is the plain sigmoid): theta = bound * relu(sigmoid(.) - f) / (1 - f)
    # with f = write_floor, alpha likewise with f = forget_floor, so a gate can be exactly 0, not just small. A token
    # whose gate sits below its floor writes (or forgets) nothing and gets no gradient through that gate: over a long
    # stream a sigmoid's residual write on every filler token adds up (a 1e-4 write rate is 100 full writes over 1M
    # tokens); a floored gate's zero stays zero (docs/MODELS.md, "Gate floors"). forget_floor must stay below
    # sigmoid(forget_bias) for the forgetting gate to start live (it would otherwise be 0 and never learn)
    write_floor: float = 0.0
    forget_floor: float = 0.0
    # Atlas' polynomial feature map of the memory's keys and queries (arXiv 2505.23735, sec. 3.3), its degree p: the
    # memory reads phi(k) = [sqrt(a_i) vec(k^(x)i)]_{i=0..p} (1 + D + ... + D^p features), with learned a_i > 0 per head
    # initialised to 1/i!, so that phi(q).phi(k) = sum_i a_i (q.k)^i (exp's Taylor series); 0: no feature map. Needs
    # residual=False (the features are not the values' dim)
    poly_degree: int = 0
    # how the query and key projections start (init only; docs/MODELS.md, "How the memory learns to recall"):
    # "successor": W_k starts as a copy of W_q, and the causal conv starts with +1 on the current token for the q
    # and v channels and on the previous token for the k channels (on top of its random init), so that from the first
    # step the key a token writes matches the query of the token before it: a later query for token a reads the value
    # written by the token after a's last occurrence (MQAR's key -> value, an induction head's lookup). Without it
    # that alignment had to be found by outer training, at a step that varied from ~500 to > 6000 with the seed.
    # "random": nn.Linear's and nn.Conv1d's inits alone (the models before; the same random draws either way)
    qk_init: Literal["successor", "random"] = "successor"

    def __post_init__(self):
        w = self._where
        for name in ("depth", "expansion", "chunk_size", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{w}{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_lr > 0:
            raise ValueError(f"{w}max_lr must be > 0, got {self.max_lr}")
        if self.activation not in ("gelu", "silu"):
            raise ValueError(f"{w}activation must be 'gelu' or 'silu', got {self.activation!r}")
        for name in ("ema_momentum", "momentum_clock", "normalize_step", "value_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{w}{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_chunk_lr is not None and not self.max_chunk_lr > 0:
            raise ValueError(f"{w}max_chunk_lr must be None or > 0, got {self.max_chunk_lr}")
        if not isinstance(self.momentum, bool):
            raise TypeError(f"{w}momentum must be a bool, got {self.momentum!r}")
        if isinstance(self.forget_bias, bool) or not isinstance(self.forget_bias, (int, float)) \
                or not math.isfinite(self.forget_bias):
            raise ValueError(f"{w}forget_bias must be a finite number, got {self.forget_bias!r}")
        for name in ("write_floor", "forget_floor"):
            f = getattr(self, name)
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
                raise ValueError(f"{w}{name} must be a number in [0, 1), got {f!r}")
        if self.forget_floor and self.forget_floor >= _sigmoid(self.forget_bias):
            raise ValueError(f"{w}forget_floor={self.forget_floor} is at or above sigmoid({w}forget_bias="
                             f"{self.forget_bias}) = {_sigmoid(self.forget_bias):.3g}: the forgetting "
                             f"gate would start at exactly 0 for every token and never learn; raise {w}forget_bias or "
                             f"lower {w}forget_floor (0: the plain sigmoid)")
        if isinstance(self.poly_degree, bool) or not isinstance(self.poly_degree, int) or self.poly_degree < 0:
            raise ValueError(f"{w}poly_degree must be an int >= 0, got {self.poly_degree!r}")
        if self.qk_init not in QK_INITS:
            raise ValueError(f"{w}qk_init must be 'successor' or 'random', got {self.qk_init!r}")
        if self.qk_init == "successor" and self.conv_size < 2:
            raise ValueError(f"{w}qk_init='successor' needs {w}conv_size >= 2 (the key starts on the previous "
                             f"token), got conv_size={self.conv_size}; or set {w}qk_init='random'")
        if self.poly_degree and self.residual:
            raise ValueError(f"{w}poly_degree={self.poly_degree} needs {w}residual=False: the memory's input, the "
                             "polynomial features of its keys, does not have the values' dim")
        rule = self.memory_rule  # the rule's own range checks, each error naming its key
        lacking = {"torch": torch_unsupported_reason, "triton": chunked_unsupported_reason}.get(self.impl)
        if lacking is not None and lacking(rule) is not None:
            raise ValueError(f"{w}impl={self.impl!r} runs only the rules its path covers: {lacking(rule)} (use impl "
                             "'auto' or 'reference')")

    @property
    def memory_rule(self) -> MemoryRule:
        """The preset ``rule`` with every axis set here in its place: the :class:`mnemos.ops.MemoryRule` the layer
        runs. A bad preset name or axis value is a ValueError naming its key (``memory.p must be ...``)."""
        w = self._where
        if not isinstance(self.rule, str) or self.rule not in RULES:
            raise ValueError(f"{w}rule must be one of the presets {tuple(RULES)}, got {self.rule!r}")
        axes = {f.name: getattr(self, f.name) for f in dataclasses.fields(MemoryRule)
                if getattr(self, f.name) is not None}
        try:
            return dataclasses.replace(RULES[self.rule], **axes)
        except ValueError as e:  # "MemoryRule.p must be ..." -> "memory.p must be ..."
            raise ValueError(f"{w}{str(e).removeprefix('MemoryRule.')}") from None


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
            ``normalize_step`` (torch path only), ``impl`` (passed to :func:`mnemos.ops.neural_memory`), the rule:
            ``rule`` (a preset name) and its axes ``loss``, ``p``, ``retention``, ``lq``, ``softmax_scale``,
            ``softmax_dim``, ``optimizer``, ``ns_steps``, ``window`` (None: the preset's), ``momentum``;
            ``forget_bias`` (the forgetting gate's initial bias); ``write_floor`` / ``forget_floor`` (gates that can
            be exactly 0); ``poly_degree`` (Atlas' polynomial features of q
            and k); ``qk_init`` (how the q / k projections and the conv start).

    Attributes:
        memory_rule: the resolved :class:`mnemos.ops.MemoryRule` the memory runs.
        to_delta, to_gamma: the projections of the Huber thresholds and the window weights, or None where the rule
            has no use for them.
        poly_log_coef: ``log a_i`` of the polynomial features ``[H, p + 1]``, or None (``poly_degree=0``).
        key_dim: the memory's input dim K: ``head_dim``, or ``1 + D + ... + D^p`` with polynomial features.
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
        # (see :meth:`_record_stats`) and folds them into a running summary of the calls since ``reset_stats``
        # (``merged_stats``: a model that calls the layer once per segment, as MAC does); the trainer switches it on
        # for logged steps only
        self.record_stats = False
        # with track_writes, each forward appends its mean write strength theta / token_lr (in [0, 1], with its
        # graph) to write_strengths, one per call (MAC calls a memory once per segment): the trainer's
        # optim.write_penalty reads and clears them
        self.track_writes = False
        self.write_strengths: list[Tensor] = []
        self.last_stats: dict[str, float] = {}
        self._merged: dict[str, float] = {}
        self._merged_tokens = 0
        H, D = heads, head_dim
        inner = H * D

        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.conv = ShortConvolution(3 * inner, self.conv_size)
        if self.qk_init == "successor":  # draws no random numbers: the rest is "random"'s under the same seed
            successor_init_(self.to_qkv, self.conv)
        self.to_gates = nn.Linear(dim, (3 if self.momentum else 2) * H)  # theta, (eta,) alpha logits
        self.key_dim = sum(D**i for i in range(self.poly_degree + 1)) if self.poly_degree else D  # the memory's input
        widths = [self.key_dim] + [self.expansion * D] * (self.depth - 1) + [D]
        self.memory = nn.ParameterList(
            nn.Parameter(torch.empty(H, widths[i + 1], widths[i])) for i in range(self.depth)
        )  # W_0, layer i: [H, D_out, D_in]
        self.to_out_gate = nn.Linear(dim, inner, bias=False)
        self.out_norm = GatedRMSNorm(D)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        # the rule's own gates, made only where its axes need them (so Titans' parameters are today's, in order)
        self.memory_rule = config.memory_rule  # the MemoryRule (mnemos.ops) that the memory runs
        rule = self.memory_rule
        self.to_delta = nn.Linear(dim, H) if rule.loss == "huber" else None  # Huber thresholds delta, per head
        self.to_gamma = nn.Linear(dim, H) if rule.window > 1 else None  # Omega window weights gamma, per head
        # log a_i of the polynomial features, [H, p + 1]
        self.poly_log_coef = nn.Parameter(torch.empty(H, self.poly_degree + 1)) if self.poly_degree else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.memory:
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-1]))
        H = self.heads
        nn.init.normal_(self.to_gates.weight, std=0.02)
        with torch.no_grad():
            self.to_gates.bias[:H].fill_(0.0)  # theta = max_lr / 2
            self.to_gates.bias[H:-H].fill_(0.0)  # eta = 0.5 (no rows without momentum)
            self.forget_gate_bias.fill_(float(self.forget_bias))  # alpha ~ 3e-4 at -8: a half-life of ~2000 tokens
        rule = self.memory_rule
        if rule.retention == "lq" and rule.lq != 3:
            # A_0 = F^-1(W_0): the memory reads F(A_0) = the normal init above (F(A) = A / ||A||_q^(q-2) has the
            # inverse W * ||W||_q^((q-2)/(3-q)); q = 3 reads a unit-norm matrix whatever A_0 is)
            with torch.no_grad():
                for w in self.memory:
                    w.mul_(torch.linalg.vector_norm(w, ord=rule.lq, dim=(-2, -1), keepdim=True)
                           .pow((rule.lq - 2.0) / (3.0 - rule.lq)))
        if self.poly_log_coef is not None:  # a_i = 1 / i!
            with torch.no_grad():
                self.poly_log_coef.copy_(-torch.tensor([math.lgamma(i + 1.0) for i in range(self.poly_degree + 1)]))
        for proj, bias in ((self.to_delta, DELTA_BIAS), (self.to_gamma, -math.log(max(rule.window - 1, 1)))):
            if proj is not None:  # delta = softplus(0.5413) = 1; gamma = sigmoid(-log(w - 1)) = 1 / w
                nn.init.normal_(proj.weight, std=0.02)
                nn.init.constant_(proj.bias, bias)

    # ------------------------------------------------------------------------------------------------------------------

    def init_state(self, batch: int, device=None, dtype=None) -> NeuralMemoryState:
        """The state at the start of a stream: W_0 (the accumulator A_0) for every sequence, zero momentum, zero conv
        history; with an Omega window w > 1, w - 1 window tokens of weight gamma = 0 (zero keys and values, delta 1),
        which add exact zeros to the first writes, so the state has one shape from the first token on."""
        p = self.memory[0]
        device = p.device if device is None else device
        dtype = dtype or p.dtype
        W = tuple(w.to(device).expand(batch, *w.shape) for w in self.memory)  # [B, H, D_out, D_in], tied to W_0
        # eta = 0 (momentum=False): S_t = -theta_t u_t never reaches a later token, so the state carries none
        S = tuple(torch.zeros(batch, *w.shape, device=device, dtype=w.dtype) for w in self.memory) if self.momentum \
            else ()
        window = ()
        n, H, D = self.memory_rule.window - 1, self.heads, self.head_dim
        if n:
            gdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # the gates' dtype
            k = torch.zeros(batch, n, H, self.key_dim, device=device, dtype=dtype)  # [B, w - 1, H, K]
            v = torch.zeros(batch, n, H, D, device=device, dtype=dtype)  # [B, w - 1, H, D]
            window = (k, v, torch.zeros(batch, n, H, device=device, dtype=gdt))  # k, v, gamma
            if self.to_delta is not None:
                window += (torch.ones(batch, n, H, device=device, dtype=gdt),)  # delta
        mem = MemoryState(W, S, W, 0, self.chunk_size, window)
        clock = None
        if self._clocked:  # as if the token before had eta = 0
            clock = torch.zeros(batch, H, device=device, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16)
                                else dtype)
        return NeuralMemoryState(mem, self.conv.init_state(batch, device, dtype), clock)

    @property
    def _clocked(self) -> bool:
        """Whether the momentum clock acts: ``momentum_clock`` with the EMA form of a momentum that exists."""
        return self.momentum and self.ema_momentum and self.momentum_clock

    def _project(self, x: Tensor, conv_state: Tensor | None, clock: Tensor | None = None):
        """x [B, T, dim] -> q, k [B, T, H, K] (K = D without polynomial features), v [B, T, H, D], the op's gates
        theta, eta, alpha [B, T, H] each, the new conv state, the momentum gate as learned (eta before the clock's
        scaling; the op's eta without the clock) and the new clock state (``momentum_clock``; else None), continuing
        ``clock`` [B, H] (None: a stream's start)."""
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        qkv, conv_state = self.conv(self.to_qkv(x), conv_state)  # [B, T, 3*H*D]
        q, k, v = F.silu(qkv).view(B, T, 3, H, D).unbind(2)  # 3 x [B, T, H, D]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.poly_log_coef is not None:  # [B, T, H, D] -> [B, T, H, K], K = 1 + D + ... + D^p
            q, k = self._poly_features(q), self._poly_features(k)
        if self.value_norm:  # unit targets: the inner problem has one scale whatever the projections learn
            v = F.normalize(v, dim=-1)
        g = self.to_gates(x).view(B, T, -1, H)  # [B, T, 3 (2 without momentum), H]
        g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g  # gates in float32 at least
        theta = self.token_lr * floored_sigmoid(g[:, :, 0], self.write_floor)
        alpha = floored_sigmoid(g[:, :, -1], self.forget_floor)
        new_clock = None
        if self.momentum:
            eta = gate = torch.sigmoid(g[:, :, 1])
            if self.ema_momentum:  # S is a moving average of -lr * gradient: one token's summed step is <= max_lr
                theta = theta * (1.0 - eta)
            if self._clocked:  # eta_t * min(1, (1 - eta_t) / (1 - eta_(t-1))), in logs: -log(1 - eta)
                lc = F.softplus(g[:, :, 1])  # = softplus(logit), exact where 1 - eta rounds to 0
                start = lc.new_zeros(B, 1, H) if clock is None else clock.to(lc.dtype).unsqueeze(1)
                prev = torch.cat([start, lc[:, :-1]], dim=1)  # [B, T, H]: the token before's
                eta = eta * torch.exp(torch.clamp(prev - lc, max=0.0))
                new_clock = lc[:, -1] if T else start[:, 0]
        else:  # plain gradient descent
            eta = gate = torch.zeros_like(alpha)
        return q, k, v, theta, eta, alpha, conv_state, gate, new_clock

    def _poly_features(self, x: Tensor) -> Tensor:
        """Atlas' polynomial features ``[sqrt(a_0), sqrt(a_1) x, sqrt(a_2) vec(x x^T), ...]``: x ``[B, T, H, D]`` ->
        ``[B, T, H, 1 + D + ... + D^p]``, so that ``phi(q) . phi(k) = sum_i a_i (q . k)^i``."""
        scale = (0.5 * self.poly_log_coef).exp().to(x.dtype)  # sqrt(a_i), [H, p + 1]
        feats, power = [], x.new_ones(*x.shape[:-1], 1)  # x^(x)0 = [1]
        for i in range(self.poly_degree + 1):
            feats.append(scale[:, i, None] * power)
            if i < self.poly_degree:
                power = (power[..., :, None] * x[..., None, :]).flatten(-2)  # [..., D^(i+1)]
        return torch.cat(feats, dim=-1)

    def _rule_gates(self, x: Tensor) -> dict[str, Tensor]:
        """The gates the rule needs besides theta, eta, alpha, from x [B, T, dim], each [B, T, H] (float32 at least):
        ``delta = max(softplus(W_delta x + b_delta), DELTA_MIN)`` > 0 for the huber loss, ``gamma = sigmoid(W_gamma x
        + b_gamma)`` in [0, 1] for an Omega window above 1. None of them for Titans."""
        gates = {}
        for name, proj in (("delta", self.to_delta), ("gamma", self.to_gamma)):
            if proj is not None:
                z = proj(x)
                z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
                gates[name] = F.softplus(z).clamp_min(DELTA_MIN) if name == "delta" else torch.sigmoid(z)
        return gates

    def _output(self, x: Tensor, o: Tensor) -> Tensor:
        B, T, H, D = o.shape
        gate = self.to_out_gate(x).view(B, T, H, D)
        return self.out_proj(self.out_norm(o.to(gate.dtype), gate).reshape(B, T, H * D))

    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """Run the layer over x ``[B, T, dim]``, continuing ``state`` when given; returns ``(y, state after x)``."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got shape {tuple(x.shape)}")
        q, k, v, theta, eta, alpha, conv_state, gate, clock = self._project(
            x, None if state is None else state.conv, None if state is None else state.clock)
        rule_gates = self._rule_gates(x)  # delta, gamma: only where the rule needs them
        # the layer computes the op's inputs itself: no value checks (no GPU syncs; an overflow gives non-finite y)
        kwargs = dict(chunk_size=self.chunk_size, residual=self.residual, activation=self.activation, impl=self.impl,
                      check_values=False, rule=self.memory_rule, normalize_step=self._normalize_step, **rule_gates)
        if state is None:
            o, mem = neural_memory(q, k, v, theta, eta, alpha, tuple(self.memory), output_final_state=True, **kwargs)
        else:
            o, mem = neural_memory(q, k, v, theta, eta, alpha, initial_state=state.memory, output_final_state=True, **kwargs)
        if not self.momentum:  # eta = 0: the last token's S is no state (see init_state)
            mem = replace(mem, momentum=())
        if self.track_writes:
            self.write_strengths.append((theta / self.token_lr).mean())
        if self.record_stats:
            # the memory this call's first writes were computed at: a call that continues a chunk (MAC's segments
            # inside a longer chunk) took their gradients at the chunk's anchor, not at the memory it started from
            start = tuple(self.memory) if state is None else state.memory.anchor
            self._record_stats(q, k, v, theta, gate, alpha, o, self.read_weights(start), self.read_weights(mem.weights))
        return self._output(x, o), NeuralMemoryState(mem, conv_state, clock)

    @torch.no_grad()
    def _record_stats(self, q, k, v, theta, eta, alpha, o, start, end) -> None:
        """Scalar health statistics of one forward, in ``self.last_stats`` (floats; one host sync, logged steps only).

        - ``theta_*``, ``eta_*``, ``alpha_*``: mean and max of the gates over tokens and heads (eta: the momentum gate
          as learned, before the momentum clock scales it);
        - ``step_max``: the largest total step one token's gradient takes, theta / (1 - eta) (<= max_lr with
          ``ema_momentum``);
        - ``inner_loss_start`` / ``inner_loss``: mean ||M(k_t) - v_t||^2 under the memory the call's writes started
          from (the anchor of its first chunk: the memory at the call's start unless the call continues a chunk) and
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
        self.last_stats = dict(zip(names, stats, strict=True))
        n, total = q.shape[0] * q.shape[1], self._merged_tokens
        for name, value in self.last_stats.items():
            if name not in self._merged:
                self._merged[name] = value
            elif name.endswith("_max"):
                self._merged[name] = max(self._merged[name], value)
            elif name == "memory_norm":  # the memory after the latest call
                self._merged[name] = value
            else:  # means over tokens
                self._merged[name] = (self._merged[name] * total + value * n) / (total + n)
        self._merged_tokens = total + n

    def reset_stats(self) -> None:
        """Clear ``last_stats`` and the running summary of :meth:`merged_stats`."""
        self.last_stats, self._merged, self._merged_tokens = {}, {}, 0

    def merged_stats(self) -> dict[str, float]:
        """The health statistics of every call since :meth:`reset_stats` (or since the layer was built): means
        weighted by the calls' tokens, the largest of each ``*_max``, the memory norm after the latest call. Equal to
        ``last_stats`` after a single call."""
        return dict(self._merged)

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
        A = tuple(self.memory) if state is None else state.memory.weights
        return memory_read(q, self.read_weights(A), residual=self.residual, activation=self.activation)

    @property
    def forget_gate_bias(self) -> Tensor:
        """The forgetting gate's bias per head ``[H]``, a view of the gate projection's (its last H rows are alpha's:
        ``alpha = sigmoid(bias + w.x)``; ``forget_bias`` sets it at initialisation)."""
        return self.to_gates.bias[-self.heads:]

    def read_weights(self, A) -> tuple[Tensor, ...]:
        """The weights the memory reads, ``W = F(A)``, from the accumulators A a state carries (``state.weights``, or
        W_0): :func:`mnemos.ops.effective_weights` of the layer's rule (A itself for retention "decay")."""
        return effective_weights(tuple(A), self.memory_rule)

    def kernels_unsupported_reason(self, device: torch.device | str) -> str | None:
        """Why this layer's memory does not run the Triton kernels on ``device`` (None where ``impl="auto"`` takes
        them, in float32 or bfloat16): the impl (or ``MNEMOS_TRITON=0`` with impl auto), the rule (the kernels cover
        Titans' axes), the depth (1 or 2), the chunk size (1 to 64) or the widths. On CUDA the memory then runs the
        chunked torch path: same results, slower."""
        if self.impl in ("torch", "reference"):
            return f"impl={self.impl!r}"
        if self.impl == "auto" and auto_opt_out_reason() is not None:
            return auto_opt_out_reason()
        reason = chunked_unsupported_reason(self.memory_rule)
        if reason is not None:
            return reason
        widths = [self.memory[0].shape[-1]] + [w.shape[-2] for w in self.memory]
        return kernels_unsupported_reason(torch.device(device), torch.float32, widths, self.chunk_size)

    @property
    def _normalize_step(self) -> bool:
        """``normalize_step`` where the op defines it: for the rules its chunked paths cover (l2 / dot loss, decay,
        momentum, window 1); every other rule takes theta as it is."""
        return self.normalize_step and chunked_unsupported_reason(self.memory_rule) is None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, depth={self.depth}, "
            f"expansion={self.expansion}, residual={self.residual}, activation={self.activation!r}, "
            f"chunk_size={self.chunk_size}, max_lr={self.max_lr}, max_chunk_lr={self.max_chunk_lr}, "
            f"ema_momentum={self.ema_momentum}, value_norm={self.value_norm}, normalize_step={self.normalize_step}"
            + ("" if self.memory_rule == RULES["titans"] and self.momentum else
               f", rule={self.memory_rule}, momentum={self.momentum}")
            + (f", poly_degree={self.poly_degree}" if self.poly_degree else "")
        )
