"""The memory rule token by token: slow, plain, and the truth every fast path is tested against.

Each token's gradient is taken with ``torch.autograd.grad`` of the associative loss at the chunk's anchor state, so
this file shares no hand-written backpropagation with the fast paths. Run it in float64 for tests.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .common import MemoryState, _no_autocast, activate, associative_loss, check_inputs


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


def neural_memory_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Sequence[Tensor] | None = None,
    *,
    chunk_size: int = 16,
    momentum: Sequence[Tensor] | None = None,
    residual: bool = True,
    activation: str = "gelu",
    loss: str = "l2",
    initial_state: MemoryState | None = None,
    output_final_state: bool = False,
    check_values: bool = True,
    normalize_step: bool = False,
) -> tuple[Tensor, MemoryState | None]:
    """Titans' memory rule (arXiv 2501.00663, section 3.2), one token at a time. Same contract as
    :func:`mnemos.ops.neural_memory`.

    For token t of chunk c (chunks of ``chunk_size`` tokens, counted from the start of the stream)::

        u_t = grad_W loss(M(k_t; W_anchor), v_t)          W_anchor = memory at the end of chunk c-1
                                                          loss: ||.-v||^2 (l2) or -<., v> (dot)
        theta_t <- theta_t / max(1, ||u_t||^2 / ||dloss/dM||^2)    with normalize_step
        S_t = eta_t * S_{t-1} - theta_t * u_t
        W_t = (1 - alpha_t) * W_{t-1} + S_t
        o_t = M(q_t; W_t)
    """
    spec = check_inputs(
        q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum, residual=residual,
        activation=activation, initial_state=initial_state, loss=loss, check_values=check_values,
    )
    B, T, dt = spec.B, spec.T, spec.dtype
    # the outer graph is needed when anything that reaches the output requires grad
    tensors = [q, k, v, theta, eta, alpha, *spec.weights, *(spec.momentum or ()), *(spec.anchor or ())]
    create_graph = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    with _no_autocast(q.device):
        W = tuple(w.to(dt).expand(B, *w.shape[-3:]) for w in spec.weights)  # L x [B, H, D_out, D_in]
        if spec.momentum is None:
            S = tuple(torch.zeros(B, *w.shape[-3:], dtype=dt, device=q.device) for w in spec.weights)
        else:
            S = tuple(s.to(dt) for s in spec.momentum)
        A = W if spec.anchor is None else tuple(a.to(dt) for a in spec.anchor)
        offset = spec.offset

        outputs = []
        for t in range(T):
            if offset == 0:  # a chunk starts here: its gradients are all taken at the memory as it is now
                A = W
            q_t, k_t, v_t = (x[:, t].to(dt) for x in (q, k, v))  # [B, H, D]
            th, et, al = (g[:, t].to(dt)[:, :, None, None] for g in (theta, eta, alpha))  # [B, H, 1, 1]

            # u_t: per (b, h) gradient; the losses of different (b, h) touch disjoint slices, so one sum serves all.
            # Under no_grad / inference_mode the gradient is taken on fresh leaves (no outer graph is needed).
            with torch.inference_mode(False), torch.enable_grad():
                A_leaf = tuple(a if create_graph and a.requires_grad else _fresh_leaf(a) for a in A)
                kk, vv = (x.clone() if x.is_inference() else x for x in (k_t, v_t))
                m_k = _memory(kk, A_leaf, residual, activation)
                ell = associative_loss(m_k, vv, loss)
                *U, g_m = torch.autograd.grad(ell, (*A_leaf, m_k), create_graph=create_graph)
            if normalize_step:  # the step's curvature along the error, at the anchor (differentiated like the rest)
                rho = sum(u.pow(2).sum((-2, -1)) for u in U) / g_m.pow(2).sum(-1).clamp_min(1e-30)
                th = th / rho.clamp_min(1.0)[:, :, None, None]

            S = tuple(et * s - th * u for s, u in zip(S, U))
            W = tuple((1 - al) * w + s for w, s in zip(W, S))
            outputs.append(_memory(q_t, W, residual, activation))
            offset = (offset + 1) % chunk_size

    o = torch.stack(outputs, dim=1).to(q.dtype)  # [B, T, H, V]
    if not output_final_state:
        return o, None
    anchor = W if offset == 0 else A
    return o, MemoryState(W, S, anchor, offset, chunk_size)
