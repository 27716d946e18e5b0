"""The four axes of the memory rule: :class:`MemoryRule`, its named presets :data:`RULES`, and what each axis value
means in one place (the token-by-token reference, reference.py, applies them). Semantics and sources:
docs/MEMORY_RULE.md, "The four axes".

- **attentional bias** (``loss``, the inner loss of a write): ``l2`` ``||e||^2`` (Titans), ``dot`` ``-<M(k), v>``
  (linear attention), ``lp`` ``||e||_p^p`` (Moneta), ``huber`` (Yaad: ``||e||^2`` if ``||e||_2 <= delta`` else
  ``delta ||e||_1``), with ``e = M(k; W) - v`` (:func:`token_loss`);
- **retention** (``retention``): the carried state is an accumulator A per layer and the memory reads its effective
  weights ``W = F(A)`` (:func:`effective_weights`): ``decay`` F(A) = A (Titans); ``lq`` F(A) = A / ||A||_lq^(lq-2)
  (Moneta); ``kl`` F(A) = softmax_scale * softmax(A) (Memora);
- **inner optimiser** (``optimizer``): ``momentum`` (S = eta S - theta u; A = (1 - alpha) A + S), ``muon`` (Atlas:
  S = eta S - u; A = (1 - alpha) A + theta NS(S), :func:`newton_schulz`) or ``orthogonal`` (Lattice: each slot, a
  column of the matrix memory, moves only orthogonally to itself and is renormalised: :func:`orthogonal_step`);
- **window** (``window``, Atlas' Omega rule): each write fits the last ``window`` tokens, weighted by gamma.

Imports nothing from the chunked paths: the dispatcher asks :func:`torch_unsupported_reason` and
:func:`chunked_unsupported_reason` (the Triton kernels) which rules they cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor

from .common import MemoryState, _check_float, _describe

RULE_LOSSES = ("l2", "dot", "lp", "huber")
RETENTIONS = ("decay", "lq", "kl")
SOFTMAX_DIMS = ("row", "all")
OPTIMIZERS = ("momentum", "muon", "orthogonal")
# Newton-Schulz: Muon's quintic coefficients (Jordan et al. 2024; the Atlas paper gives none) and the normaliser's eps
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# what the Triton kernels implement (Titans' axes; also what normalize_step is defined for), and what the chunked torch
# path implements (with any window); any other axis value: the reference only
CHUNKED_LOSSES = ("l2", "dot")
TORCH_LOSSES = ("l2", "dot", "lp", "huber")
TORCH_RETENTIONS = ("decay", "lq", "kl")
TORCH_OPTIMIZERS = ("momentum", "muon", "orthogonal")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"MemoryRule.{name} must be one of {choices}, got {value!r}")


def _check_real(name: str, value, lo: float, *, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= lo if strict else value < lo):
        rel = ">" if strict else ">="
        raise ValueError(f"MemoryRule.{name} must be a finite real number {rel} {lo:g}, got {value!r}")
    return float(value)


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"MemoryRule.{name} must be an int >= {lo}, got {value!r}")


@dataclass(frozen=True)
class MemoryRule:
    """One point of the memory rule's design space (Miras, arXiv 2504.13173; Atlas, arXiv 2505.23735).

    Attributes:
        loss: the attentional bias, ``"l2"`` | ``"dot"`` | ``"lp"`` | ``"huber"`` (huber needs the op's ``delta``).
        p: the exponent of ``"lp"`` (>= 1; Moneta's default 3).
        retention: ``"decay"`` (W = A) | ``"lq"`` (W = A / ||A||_lq^(lq-2)) | ``"kl"`` (W = softmax_scale * softmax(A)).
        lq: the norm of ``"lq"`` (>= 1; Moneta's default 4; 2 is ``"decay"``).
        softmax_scale: the simplex's total c of ``"kl"`` (> 0).
        softmax_dim: what ``"kl"`` normalises: ``"row"`` (each output unit's weights, ``[D_in]``) or ``"all"`` (each
            layer matrix).
        optimizer: ``"momentum"`` (Titans) | ``"muon"`` (Atlas: the momentum orthogonalised by Newton-Schulz) |
            ``"orthogonal"`` (Lattice: each slot's step projected orthogonally to the slot, slots renormalised; a
            matrix memory, depth 1; the token-by-token reference only).
        ns_steps: Newton-Schulz iterations of ``"muon"`` (>= 0; 0 is the normalised momentum itself).
        window: the Omega rule's window, tokens each write fits (>= 1; 1 is the plain rule).

    Fields an axis value does not use (p for ``"l2"``, lq for ``"decay"``, ...) are validated and ignored. Every
    field is checked on construction; the error names the field. ``dataclasses.replace(rule, window=4)`` derives a
    rule from a preset.
    """

    loss: str = "l2"
    p: float = 3.0
    retention: str = "decay"
    lq: float = 4.0
    softmax_scale: float = 1.0
    softmax_dim: str = "row"
    optimizer: str = "momentum"
    ns_steps: int = 5
    window: int = 1

    def __post_init__(self):
        _check_choice("loss", self.loss, RULE_LOSSES)
        _check_choice("retention", self.retention, RETENTIONS)
        _check_choice("softmax_dim", self.softmax_dim, SOFTMAX_DIMS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        object.__setattr__(self, "p", _check_real("p", self.p, 1.0))
        object.__setattr__(self, "lq", _check_real("lq", self.lq, 1.0))
        object.__setattr__(self, "softmax_scale", _check_real("softmax_scale", self.softmax_scale, 0.0, strict=True))
        _check_int("ns_steps", self.ns_steps, 0)
        _check_int("window", self.window, 1)


# The presets. Values and the equations they follow: docs/MEMORY_RULE.md, "The four axes". The gates that make a
# preset the paper's model (eta = 0 for plain gradient descent, depth 1 for a matrix memory, ...) are inputs of the op,
# not axes: deltanet has Titans' axes (DeltaNet is Titans with a matrix memory, eta = alpha = 0, chunk 1).
RULES: dict[str, MemoryRule] = {
    "titans": MemoryRule(),
    "moneta": MemoryRule(loss="lp", p=3.0, retention="lq", lq=4.0),
    "yaad": MemoryRule(loss="huber"),
    "memora": MemoryRule(retention="kl", softmax_scale=1.0, softmax_dim="row"),
    "omeganet": MemoryRule(window=4),
    "atlas": MemoryRule(optimizer="muon", ns_steps=5, window=4),
    "linear_attention": MemoryRule(loss="dot"),
    "deltanet": MemoryRule(),
}


def resolve_rule(rule: str | MemoryRule, loss: str | None = None) -> MemoryRule:
    """A preset name or a :class:`MemoryRule` -> the rule; ``loss`` (the op's older argument) overrides its loss."""
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"rule must be one of the presets {tuple(RULES)} or a MemoryRule, got {rule!r}")
        rule = RULES[rule]
    elif not isinstance(rule, MemoryRule):
        raise TypeError(f"rule must be a preset name {tuple(RULES)} or a MemoryRule, got {_describe(rule)}")
    if loss is not None and loss != rule.loss:
        if not isinstance(loss, str) or loss not in RULE_LOSSES:
            raise ValueError(f"loss must be one of {RULE_LOSSES}, got {loss!r}")
        rule = replace(rule, loss=loss)
    return rule


def rule_name(rule: MemoryRule) -> str:
    """The first preset equal to ``rule``, else its fields that differ from Titans', for messages."""
    for name, preset in RULES.items():
        if preset == rule:
            return repr(name)
    diff = ", ".join(f"{f.name}={getattr(rule, f.name)!r}" for f in fields(rule)
                     if getattr(rule, f.name) != getattr(RULES["titans"], f.name))
    return f"MemoryRule({diff})"


def _axes_beyond(rule: MemoryRule, losses: tuple[str, ...], retentions: tuple[str, ...],
                 optimizers: tuple[str, ...], windows: bool) -> list[str]:
    """The rule's axis values outside the given ones (and window 1 unless ``windows``), spelled ``name=value``."""
    lacking = []
    if rule.loss not in losses:
        lacking.append(f"loss={rule.loss!r}")
    if rule.retention not in retentions:
        lacking.append(f"retention={rule.retention!r}")
    if rule.optimizer not in optimizers:
        lacking.append(f"optimizer={rule.optimizer!r}")
    if rule.window != 1 and not windows:
        lacking.append(f"window={rule.window}")
    return lacking


def _kernel_axes(rule: MemoryRule) -> list[str]:
    return _axes_beyond(rule, CHUNKED_LOSSES, ("decay",), ("momentum",), False)


def _torch_axes(rule: MemoryRule) -> list[str]:
    return _axes_beyond(rule, TORCH_LOSSES, TORCH_RETENTIONS, TORCH_OPTIMIZERS, True)


def torch_unsupported_reason(rule: MemoryRule) -> str | None:
    """Which of ``rule``'s axis values the chunked torch path lacks (None: it covers the rule; then impl='auto' takes
    it on the CPU). It covers every axis value of :class:`MemoryRule` today: a new value starts reference-only here."""
    lacking = _torch_axes(rule)
    if not lacking:
        return None
    return (f"rule {rule_name(rule)} has only the reference implementation yet (impl='reference', or 'auto', which "
            f"picks it): the chunked torch path covers loss in {TORCH_LOSSES}, retention in {TORCH_RETENTIONS}, "
            f"optimizer in {TORCH_OPTIMIZERS} and any window, and this rule has {', '.join(_kernel_axes(rule))} "
            f"(lacking {', '.join(lacking)})")


def chunked_unsupported_reason(rule: MemoryRule) -> str | None:
    """Which of ``rule``'s axis values lie outside Titans' axes (loss l2 or dot, retention decay, optimizer momentum,
    window 1), None for a rule inside them: the rules the Triton kernels cover and ``normalize_step`` is defined for.
    (The chunked torch path covers more: :func:`torch_unsupported_reason`.)"""
    lacking = _kernel_axes(rule)
    if not lacking:
        return None
    if torch_unsupported_reason(rule) is not None:
        return torch_unsupported_reason(rule)
    return (f"the Triton kernels cover loss in {CHUNKED_LOSSES}, retention 'decay', optimizer 'momentum', window 1, "
            f"and rule {rule_name(rule)} has {', '.join(lacking)} (impl='torch', or 'auto', runs it on the chunked "
            f"torch path)")


def normalize_step_unsupported(rule: MemoryRule) -> str | None:
    """The error for ``normalize_step`` with ``rule`` (None where it is defined: Titans' axes)."""
    if chunked_unsupported_reason(rule) is None:
        return None
    return (f"normalize_step is defined for the rules the chunked paths cover (loss 'l2' or 'dot', "
            f"retention 'decay', optimizer 'momentum', window 1), not for rule {rule_name(rule)}")


# ----------------------------------------------------------------------------------------------------------------------
# the axes' maps


def _effective(a: Tensor, rule: MemoryRule) -> Tensor:
    if rule.retention == "decay":
        return a
    if rule.retention == "lq":
        norm = torch.linalg.vector_norm(a, ord=rule.lq, dim=(-2, -1), keepdim=True)
        # F(0) = 0: the limit for lq < 3, a convention above (A = 0 is a singularity of A / ||A||^(lq-2) there)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        return a / safe.pow(rule.lq - 2.0)
    if rule.softmax_dim == "row":
        return rule.softmax_scale * torch.softmax(a, dim=-1)
    return rule.softmax_scale * torch.softmax(a.flatten(-2), dim=-1).view_as(a)


def effective_weights(A: Tensor | Sequence[Tensor], rule: str | MemoryRule = "titans"):
    """The weights ``W = F(A)`` a memory reads, from the accumulators A a state carries (``state.weights``).

    ``decay``: A itself (the same tensor objects); ``lq``: ``A / ||A||_lq^(lq-2)`` with the entrywise lq norm of each
    layer matrix (the last two dims), per (sequence, head), and F(0) = 0; ``kl``: ``softmax_scale * softmax(A)`` over
    each row (``softmax_dim="row"``, the last dim) or each whole matrix (``"all"``).

    Args:
        A: one layer's accumulator ``[..., D_out, D_in]`` or a tuple of them (one per layer).
        rule: a preset name or a :class:`MemoryRule`.

    Returns:
        W, the same structure as A.
    """
    rule = resolve_rule(rule)
    if isinstance(A, Tensor):
        return _effective(A, rule)
    return tuple(_effective(a, rule) for a in A)


def newton_schulz(S: Tensor, steps: int) -> Tensor:
    """Muon's orthogonalisation of each matrix of S ``[..., m, n]``: ``X_0 = S / (||S||_F + 1e-7)`` (per matrix),
    then ``steps`` times ``X <- a X + (b X X^T + c (X X^T)^2) X`` with ``(a, b, c) = (3.4445, -4.7750, 2.0315)``, on
    the transpose when m > n (the same map, the smaller Gram matrix). Every singular value s of ``X_0`` becomes
    ``f^steps(s)``, ``f(s) = a s + b s^3 + c s^5``; ``steps = 0`` returns ``X_0``."""
    a, b, c = NS_COEFFICIENTS
    X = S / (torch.linalg.matrix_norm(S, keepdim=True) + NS_EPS)
    tall = S.shape[-2] > S.shape[-1]
    if tall:
        X = X.mT
    for _ in range(steps):
        gram = X @ X.mT
        X = a * X + (b * gram + c * gram @ gram) @ X
    return X.mT if tall else X


NS_GRAM_SEGMENT = 3  # Gram-domain steps between two formings of X (newton_schulz_fast: bounds P's growth to a^3)


def _ns_segments(steps: int) -> list[int]:
    """The Gram domain's runs of steps, each <= NS_GRAM_SEGMENT, the first the shortest: 5 -> [2, 3]."""
    count = -(-steps // NS_GRAM_SEGMENT)
    return [steps // count + (i >= count - steps % count) for i in range(count)] if steps else []


def newton_schulz_fast(S: Tensor, steps: int) -> Tensor:
    """:func:`newton_schulz` in fewer operations, equal up to rounding (the chunked path's; the reference keeps the
    plain form). On ``X [..., m, n]`` (m <= n after the same transpose) a step is one fused multiply-add
    ``X <- a X + B X`` with ``B = b G + c G^2``, ``G = X X^T``; and when m is well below n, the steps run in the
    m x m Gram domain: within a run of steps every iterate is ``X_k = P_k X_j`` with ``P_k`` a polynomial in
    ``G_j = X_j X_j^T``, all of which commute, so ``p_k = a I + b G_k + c G_k^2``, ``P_(k+1) = p_k P_k``,
    ``G_(k+1) = G_k p_k^2``, and X is formed only at the end of the run (``X = P X_j``). Runs of at most
    ``NS_GRAM_SEGMENT`` = 3 steps keep P below a^3 ~ 41 (one run of 5 lets it reach a^5 ~ 490 where X_0 is small, and
    its float32 rounding then spills into X's large directions: ~30x the plain form's error on a matrix with decaying
    singular values; two runs match the plain form). The first run starts from ``S S^T / r^2``, ``r = ||S||_F + eps``
    with ``||S||_F^2 = tr(S S^T)``, and folds 1 / r into its P. Cost: per run of s steps 4 s - 3 products of m^3 and
    two of m^2 n, against 2 m^2 n + m^3 a step on X (docs/MEMORY_RULE.md, "Newton-Schulz in the Gram domain")."""
    a, b, c = NS_COEFFICIENTS
    tall = S.shape[-2] > S.shape[-1]
    Y = S.mT if tall else S  # [..., m, n], m <= n
    shape = Y.shape
    m, n = shape[-2:]
    runs = _ns_segments(steps)
    gram = sum(4 * s - 3 for s in runs) * m + 2 * n * len(runs) < steps * (2 * n + m)  # fewer multiply-adds
    if not gram:
        X = Y / (torch.linalg.matrix_norm(Y, keepdim=True) + NS_EPS)
        if steps:
            X = X.reshape(-1, m, n)
            for k in range(steps):
                G = X @ X.mT
                X = torch.baddbmm(X, torch.baddbmm(G, G, G, beta=b, alpha=c), X, beta=a)  # a X + (b G + c G^2) X
            X = X.view(shape)
        return X.mT if tall else X
    X = Y.reshape(-1, m, n)
    eye = torch.eye(m, dtype=S.dtype, device=S.device)
    for i, run in enumerate(runs):
        G = X @ X.mT
        if i == 0:  # S S^T: normalise G here, and P below, instead of S
            sq = G.diagonal(dim1=-2, dim2=-1).sum(-1)  # ||S||_F^2
            pos = sq > 0
            r = (torch.where(pos, torch.where(pos, sq, 1.0).sqrt(), 0.0) + NS_EPS)[:, None, None]  # S = 0: r = eps
            G = G / (r * r)
        P = None
        for k in range(run):
            p = torch.baddbmm(torch.add(G, eye, alpha=a / b), G, G, beta=b, alpha=c)  # a I + b G + c G^2
            P = p if P is None else p @ P
            if k < run - 1:
                G = G @ (p @ p)
        X = (P / r if i == 0 else P) @ X
    X = X.view(shape)
    return X.mT if tall else X


def check_orthogonal_depth(rule: MemoryRule, depth: int) -> None:
    """Lattice's slot update is defined for a matrix memory: ValueError for ``optimizer='orthogonal'`` at depth > 1."""
    if rule.optimizer == "orthogonal" and depth != 1:
        raise ValueError(f"optimizer='orthogonal' (Lattice) updates the slots of a matrix memory: weights must be one "
                         f"layer (depth 1), got {depth}")


def orthogonal_step(A: Tensor, S: Tensor, eps: float = 1e-12) -> Tensor:
    """Lattice's update of a slot memory (arXiv 2504.05646; our reading, docs/MEMORY_RULE.md): the slots are the
    columns of ``A [..., D_out, m]``; each column of the step S is projected orthogonally to its slot,
    ``a_i + (I - a_i a_i^T / |a_i|^2) S_i``, and each new slot normalised to unit length. A slot of norm 0 takes the
    step unprojected (there is no direction to keep)."""
    sq = A.pow(2).sum(-2, keepdim=True)  # [..., 1, m]
    along = (A * S).sum(-2, keepdim=True) / sq.clamp_min(eps)
    moved = A + S - torch.where(sq > eps, along, torch.zeros_like(along)) * A
    return moved / torch.linalg.vector_norm(moved, dim=-2, keepdim=True).clamp_min(eps)


def token_loss(pred: Tensor, target: Tensor, rule: MemoryRule, delta: Tensor | None = None) -> Tensor:
    """The attentional bias of one token per leading index: pred, target ``[..., V]`` -> ``[...]``.

    ``l2`` ``||e||^2``; ``dot`` ``-<pred, target>``; ``lp`` ``sum |e|^p``; ``huber`` ``||e||^2`` where
    ``||e||_2 <= delta`` and ``delta ||e||_1`` elsewhere (the branch is a mask: no gradient flows through the choice),
    with ``e = pred - target`` and delta ``[...]``. Their gradients in pred: ``2e``, ``-target``,
    ``p sign(e) |e|^(p-1)``, ``2e`` / ``delta sign(e)``.
    """
    if rule.loss == "dot":
        return -(pred * target).sum(-1)
    e = pred - target
    if rule.loss == "l2":
        return e.pow(2).sum(-1)
    if rule.loss == "lp":
        return e.abs().pow(rule.p).sum(-1)
    sq = e.pow(2).sum(-1)
    inside = sq.detach() <= delta.detach() ** 2
    return torch.where(inside, sq, delta * e.abs().sum(-1))


# ----------------------------------------------------------------------------------------------------------------------
# the op's rule-specific arguments


def _check_gate(name: str, g, B: int, T: int, H: int, device, check_values: bool, *, positive: bool) -> None:
    if not isinstance(g, Tensor):
        raise TypeError(f"{name} must be a tensor, got {_describe(g)}")
    _check_float(name, g)
    if tuple(g.shape) != (B, T, H):
        raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got shape {tuple(g.shape)}")
    if g.device != device:
        raise ValueError(f"{name} is on {g.device} but q is on {device}")
    if not check_values or g.numel() == 0:
        return
    ok = (g > 0) & torch.isfinite(g) if positive else (g >= 0) & (g <= 1)  # NaN fails both
    if not bool(ok.all()):
        rng = "(0, inf) (finite)" if positive else "[0, 1]"
        raise ValueError(f"{name} must lie in {rng}, got values in [{g.min().item()}, {g.max().item()}]")


def check_rule_inputs(rule: MemoryRule, q, delta, gamma, initial_state, *, check_values: bool = True) -> None:
    """Validate the op's rule-specific arguments: delta (required for, and only for, huber), gamma, and the window
    tokens a state carries. Skips quietly where q itself is malformed (the op's own checks name that)."""
    if rule.loss == "huber" and delta is None:
        raise ValueError("delta ([B, T, H] Huber thresholds, > 0) is required for loss='huber'")
    if rule.loss != "huber" and delta is not None:
        raise ValueError(f"delta is used only by loss='huber'; rule {rule_name(rule)} has loss={rule.loss!r}")
    if not isinstance(q, Tensor) or q.ndim != 4:
        return
    B, T, H, _ = q.shape
    if delta is not None:
        _check_gate("delta", delta, B, T, H, q.device, check_values, positive=True)
    if gamma is not None:
        _check_gate("gamma", gamma, B, T, H, q.device, check_values, positive=False)
    if initial_state is None or not isinstance(initial_state, MemoryState):
        return
    win = initial_state.window
    if not isinstance(win, (tuple, list)) or len(win) not in (0, 3, 4):
        raise TypeError(f"initial_state.window must be () or a tuple (k, v, gamma[, delta]), got {_describe(win)}")
    if not win:
        return
    if len(win) != (4 if rule.loss == "huber" else 3):
        raise ValueError(f"initial_state.window carries {'no ' if len(win) == 3 else ''}delta, but rule "
                         f"{rule_name(rule)} has loss={rule.loss!r}: continue a stream with the rule that began it")
    n = win[0].shape[1] if isinstance(win[0], Tensor) and win[0].ndim == 4 else -1
    if not 0 < n < rule.window:
        raise ValueError(f"initial_state.window carries {_describe(win[0])} as its keys, but rule {rule_name(rule)} "
                         f"(window {rule.window}) carries 0 < n <= {rule.window - 1} tokens [B, n, H, K]: continue a "
                         "stream with the rule that began it")
    V = initial_state.weights[-1].shape[-2] if initial_state.weights else None
    wants = ((B, n, H, q.shape[-1]), (B, n, H, V), (B, n, H), (B, n, H))[:len(win)]
    for name, x, want in zip(("k", "v", "gamma", "delta"), win, wants, strict=False):  # delta only with huber
        if not isinstance(x, Tensor) or tuple(x.shape) != want:
            raise ValueError(f"initial_state.window's {name} must be {want}, got {_describe(x)}")
        _check_float(f"initial_state.window's {name}", x)
        if x.device != q.device:
            raise ValueError(f"initial_state.window's {name} is on {x.device} but q is on {q.device}")
