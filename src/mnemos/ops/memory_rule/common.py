"""What every form of the memory rule shares: the state object, the memory network, activations and input checks.

Shape vocabulary (used throughout mnemos): B batch, T tokens, H heads, K key/query head dim, V value head dim,
C chunk, L memory depth. Activations are ``[B, T, H, D]``, gates ``[B, T, H]``, one memory layer's weight
``[H, D_out, D_in]`` (shared initial memory) or ``[B, H, D_out, D_in]`` (per-sequence state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "silu")
# Associative losses the op's older `loss` argument names: Titans' l2 regression loss and the dot-product (Hebbian)
# loss of linear attention. Every loss of the family (lp, Huber, ...) is defined in rule.py (`token_loss`, what the
# reference differentiates); the chunked torch path gets its output gradient and that gradient's derivative here
# (`loss_output_grad`, `loss_output_grad_backward`).
LOSSES = ("l2", "dot")


# ----------------------------------------------------------------------------------------------------------------------
# activations and their derivatives (the derivative is written out so that autograd can differentiate it again)


def activate(x: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(x)  # erf form
    return F.silu(x)


def activate_grad(x: Tensor, activation: str, grad: Tensor | None = None) -> Tensor:
    """d act(x) / dx elementwise, times ``grad`` when given. GELU's is one fused op (aten's gelu_backward, which
    autograd can differentiate again); SiLU's is written out (aten's silu_backward has no derivative)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(x.new_ones(()).expand_as(x) if grad is None else grad, x)
    s = torch.sigmoid(x)
    d = s * (1.0 + x * (1.0 - s))
    return d if grad is None else grad * d


def activate_grad2(x: Tensor, activation: str) -> Tensor:
    """d^2 act(x) / dx^2, elementwise (the hand-written backward of the chunked path needs it)."""
    if activation == "gelu":
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return pdf * (2.0 - x * x)
    s = torch.sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


def loss_output_grad(pred: Tensor, target: Tensor, loss: str, p: float = 3.0, delta: Tensor | None = None) -> Tensor:
    """Gradient of the associative loss (``rule.token_loss``) with respect to the memory's output, per token, with
    ``e = pred - target``: l2 ``2 e``; dot ``-target`` (independent of the memory, so any chunk size is exact for
    linear attention); lp ``p sign(e) |e|^(p-1)``; huber ``2 e`` where ``||e||_2 <= delta`` else ``delta sign(e)``
    (delta ``[..., n]``, one threshold per token; the branch is picked here, at the anchor). The chunked torch path
    differentiates it by :func:`loss_output_grad_backward`: a new loss touches these two functions."""
    if loss == "l2":
        return 2.0 * (pred - target)
    if loss == "dot":
        return -target.expand_as(pred)
    e = pred - target
    if loss == "lp":
        ae = e.abs()
        if p >= 2.0:  # |e|^(p-1) and its derivative are finite at e = 0
            mag = ae.pow(p - 1.0)
        else:  # through a safe base, so that autograd gives 0, not NaN, where e = 0
            nz = ae > 0
            mag = torch.where(nz, torch.where(nz, ae, torch.ones_like(ae)).pow(p - 1.0), torch.zeros_like(ae))
        return p * e.sign() * mag
    inside = e.pow(2).sum(-1) <= delta.pow(2)  # [..., n], as rule.token_loss picks the branch
    return torch.where(inside.unsqueeze(-1), 2.0 * e, delta.unsqueeze(-1) * e.sign())


