"""The memory rule, chunk-parallel, in plain PyTorch (the "dual form"). Derivation: docs/MEMORY_RULE.md.

Inside a chunk every gradient is taken at one anchor state, so token j's update to layer l is an outer product
``u_j = delta_j a_j^T`` of two vectors computed once at the anchor (the backpropagated error and the layer input).
Every per-token state of the chunk is then

    W_i = b_i W_0 + f_i S_0 - sum_{j<=i} G[i, j] theta_j u_j        S_i = e_i S_0 - sum_{j<=i} P_eta[i, j] theta_j u_j

with scalar coefficients built from cumulative products of eta and (1 - alpha). Reading the memory at W_i is a
C x C masked matmul per layer; no per-token copy of the weights is ever formed. The chunk-to-chunk dependency (each
anchor is the previous chunk's last state) is a loop over chunks; everything else is batched.

Stages (each has a counterpart in reference.py's definitions and can be checked alone):
    1. chunk_coefficients: b, e, f, G, P_eta from the gates                         (no state needed)
    2. anchor_errors:     layer inputs a and errors delta of the keys at the anchor  (the gradients u = delta a^T)
    3. chunk_read:        outputs of the chunk's queries through W_1..W_C             (dual form)
    4. chunk_state:       W and S after the chunk's last token                        (state carry)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import MemoryState, _no_autocast, activate, activate_grad, check_inputs, loss_output_grad


def segment_products(x: Tensor) -> Tensor:
    """``P[..., i, j] = prod_{j < m <= i} x[..., m]`` for j <= i, 0 above the diagonal. x ``[..., n]`` -> ``[..., n, n]``.

    Built with a masked cumprod rather than ratios of cumulative products, so zeros in x (eta = 0, alpha = 1) are exact
    and differentiable.
    """
    n = x.shape[-1]
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    factors = torch.where(strictly_lower, x.unsqueeze(-1), torch.ones((), dtype=x.dtype, device=x.device))  # [.., n, n]
    return torch.cumprod(factors, dim=-2).tril()


def chunk_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor) -> tuple[Tensor, ...]:
    """Scalar coefficients of one chunk, gates ``[..., n]`` (leading dims are any batch of chunks).

    Returns ``(b, e, f, G_theta, P_theta)``:
        b ``[..., n]``: prod_{m<=i} (1 - alpha_m), the decay of the chunk's starting memory W_0 up to token i;
        e ``[..., n]``: prod_{m<=i} eta_m, the decay of the starting momentum S_0;
        f ``[..., n]``: sum_{j<=i} P_beta[i, j] e_j, how much of S_0 has flowed into W_i;
        G_theta ``[..., n, n]``: (P_beta @ P_eta)[i, j] * theta_j, weight of u_j in W_i;
        P_theta ``[..., n, n]``: P_eta[i, j] * theta_j, weight of u_j in S_i.
    """
    beta = 1.0 - alpha
    p_eta = segment_products(eta)  # [..., n, n]
    p_beta = segment_products(beta)  # [..., n, n]
    b = torch.cumprod(beta, dim=-1)  # [..., n]
    e = torch.cumprod(eta, dim=-1)  # [..., n]
    f = (p_beta @ e.unsqueeze(-1)).squeeze(-1)  # [..., n]
    g = p_beta @ p_eta  # [..., n, n], lower triangular
    th = theta.unsqueeze(-2)  # [..., 1, n]: scales column j
    return b, e, f, g * th, p_eta * th


def anchor_errors(
    k: Tensor, v: Tensor, anchor: Sequence[Tensor], *, residual: bool, activation: str, loss: str = "l2"
) -> tuple[list[Tensor], list[Tensor]]:
    """Forward the chunk's keys through the anchor memory and backpropagate the associative loss by hand.

    k ``[B, H, n, K]``, v ``[B, H, n, V]``, anchor L x ``[(B,) H, D_out, D_in]``. Returns per layer l the inputs
    ``a_l [B, H, n, D_in]`` and output errors ``delta_l [B, H, n, D_out]``; token j's gradient for layer l is
    ``outer(delta_l[j], a_l[j])``.
    """
    L = len(anchor)
    inputs, pre = [], []  # a_{l-1} and z_l per layer
    h = k
    for i, w in enumerate(anchor):
        inputs.append(h)
        z = h @ w.transpose(-1, -2)  # [B, H, n, D_out]
        pre.append(z)
        h = activate(z, activation) if i < L - 1 else z
    pred = h + k if residual else h
    errors = [None] * L
    errors[-1] = loss_output_grad(pred, v, loss)  # [B, H, n, V]
    for i in range(L - 2, -1, -1):
        back = errors[i + 1] @ anchor[i + 1]  # [B, H, n, D_out of layer i]
        errors[i] = back * activate_grad(pre[i], activation)
    return inputs, errors


def chunk_read(
    q: Tensor,
    W: Sequence[Tensor],
    S: Sequence[Tensor],
    inputs: Sequence[Tensor],
    errors: Sequence[Tensor],
    b: Tensor,
    f: Tensor,
    g_theta: Tensor,
    *,
    residual: bool,
    activation: str,
) -> Tensor:
    """``o_i = M(q_i; W_i)`` for every token i of the chunk, without forming W_i. q ``[B, H, n, K]`` -> ``[B, H, n, V]``.

    Layer l maps its query-side input x_i to ``W_{l,i} x_i = b_i W_l x_i + f_i S_l x_i
    - sum_j G_theta[i, j] (a_{l,j} . x_i) delta_{l,j}``.
    """
    L = len(W)
    x = q
    for i in range(L):
        z = (
            b.unsqueeze(-1) * (x @ W[i].transpose(-1, -2))  # [B, H, n, D_out]
            + f.unsqueeze(-1) * (x @ S[i].transpose(-1, -2))
            - (g_theta * (x @ inputs[i].transpose(-1, -2))) @ errors[i]  # ([B, H, n, n] masked) @ [B, H, n, D_out]
        )
        x = activate(z, activation) if i < L - 1 else z
    return x + q if residual else x


def chunk_state(
    W: Sequence[Tensor],
    S: Sequence[Tensor],
    inputs: Sequence[Tensor],
    errors: Sequence[Tensor],
    b: Tensor,
    e: Tensor,
    f: Tensor,
    g_row: Tensor,
    p_row: Tensor,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Memory and momentum after the chunk's token ``last``: b, e, f ``[B, H]`` and g_row, p_row ``[B, H, n]`` are the
    coefficients' values (rows) at that token."""
    bb, ee, ff = (c[..., None, None] for c in (b, e, f))  # [B, H, 1, 1]
    W_new, S_new = [], []
    for w, s, a, d in zip(W, S, inputs, errors):
        W_new.append(_minus_outer_sum(torch.addcmul(bb * w, ff, s), d, g_row, a))
        S_new.append(_minus_outer_sum(ee * s, d, p_row, a))
    return tuple(W_new), tuple(S_new)


