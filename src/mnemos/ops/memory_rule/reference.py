"""The memory rule token by token: slow, plain, and the truth every fast path is tested against. Every axis of the
rule (rule.py: loss, retention, inner optimiser, Omega window) is implemented here.

Each token's gradient is taken with ``torch.autograd.grad`` of the associative loss at the chunk's anchor state, so
this file shares no hand-written backpropagation with the fast paths. Run it in float64 for tests.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .common import MemoryState, _no_autocast, activate, check_inputs
from .rule import MemoryRule, check_orthogonal_depth, check_rule_inputs, effective_weights, newton_schulz, \
    normalize_step_unsupported, orthogonal_step, resolve_rule, token_loss


def _memory(x: Tensor, weights: Sequence[Tensor], residual: bool, activation: str) -> Tensor:
    """M(x; W) for one token per (batch, head): x ``[B, H, D_in]``, weights ``[B, H, D_out, D_in]``."""
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("bhoi,bhi->bho", w, h)
        if i < len(weights) - 1:
            h = activate(h, activation)
    return h + x if residual else h


def _fresh_leaf(a: Tensor) -> Tensor:
    a = a.detach()
    return (a.clone() if a.is_inference() else a).requires_grad_()


def _usable(x: Tensor | None) -> Tensor | None:
    """x as autograd can use it inside inference mode's exit (an inference tensor is cloned)."""
    return x.clone() if x is not None and x.is_inference() else x