def loss_output_grad_backward(grad: Tensor, err: Tensor | None, loss: str, p: float = 3.0,
                              delta: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """The reverse of :func:`loss_output_grad`: given ``grad``, the gradient of its output, and ``err = pred - target``
    (:func:`loss_keeps_error`; None for l2 and dot, which do not need it), returns the gradients of pred (None where it
    is zero: dot), target and delta (None unless huber). Every loss is elementwise in e except huber's branch, a
    constant mask. lp's ``p (p-1) |e|^(p-2)`` is taken as 0 where e = 0 (singular there for p < 2)."""
    if loss == "l2":
        dpred = 2.0 * grad
        return dpred, -dpred, None
    if loss == "dot":
        return None, -grad, None
    e = err
    if loss == "lp":
        if p == 1.0:
            z = torch.zeros_like(grad)
            return z, z, None
        ae = e.abs()
        if p > 2.0:  # p (p-1) |e|^(p-2) is 0, not singular, at e = 0
            dpred = grad * ((p * (p - 1.0)) * ae.pow(p - 2.0))
        else:
            nz = ae > 0
            curv = (p * (p - 1.0)) * torch.where(nz, ae, torch.ones_like(ae)).pow(p - 2.0)
            dpred = torch.where(nz, grad * curv, torch.zeros_like(grad))
        return dpred, -dpred, None
    inside = e.pow(2).sum(-1) <= delta.pow(2)  # [..., n]
    dpred = torch.where(inside.unsqueeze(-1), 2.0 * grad, torch.zeros_like(grad))
    ddelta = torch.where(inside, torch.zeros_like(delta), (grad * e.sign()).sum(-1))
    return dpred, -dpred, ddelta


def loss_keeps_error(loss: str) -> bool:
    """Whether :func:`loss_output_grad_backward` needs the error ``pred - target`` (saved by the forward)."""
    return loss not in ("l2", "dot")


# ----------------------------------------------------------------------------------------------------------------------
# the memory network M(x; W)


def memory_read(
    q: Tensor,
    weights: Sequence[Tensor],
    *,
    residual: bool = True,
    activation: str = "gelu",
) -> Tensor:
    """Read the memory with a fixed state and no update: ``o = M(q; W)``.

    Args:
        q: ``[B, T, H, K]`` queries.
        weights: tuple of L layer weights, each ``[H, D_out, D_in]`` or ``[B, H, D_out, D_in]``; layer 1 takes K
            inputs, layer L gives V outputs.
        residual: add the input to the output (``M(x) = W_L a_{L-1} + x``); needs K == V.
        activation: ``"gelu"`` (erf form) or ``"silu"``, applied between layers, not after the last.

    Returns:
        ``[B, T, H, V]`` in q's dtype (computed in float32 for half-precision inputs).
    """
    _check_activation(activation)
    if not isinstance(q, Tensor) or q.ndim != 4:
        raise ValueError(f"q must be a [B, T, H, K] tensor, got {_describe(q)}")
    _check_float("q", q)
    B, T, H, K = q.shape
    weights = _check_weights(weights, B, H, K, None, residual, q.device)
    cdtype = compute_dtype(q.dtype)
    with _no_autocast(q.device):
        h = q.to(cdtype).transpose(1, 2)  # [B, H, T, K]
        ws = tuple(w.to(cdtype) for w in weights)
        o = mlp_forward(h, ws, residual=residual, activation=activation)  # [B, H, T, V]
    return o.transpose(1, 2).to(q.dtype)


def mlp_forward(h: Tensor, weights: Sequence[Tensor], *, residual: bool, activation: str) -> Tensor:
    """``M(h; W)`` for rows of h: h ``[..., H, N, D_in]``, weights ``[(B,) H, D_out, D_in]`` -> ``[..., H, N, D_out]``."""
    x = h
    for i, w in enumerate(weights):
        h = h @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            h = activate(h, activation)
    return h + x if residual else h


# ----------------------------------------------------------------------------------------------------------------------
# state


@dataclass
class MemoryState:
    """Everything a later call needs to continue the memory rule exactly where this one stopped.

    Attributes:
        weights: L tensors ``[B, H, D_out, D_in]``, the memory after the last token (W_T).
        momentum: L tensors like ``weights``, the surprise after the last token (S_T); empty for a recurrence
            without momentum (a delta rule's state, or a memory whose eta is 0, whose S never reaches a later
            token: ``NeuralMemory(momentum=False)`` keeps none); a call continued from an empty one starts at S = 0.
        anchor: L tensors like ``weights``, the memory at the last chunk boundary: the point at which the gradients
            of the chunk in progress are taken. Equal to ``weights`` when ``offset == 0``.
        offset: tokens consumed since that boundary, ``0 <= offset < chunk_size``.
        chunk_size: the chunk size the boundaries were counted with.
        window: for a rule with an Omega window w > 1 (``MemoryRule.window``), the last n <= w - 1 tokens' keys
            ``[B, n, H, K]``, values ``[B, n, H, V]``, window weights gamma ``[B, n, H]`` and, for the huber loss,
            thresholds delta ``[B, n, H]``: the next call's first writes fit them again. Empty otherwise.

    With a retention other than decay (``MemoryRule.retention``) weights, momentum and anchor are accumulators A and
    the memory reads ``mnemos.ops.effective_weights(A, rule)``. The state is plain tensors and ints: ``torch.save``
    it, move it with :meth:`to`, cut gradient history with :meth:`detach` (truncated backpropagation through time).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    anchor: tuple[Tensor, ...]
    offset: int
    chunk_size: int
    window: tuple[Tensor, ...] = ()

    def detach(self) -> "MemoryState":
        return MemoryState(
            tuple(w.detach() for w in self.weights),
            tuple(s.detach() for s in self.momentum),
            tuple(a.detach() for a in self.anchor),
            self.offset,
            self.chunk_size,
            tuple(x.detach() for x in self.window),
        )

    def to(self, *args, **kwargs) -> "MemoryState":
        return MemoryState(
            tuple(w.to(*args, **kwargs) for w in self.weights),
            tuple(s.to(*args, **kwargs) for s in self.momentum),
            tuple(a.to(*args, **kwargs) for a in self.anchor),
            self.offset,
            self.chunk_size,
            tuple(x.to(*args, **kwargs) for x in self.window),
        )

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]


# ----------------------------------------------------------------------------------------------------------------------
# input checks (the public entry points validate; private helpers assume)


@dataclass
class _Spec:
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype  # compute dtype
    weights: tuple[Tensor, ...]  # initial memory, [H, ...] or [B, H, ...]
    momentum: tuple[Tensor, ...] | None  # [B, H, ...] or None (zeros)
    anchor: tuple[Tensor, ...] | None  # None: anchor = weights
    offset: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation dtype: float32 for half-precision inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def _check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_weights(
    weights, B: int, H: int, K: int, V: int | None, residual: bool, device: torch.device, name: str = "weights"
) -> tuple[Tensor, ...]:
    if isinstance(weights, Tensor) or not isinstance(weights, (tuple, list)) or len(weights) == 0:
        raise TypeError(
            f"{name} must be a non-empty tuple of layer weights [H, D_out, D_in] or [B, H, D_out, D_in], got "
            f"{_describe(weights)} (a matrix memory is a tuple of one tensor: (W,))"
        )
    ndim = None
    d_in = K
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {_describe(w)}")
        _check_float(f"{name}[{i}]", w)
        if w.device != device:
            raise ValueError(f"{name}[{i}] is on {w.device} but q is on {device}")
        if w.ndim not in (3, 4):
            raise ValueError(f"{name}[{i}] must be [H, D_out, D_in] or [B, H, D_out, D_in], got shape {tuple(w.shape)}")
        if ndim is None:
            ndim = w.ndim
        elif w.ndim != ndim:
            raise ValueError(f"{name}: every layer must have the same rank, {name}[0] has {ndim}, {name}[{i}] has {w.ndim}")
        lead = tuple(w.shape[:-2])
        want = (H,) if w.ndim == 3 else (B, H)
        if lead != want:
            raise ValueError(f"{name}[{i}] must have leading dims {want} (heads{'' if w.ndim == 3 else ', batch first'}), got {lead}")
        if w.shape[-1] != d_in:
            what = "the key dim K of q/k" if i == 0 else f"the output dim of {name}[{i - 1}]"
            raise ValueError(f"{name}[{i}] has D_in={w.shape[-1]} but {what} is {d_in}")
        d_in = w.shape[-2]
    if V is not None and d_in != V:
        raise ValueError(f"{name}[-1] has D_out={d_in} but v has head dim V={V}")
    if residual and d_in != K:
        raise ValueError(f"residual=True needs the memory's output dim ({d_in}) to equal its input dim K={K}")
    return tuple(weights)


def check_inputs(
    q, k, v, theta, eta, alpha, weights, *, chunk_size, momentum, residual, activation, initial_state, loss="l2",
    check_values=True,
) -> _Spec:
    """Validate the op's arguments (shared by every implementation) and return the sizes and starting state.
    ``check_values=False`` skips the checks that read the values (finite inputs and weights, gates in range)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {_describe(x)}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
        _check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T < 1:
        raise ValueError(f"q must hold at least one token, got T={T}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if check_values:
            _check_finite(name, x)
    for name, g, hi in (("theta", theta, None), ("eta", eta, 1.0), ("alpha", alpha, 1.0)):
        if not isinstance(g, Tensor):
            raise TypeError(f"{name} must be a tensor, got {_describe(g)}")
        _check_float(name, g)
        if tuple(g.shape) != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got shape {tuple(g.shape)}")
        if g.device != q.device:
            raise ValueError(f"{name} is on {g.device} but q is on {q.device}")
        if not check_values:
            continue
        ok = (g >= 0) if hi is None else ((g >= 0) & (g <= hi))  # NaN fails both comparisons
        if not bool(ok.all()):
            rng = "[0, inf)" if hi is None else "[0, 1]"
            raise ValueError(f"{name} must lie in {rng} (already activated), got values in [{g.min().item()}, {g.max().item()}]")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    _check_activation(activation)
    if loss is not None and loss not in LOSSES:  # None: the caller checked its rule (rule.py)
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    anchor = None
    offset = 0
    if initial_state is not None:
        if weights is not None or momentum is not None:
            raise ValueError("pass either initial_state or weights (and momentum), not both")
        if not isinstance(initial_state, MemoryState):
            raise TypeError(f"initial_state must be a MemoryState, got {_describe(initial_state)}")
        st = initial_state
        if st.offset != 0 and st.chunk_size != chunk_size:
            raise ValueError(
                f"initial_state stopped {st.offset} tokens into a chunk of {st.chunk_size}; continue it with "
                f"chunk_size={st.chunk_size}, got chunk_size={chunk_size}"
            )
        if not 0 <= st.offset < st.chunk_size:
            raise ValueError(f"initial_state.offset must lie in [0, {st.chunk_size}), got {st.offset}")
        weights = _check_weights(st.weights, B, H, K, V, residual, q.device, "initial_state.weights")
        momentum = st.momentum or None  # empty: a state without momentum continues from S = 0
        anchor = _check_like("initial_state.anchor", st.anchor, weights, B, H)
        offset = st.offset
    elif weights is None:
        raise ValueError("weights (the initial memory) is required when no initial_state is given")
    else:
        weights = _check_weights(weights, B, H, K, V, residual, q.device)
    if momentum is not None:
        momentum = _check_like("momentum", momentum, weights, B, H)
    prefix = "weights" if initial_state is None else "initial_state.weights"
    for i, w in enumerate(weights):
        if check_values and not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"{prefix}[{i}] contains NaN or infinite values (if it comes from an earlier call, that memory "
                "diverged: lower theta, or l2-normalise the keys)"
            )
    return _Spec(B, T, H, K, V, compute_dtype(q.dtype), weights, momentum, anchor, offset)


def _check_like(name: str, xs, weights: tuple[Tensor, ...], B: int, H: int) -> tuple[Tensor, ...]:
    """xs must be one [B, H, D_out, D_in] tensor per layer of weights."""
    if isinstance(xs, Tensor) or not isinstance(xs, (tuple, list)) or len(xs) != len(weights):
        raise TypeError(f"{name} must be a tuple of {len(weights)} tensors (one per memory layer), got {_describe(xs)}")
    for i, (x, w) in enumerate(zip(xs, weights, strict=True)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {_describe(x)}")
        _check_float(f"{name}[{i}]", x)
        want = (B, H) + tuple(w.shape[-2:])
        if tuple(x.shape) != want:
            raise ValueError(f"{name}[{i}] must be [B, H, D_out, D_in] = {want}, got {tuple(x.shape)}")
        if x.device != w.device:
            raise ValueError(f"{name}[{i}] is on {x.device} but the weights are on {w.device}")
    return tuple(xs)


class _no_autocast:
    """Keep the rule's state and accumulations in the compute dtype under torch.autocast."""

    def __init__(self, device: torch.device):
        self.ctx = torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