def _minus_outer_sum(base: Tensor, d: Tensor, c: Tensor, a: Tensor) -> Tensor:
    """``base - sum_j c_j outer(d_j, a_j)`` = ``base - d^T diag(c) a``, as one fused batched matmul-add.

    base ``[B, H, D_out, D_in]``, d ``[B, H, n, D_out]``, c ``[B, H, n]``, a ``[B, H, n, D_in]``.
    """
    n, d_out, d_in = a.shape[-2], base.shape[-2], base.shape[-1]
    out = torch.baddbmm(
        base.reshape(-1, d_out, d_in),
        d.transpose(-1, -2).reshape(-1, d_out, n),  # [B*H, D_out, n]
        (c.unsqueeze(-1) * a).reshape(-1, n, d_in),  # [B*H, n, D_in]
        alpha=-1,
    )
    return out.view(base.shape)


def _chunk(qc, kc, vc, coefs, W, S, A, last: int, residual: bool, activation: str, loss: str):
    """One chunk: stages 2-4. ``last`` is the index of the chunk's last real token (the rest is padding)."""
    b, e, f, g_theta, p_theta = coefs
    inputs, errors = anchor_errors(kc, vc, A, residual=residual, activation=activation, loss=loss)
    o = chunk_read(qc, W, S, inputs, errors, b, f, g_theta, residual=residual, activation=activation)
    W, S = chunk_state(W, S, inputs, errors, b[..., last], e[..., last], f[..., last], g_theta[..., last, :], p_theta[..., last, :])
    return o, W, S