def neural_memory_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Sequence[Tensor] | None = None,
    *,
    rule: str | MemoryRule = "titans",
    delta: Tensor | None = None,
    gamma: Tensor | None = None,
    chunk_size: int = 16,
    momentum: Sequence[Tensor] | None = None,
    residual: bool = True,
    activation: str = "gelu",
    loss: str | None = None,
    initial_state: MemoryState | None = None,
    output_final_state: bool = False,
    check_values: bool = True,
    normalize_step: bool = False,
) -> tuple[Tensor, MemoryState | None]:
    """The memory rule (Titans, arXiv 2501.00663, section 3.2, with the axes of Miras and Atlas), one token at a time.
    Same contract as :func:`mnemos.ops.neural_memory`.

    The state holds accumulators A (weights), S (momentum) and the anchor; the memory reads ``F(A)``
    (:func:`~.rule.effective_weights`). For token t of chunk c (chunks of ``chunk_size`` tokens, counted from the
    start of the stream), with ``W_bar = F(A_anchor)``, A_anchor the accumulator at the end of chunk c-1::

        u_t = grad_W sum_{i = t-window+1 .. t} gamma_i * loss_i(M(k_i; W), v_i)  at W = W_bar
                                                       (rule.loss; tokens before the stream's start are absent)
        theta_t <- theta_t / max(1, ||u_t||^2 / ||dloss/dM||^2)    with normalize_step
        momentum: S_t = eta_t * S_{t-1} - theta_t * u_t;   A_t = (1 - alpha_t) * A_{t-1} + S_t
        muon:     S_t = eta_t * S_{t-1} - u_t;             A_t = (1 - alpha_t) * A_{t-1} + theta_t * NS(S_t)
        orthogonal (Lattice, a matrix memory): S_t = eta_t * S_{t-1} - theta_t * u_t;
                  A_t = orthogonal_step((1 - alpha_t) * A_{t-1}, S_t)   (each slot, a column, moves orthogonally to
                  itself and is renormalised)
        o_t = M(q_t; F(A_t))
    """
    rule = resolve_rule(rule, loss)
    spec = check_inputs(
        q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum, residual=residual,
        activation=activation, initial_state=initial_state, loss=None, check_values=check_values,
    )
    check_rule_inputs(rule, q, delta, gamma, initial_state, check_values=check_values)
    if not isinstance(normalize_step, bool):
        raise TypeError(f"normalize_step must be a bool, got {normalize_step!r}")
    if normalize_step and normalize_step_unsupported(rule) is not None:
        raise ValueError(normalize_step_unsupported(rule))
    check_orthogonal_depth(rule, len(spec.weights))
    B, T, dt = spec.B, spec.T, spec.dtype
    huber, weighted = rule.loss == "huber", gamma is not None or rule.window > 1
    carried = tuple(initial_state.window) if initial_state is not None else ()
    # the outer graph is needed when anything that reaches the output requires grad
    tensors = [q, k, v, theta, eta, alpha, *spec.weights, *(spec.momentum or ()), *(spec.anchor or ()), *carried,
               *(x for x in (delta, gamma) if x is not None)]
    create_graph = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    with _no_autocast(q.device):
        A = tuple(w.to(dt).expand(B, *w.shape[-3:]) for w in spec.weights)  # L x [B, H, D_out, D_in]
        if spec.momentum is None:
            S = tuple(torch.zeros(B, *w.shape[-3:], dtype=dt, device=q.device) for w in spec.weights)
        else:
            S = tuple(s.to(dt) for s in spec.momentum)
        anchor = A if spec.anchor is None else tuple(a.to(dt) for a in spec.anchor)
        W_bar = effective_weights(anchor, rule)
        offset = spec.offset

        # the window: (k, v, gamma, delta) per token, [B, H, D] / [B, H]; the carried tokens first
        n0 = carried[0].shape[1] if carried else 0
        win = [tuple(x[:, j] for x in carried) + ((None,) if not huber else ()) for j in range(n0)]
        outputs = []
        for t in range(T):
            if offset == 0:  # a chunk starts here: its gradients are all taken at the memory as it is now
                anchor = A
                W_bar = effective_weights(anchor, rule)
            q_t, k_t, v_t = (x[:, t].to(dt) for x in (q, k, v))  # [B, H, D]
            th, et, al = (g[:, t].to(dt)[:, :, None, None] for g in (theta, eta, alpha))  # [B, H, 1, 1]
            g_t = None if not weighted else (gamma[:, t] if gamma is not None else torch.ones_like(theta[:, t]))
            win = (win + [(k[:, t], v[:, t], g_t, delta[:, t] if huber else None)])[-rule.window:]

            # u_t: per (b, h) gradient; the losses of different (b, h) touch disjoint slices, so one sum serves all.
            # Under no_grad / inference_mode the gradient is taken on fresh leaves (no outer graph is needed).
            with torch.inference_mode(False), torch.enable_grad():
                W_leaf = tuple(w if create_graph and w.requires_grad else _fresh_leaf(w) for w in W_bar)
                ell = 0.0
                for k_i, v_i, g_i, d_i in win:
                    m_k = _memory(_usable(k_i).to(dt), W_leaf, residual, activation)
                    ell_i = token_loss(m_k, _usable(v_i).to(dt), rule, _usable(d_i).to(dt) if huber else None)
                    ell = ell + (ell_i if g_i is None else _usable(g_i).to(dt) * ell_i).sum()
                *U, g_m = torch.autograd.grad(ell, (*W_leaf, m_k), create_graph=create_graph)
            if normalize_step:  # the step's curvature along the error, at the anchor (differentiated like the rest)
                rho = sum(u.pow(2).sum((-2, -1)) for u in U) / g_m.pow(2).sum(-1).clamp_min(1e-30)
                th = th / rho.clamp_min(1.0)[:, :, None, None]

            if rule.optimizer == "momentum":
                S = tuple(et * s - th * u for s, u in zip(S, U, strict=True))
                A = tuple((1 - al) * a + s for a, s in zip(A, S, strict=True))
            elif rule.optimizer == "orthogonal":  # Lattice: the slots move orthogonally to themselves, stay unit
                S = tuple(et * s - th * u for s, u in zip(S, U, strict=True))
                A = tuple(orthogonal_step((1 - al) * a, s) for a, s in zip(A, S, strict=True))
            else:  # muon: the momentum of the raw gradients, orthogonalised, is the step
                S = tuple(et * s - u for s, u in zip(S, U, strict=True))
                A = tuple((1 - al) * a + th * newton_schulz(s, rule.ns_steps) for a, s in zip(A, S, strict=True))
            outputs.append(_memory(q_t, effective_weights(A, rule), residual, activation))
            offset = (offset + 1) % chunk_size
            win = win[-(rule.window - 1):] if rule.window > 1 else []  # what the next token's window keeps

    o = torch.stack(outputs, dim=1).to(q.dtype)  # [B, T, H, V]
    if not output_final_state:
        return o, None
    anchor = A if offset == 0 else anchor
    window = ()
    if win:  # the last window - 1 tokens, [B, n, H, ...]
        window = tuple(torch.stack([w[j] for w in win], dim=1) for j in range(4 if huber else 3))
    return o, MemoryState(A, S, anchor, offset, chunk_size, window)