def neural_memory_chunked(
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
) -> tuple[Tensor, MemoryState | None]:
    """Chunk-parallel form of the memory rule; same contract as :func:`mnemos.ops.neural_memory`."""
    spec = check_inputs(
        q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum, residual=residual,
        activation=activation, initial_state=initial_state, loss=loss,
    )
    B, T, H, dt = spec.B, spec.T, spec.H, spec.dtype
    C = chunk_size
    with _no_autocast(q.device):
        # [B, T, H, D] -> [B, H, T, D]; gates [B, T, H] -> [B, H, T]
        qh, kh, vh = (x.to(dt).transpose(1, 2) for x in (q, k, v))
        th, et, al = (g.to(dt).transpose(1, 2) for g in (theta, eta, alpha))
        W = tuple(w.to(dt) for w in spec.weights)  # [H, ...] (shared) or [B, H, ...]
        if spec.momentum is None:
            S = tuple(torch.zeros(B, *w.shape[-3:], dtype=dt, device=q.device) for w in W)
        else:
            S = tuple(s.to(dt) for s in spec.momentum)
        A = W if spec.anchor is None else tuple(a.to(dt) for a in spec.anchor)

        outputs = []
        # a stream that stopped inside a chunk finishes that chunk first, against the anchor it carried
        start = 0
        if spec.offset > 0:
            n0 = min(C - spec.offset, T)
            sl = slice(0, n0)
            coefs = chunk_coefficients(th[..., sl], et[..., sl], al[..., sl])
            o, W, S = _chunk(qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], coefs, W, S, A, n0 - 1, residual, activation, loss)
            outputs.append(o)
            start = n0
        rest = T - start
        if rest > 0:
            if rest < C:  # a short input (e.g. one decoding step) is one chunk of its own length, unpadded
                C = rest
            nc = -(-rest // C)  # number of chunks, the last one padded
            pad = nc * C - rest

            def chunks(x: Tensor) -> Tensor:  # [B, H, rest, (D)] -> [B, H, nc, C, (D)]
                x = x[:, :, start:]
                if pad:
                    x = F.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad))
                return x.reshape(B, H, nc, C, *x.shape[3:])

            qc, kc, vc, thc, etc, alc = (chunks(x) for x in (qh, kh, vh, th, et, al))
            coefs = chunk_coefficients(thc, etc, alc)  # all chunks at once: [B, H, nc, C(, C)]
            # unbind (not indexing) so that the backward stacks the chunks' gradients once instead of
            # scattering each chunk into a fresh full-size zero tensor
            per_chunk = zip(qc.unbind(2), kc.unbind(2), vc.unbind(2), zip(*(x.unbind(2) for x in coefs)))
            for c, (q_c, k_c, v_c, coefs_c) in enumerate(per_chunk):
                A = W  # a chunk boundary: this chunk's gradients are taken at the memory as it is now
                last = C - 1 if c < nc - 1 else C - 1 - pad
                o, W, S = _chunk(q_c, k_c, v_c, coefs_c, W, S, A, last, residual, activation, loss)
                outputs.append(o if last == C - 1 else o[:, :, : last + 1])
        o = torch.cat(outputs, dim=2).transpose(1, 2).to(q.dtype)  # [B, T, H, V]
    if not output_final_state:
        return o, None
    offset = (spec.offset + T) % chunk_size
    if offset == 0:
        A = W
    A = tuple(a.expand(B, *a.shape[-3:]) for a in A)  # a short first call may still anchor at the shared W_0
    return o, MemoryState(W, S, A, offset, chunk_size)
