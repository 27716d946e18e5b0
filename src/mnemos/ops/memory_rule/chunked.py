"""The memory rule, chunk-parallel, in plain PyTorch (the "dual form"), with a hand-written backward.
Derivation: docs/MEMORY_RULE.md.

Inside a chunk every gradient is taken at one anchor state, so token j's update to layer l is an outer product
``u_j = delta_j a_j^T`` of two vectors computed once at the anchor (the backpropagated error and the layer input).
Every per-token state of the chunk is then

    W_i = b_i W_0 + f_i S_0 - sum_{j<=i} G[i, j] theta_j u_j        S_i = e_i S_0 - sum_{j<=i} P_eta[i, j] theta_j u_j

with scalar coefficients built from cumulative products of eta and (1 - alpha). Reading the memory at W_i is a
C x C masked matmul per layer; no per-token copy of the weights is ever formed. The chunk-to-chunk dependency (each
anchor is the previous chunk's last state) is a loop over chunks; everything else is batched.

Per layer the state is kept stacked as ``[W; S]`` (``[B, H, 2 D_out, D_in]``), so that reading both, updating both
and backpropagating into both are one matmul each.

Stages of one chunk (each is a plain function; ``_chunk_backward`` is their reverse, written out):
    1. chunk_coefficients: b, e, f, G, P from the gates (all chunks at once, differentiated by autograd)
    2. _anchor_forward:    layer inputs a and errors delta of the keys at the anchor (the gradients u = delta a^T)
    3. _read_forward:      outputs of the chunk's queries through W_1..W_C (dual form)
    4. _state_forward:     [W; S] after the chunk's last real token (state carry)

The backward (``_ChunkScan``) walks the chunks in reverse with the gradient of the state as its carry. It keeps the
state at every chunk start and the chunk's small activations from the forward, and recomputes nothing. Autograd's
own backward of the same loop was ~3x the forward; this one is ~2x (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (
    MemoryState,
    _no_autocast,
    activate,
    activate_grad,
    activate_grad2,
    check_inputs,
    loss_output_grad,
)


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


# ----------------------------------------------------------------------------------------------------------------------
# one chunk, forward. Shapes: tokens [B, H, n, D], coefficients [B, H, n] / [B, H, n, n], states [B, H, 2 D_out, D_in]


def _split(ws: Tensor) -> tuple[Tensor, Tensor]:
    """``[W; S]`` -> (W, S), views."""
    d_out = ws.shape[-2] // 2
    return ws[..., :d_out, :], ws[..., d_out:, :]


def _bmm_add(base: Tensor, x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
    """``base += alpha * x @ y`` in place for [B, H, m, n] operands (one fused batched matmul-add); returns base.

    base must be a tensor the caller owns whose (B, H) dims merge into one (contiguous, or a slice of the last two
    dims of a contiguous tensor). In place on purpose: a fresh state-sized output per chunk costs
    more in first-touch page faults than the matmul itself on a CPU."""
    base.view(-1, *base.shape[-2:]).baddbmm_(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]), alpha=alpha)
    return base


def _anchor_forward(k: Tensor, v: Tensor, anchor: Sequence[Tensor], *, residual: bool, activation: str, loss: str):
    """Forward the chunk's keys through the anchor memory and backpropagate the associative loss by hand.

    Returns per layer l: ``a[l]`` its input (a[0] = k), ``d[l]`` its output error (token j's gradient for layer l is
    ``outer(d[l][j], a[l][j])``); and per hidden layer: ``z[l]`` the pre-activation, ``dact[l] = act'(z[l])``,
    ``back[l] = d[l + 1] @ W[l + 1]`` (what the backward needs).
    """
    L = len(anchor)
    a, z = [k], []
    h = k
    for i, w in enumerate(anchor):
        zi = h @ w.mT
        if i < L - 1:
            z.append(zi)
            h = activate(zi, activation)
            a.append(h)
        else:
            pred = zi + k if residual else zi
    dact = [activate_grad(zi, activation) for zi in z]
    d: list[Tensor] = [None] * L  # type: ignore[list-item]
    back: list[Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    d[-1] = loss_output_grad(pred, v, loss)
    for i in range(L - 2, -1, -1):
        back[i] = d[i + 1] @ anchor[i + 1]
        d[i] = back[i] * dact[i]
    return a, z, dact, back, d


def step_curvature(k: Tensor, v: Tensor, weights: Sequence[Tensor], *, residual: bool = True,
                   activation: str = "gelu") -> Tensor:
    """How far one inner step moves the memory's own answer, per unit of step: ``||grad_W l||^2 / ||grad_M l||^2``.

    For token t with ``l = ||M(k_t; W) - v_t||^2`` a step ``-theta * grad_W l`` changes ``M(k_t)`` along its error
    by ``-theta * rho_t * grad_M l`` to first order, with ``rho_t`` returned here ``[B, T, H]``: the curvature of the
    inner problem along that error (``||k_t||^2`` for a matrix memory: 1 with unit keys; for an MLP memory it depends
    on the weights). k, v ``[B, T, H, D]``; weights L x ``[B, H, D_out, D_in]`` or ``[H, D_out, D_in]``.
    """
    with torch.no_grad(), _no_autocast(k.device):
        a, _, _, _, d = _anchor_forward(k.float().transpose(1, 2), v.float().transpose(1, 2),
                                        [w.float() for w in weights], residual=residual, activation=activation,
                                        loss="l2")
        rho = _curvature(a, d)  # [B, H, T]
    return rho.transpose(1, 2)


def _curvature(a: Sequence[Tensor], d: Sequence[Tensor]) -> Tensor:
    """``||u||^2 / ||d_L||^2`` per token from the layer inputs a and errors d (u_l = d_l a_l^T): ``[..., n]``."""
    num = sum(ai.pow(2).sum(-1) * di.pow(2).sum(-1) for ai, di in zip(a, d))
    return num / d[-1].pow(2).sum(-1).clamp_min(1e-30)


def _step_scale(a: Sequence[Tensor], d: Sequence[Tensor]) -> Tensor:
    """``normalize_step``: each token's step is divided by max(1, curvature) at the anchor: ``s [..., n, 1]``.
    Differentiable like any torch op (decoding); the chunk scan's backward writes its gradient out
    (:func:`_step_scale_backward`)."""
    return _curvature(a, d).clamp_min(1.0).reciprocal().unsqueeze(-1)


def _step_scale_backward(a, d, s, dd, da) -> None:
    """The gradient through ``du_l = s d_l`` with ``s = 1 / max(1, rho)``, ``rho = sum_l |a_l|^2 |d_l|^2 / |d_L|^2``.
    On entry ``dd[l]`` is the gradient of du_l and ``da[l]`` that of a_l from the read and the state; on return both
    hold the gradients of d_l and a_l (in place where they can be)."""
    g_s = sum((x * di).sum(-1, keepdim=True) for x, di in zip(dd, d))  # [B, H, n, 1]
    g_rho = torch.where(s < 1.0, -g_s * s * s, torch.zeros_like(g_s))  # ds/drho = -1/rho^2 = -s^2 where rho > 1
    inv_q = d[-1].pow(2).sum(-1, keepdim=True).clamp_min(1e-30).reciprocal()
    c = 2.0 * g_rho * inv_q
    for i, (ai, di) in enumerate(zip(a, d)):
        dd[i] = dd[i] * s + (c * ai.pow(2).sum(-1, keepdim=True)) * di
        da[i] = da[i] + (c * di.pow(2).sum(-1, keepdim=True)) * ai
    # rho's denominator |d_L|^2; c is 0 wherever rho <= 1, and rho = 1 / s wherever it is not
    dd[-1] = dd[-1] - (c / s) * d[-1]


def _read_forward(q, WS, a, d, b, f, G, *, residual: bool, activation: str):
    """``o_i = M(q_i; W_i)`` for every token i of the chunk, without forming W_i.

    Layer l maps its query-side input x_i to ``W_{l,i} x_i = b_i W_l x_i + f_i S_l x_i - sum_j G[i, j] (a_{l,j} . x_i)
    d_{l,j}``. Returns o and, per layer, the input x, ``x @ [W; S]^T`` and ``P = x a^T``, and per hidden layer the
    pre-activation y (saved for the backward).
    """
    L = len(WS)
    bc, fc = b.unsqueeze(-1), f.unsqueeze(-1)
    h = q
    xs, ys, xws, ps = [], [], [], []
    for i in range(L):
        d_out = WS[i].shape[-2] // 2
        xw = h @ WS[i].mT  # [B, H, n, 2 D_out]: x W^T | x S^T
        p = h @ a[i].mT  # [B, H, n, n]
        y = torch.addcmul(bc * xw[..., :d_out], fc, xw[..., d_out:]) - (G * p) @ d[i]
        xs.append(h)
        xws.append(xw)
        ps.append(p)
        if i < L - 1:
            ys.append(y)
            h = activate(y, activation)
    o = y + q if residual else y
    return o, xs, ys, xws, ps


def _mix(ws: Tensor, top: Tensor, bottom: Tensor, cross: Tensor, inplace: bool = False) -> Tensor:
    """``[top X + cross Y; bottom Y]`` for ``ws = [X; Y]`` and per-(batch, head) scalars ``[B, H]`` (the state carry
    of a chunk), into a new tensor or, with ``inplace``, into ws; 1.5 passes over the state either way."""
    out = ws if inplace else torch.empty_like(ws)
    (X, Y), (oX, oY) = _split(ws), _split(out)
    torch.mul(X, top[..., None, None], out=oX).addcmul_(cross[..., None, None], Y)  # reads Y before it is scaled
    torch.mul(Y, bottom[..., None, None], out=oY)
    return out


def _mix_transposed_(g: Tensor, top: Tensor, bottom: Tensor, cross: Tensor) -> Tensor:
    """``[X; Y] <- [top X; bottom Y + cross X]`` in place (the reverse of :func:`_mix`, for the state gradient)."""
    d_out = g.shape[-2] // 2
    X, Y = g[..., :d_out, :], g[..., d_out:, :]
    Y.mul_(bottom[..., None, None]).addcmul_(cross[..., None, None], X)
    X.mul_(top[..., None, None])
    return g


def _state_forward(WS, a, d, bl, el, fl, gl, pl, inplace: bool = False) -> list[Tensor]:
    """``[W; S]`` after the chunk's last real token. bl, el, fl ``[B, H]`` and gl, pl ``[B, H, n]`` are the
    coefficients' values (rows) at that token: ``W' = bl W + fl S - d^T diag(gl) a``, ``S' = el S - d^T diag(pl) a``.
    ``inplace`` overwrites WS (when nothing keeps the chunk's starting state)."""
    gc, pc = gl.unsqueeze(-1), pl.unsqueeze(-1)
    out = []
    for ws, ai, di in zip(WS, a, d):
        coef = torch.cat((gc * di, pc * di), dim=-1)  # [B, H, n, 2 D_out]
        out.append(_bmm_add(_mix(ws, bl, el, fl, inplace), coef.mT, ai, alpha=-1.0))
    return out


def _scan(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, residual, activation, loss, save: bool,
          normalize: bool = False):
    """Every chunk in order. Chunk-major inputs: tokens ``[nc, B, H, n, D]``, coefficients ``[nc, B, H, n(, n)]`` and
    ``[nc, B, H(, n)]`` (rows at each chunk's last real token); WS: L x ``[B, H, 2 D_out, D_in]`` at the first chunk's
    start (without ``save`` they are updated in place: the caller must own them); A: the first chunk's anchor
    (L x ``[B, H, D_out, D_in]``) when it is not that chunk's starting memory (a stream continued mid-chunk), else None.

    Returns o ``[nc, B, H, n, V]``, the final WS, the last chunk's starting WS, and when ``save``: every chunk's
    starting WS and activations."""
    nc = q.shape[0]
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    starts, saved = [], []
    opts = dict(residual=residual, activation=activation)
    for c in range(nc):
        anchor = A if (c == 0 and A is not None) else [_split(ws)[0] for ws in WS]
        a, z, dact, back, d = _anchor_forward(k[c], v[c], anchor, loss=loss, **opts)
        s = _step_scale(a, d).detach() if normalize else None  # the backward differentiates it by hand
        du = d if s is None else [di * s for di in d]  # the errors the update uses: u_l = du_l a_l^T
        o[c], xs, ys, xws, ps = _read_forward(q[c], WS, a, du, b[c], f[c], G[c], **opts)
        if save:
            starts.append(WS)
            saved.append((a, z, dact, back, d, xs, ys, xws, ps, s))
        last_start = WS if save or c < nc - 1 else [ws.clone() for ws in WS]
        WS = _state_forward(WS, a, du, bl[c], el[c], fl[c], gl[c], pl[c], inplace=not save)
    return o, WS, last_start, starts, saved


# ----------------------------------------------------------------------------------------------------------------------
# one chunk, backward: the reverse of the three forward stages, written out


def _chunk_backward(do, dWS_next, WS, A, acts, b, f, G, bl, el, fl, gl, pl, *, residual, activation, loss,
                    normalize: bool = False):
    """Gradients of one chunk, given ``do`` (its outputs) and ``dWS_next`` (the state after it; owned, and turned in
    place into the gradient of the state before the chunk).

    Returns (dq, dk, dv, db, df, dG, dbl, del, dfl, dgl, dpl, dWS, dA): dWS is the gradient of the chunk's starting
    ``[W; S]`` (anchor included when the anchor is W), dA that of a separate anchor (None when A is None)."""
    a, z, dact, back, d, xs, ys, xws, ps, s = acts
    du = d if s is None else [di * s for di in d]  # what the update used (normalize: s is a constant)
    L = len(WS)
    gc, pc = gl.unsqueeze(-1), pl.unsqueeze(-1)
    da: list[Tensor] = [None] * L  # type: ignore[list-item]
    dd: list[Tensor] = [None] * L  # type: ignore[list-item]
    dWS: list[Tensor] = []
    dbl = del_ = dfl = dgl = dpl = 0.0

    # 4. state: W' = bl W + fl S - d^T diag(gl) a,  S' = el S - d^T diag(pl) a
    for i in range(L):
        g = dWS_next[i]
        d_out = g.shape[-2] // 2
        # <dW', W>, <dW', S>, <dS', W>, <dS', S> in one pass: [2, 2 D_out D_in] @ [2 D_out D_in, 2]
        BH = g.shape[0] * g.shape[1]
        dots = torch.bmm(g.reshape(BH, 2, -1), WS[i].reshape(BH, 2, -1).mT).view(*g.shape[:2], 2, 2)
        dbl = dbl + dots[..., 0, 0]
        dfl = dfl + dots[..., 0, 1]
        del_ = del_ + dots[..., 1, 1]
        r = a[i] @ g.mT  # [B, H, n, 2 D_out]: a dW'^T | a dS'^T
        rW, rS = r[..., :d_out], r[..., d_out:]
        dd[i] = -torch.addcmul(gc * rW, pc, rS)
        dgl = dgl - (du[i] * rW).sum(-1)
        dpl = dpl - (du[i] * rS).sum(-1)
        da[i] = -(torch.cat((gc * du[i], pc * du[i]), dim=-1) @ g)
        dWS.append(_mix_transposed_(g, bl, el, fl))  # [dW; dS] = [bl dW'; el dS' + fl dW'], g is read no more

    # 3. read, last layer first
    bc, fc = b.unsqueeze(-1), f.unsqueeze(-1)
    dy = do
    dq = do if residual else None
    db = df = dG = 0.0
    for i in range(L - 1, -1, -1):
        x, xw, p = xs[i], xws[i], ps[i]
        d_out = WS[i].shape[-2] // 2
        dyy = torch.cat((bc * dy, fc * dy), dim=-1)  # [B, H, n, 2 D_out]
        dWS[i] = _bmm_add(dWS[i], dyy.mT, x)
        db = db + (dy * xw[..., :d_out]).sum(-1)
        df = df + (dy * xw[..., d_out:]).sum(-1)
        gp = G * p
        dM = -(dy @ du[i].mT)  # [B, H, n, n]
        dG = dG + dM * p
        dP = dM * G
        dd[i] = _bmm_add(dd[i], gp.mT, dy, alpha=-1.0)
        dx = _bmm_add(dyy @ WS[i], dP, a[i])
        da[i] = _bmm_add(da[i], dP.mT, x)
        if i > 0:
            dy = activate_grad(ys[i - 1], activation, dx)
        else:
            dq = dx if dq is None else dq + dx

    if s is not None:  # dd and da so far are gradients of du = s d and of a through the read and state only
        _step_scale_backward(a, d, s, dd, da)

    # 2. anchor: first the errors (d[0] was computed last), then the forward of the keys
    anchor = A if A is not None else [_split(ws)[0] for ws in WS]
    dA: list[Tensor | None] = [None] * L
    dz: list[Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    for i in range(L - 1):  # d[i] = (d[i+1] @ W[i+1]) * act'(z[i])
        dback = dd[i] * dact[i]
        dz[i] = dd[i] * back[i] * activate_grad2(z[i], activation)
        dd[i + 1] = _bmm_add(dd[i + 1], dback, anchor[i + 1].mT)
        dA[i + 1] = d[i + 1].mT @ dback
    if loss == "l2":  # d[L-1] = 2 (pred - v)
        dpred = 2.0 * dd[-1]
        dv = -dpred
    else:  # d[L-1] = -v
        dpred = None
        dv = -dd[-1]
    dzi = dpred
    for i in range(L - 1, -1, -1):  # z[i] = a[i] @ W[i]^T, a[i+1] = act(z[i])
        if i < L - 1:
            dzi = torch.addcmul(dz[i], da[i + 1], dact[i])
        if dzi is not None:
            gA = dzi.mT @ a[i]
            dA[i] = gA if dA[i] is None else dA[i] + gA
            da[i] = _bmm_add(da[i], dzi, anchor[i])
    dk = da[0] if not (residual and dpred is not None) else da[0] + dpred

    if A is None:  # the anchor is the chunk's starting memory
        for i in range(L):
            if dA[i] is not None:
                dWS[i][..., : dA[i].shape[-2], :] += dA[i]
        dA_out = None
    else:
        dA_out = [torch.zeros_like(A[i]) if g is None else g for i, g in enumerate(dA)]
    return dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, dWS, dA_out


class _ChunkScan(torch.autograd.Function):
    """The chunk loop as one autograd node: forward saves each chunk's starting state and activations, backward is
    ``_chunk_backward`` over the chunks in reverse. Outputs: o, the final L states ``[W; S]``, and the memory at the
    last chunk's start (the anchor a stream continued from here would use)."""

    @staticmethod
    def forward(ctx, opts: dict, q, k, v, b, f, G, bl, el, fl, gl, pl, *states):
        L = opts["L"]
        WS, A = list(states[:L]), (list(states[L:]) or None)
        o, WS_out, last_start, starts, saved = _scan(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, save=True,
                                                     **opts["kw"])
        ctx.opts, ctx.starts, ctx.acts, ctx.A = opts, starts, saved, A
        ctx.coefs = (b, f, G, bl, el, fl, gl, pl)
        ctx.shapes = (q.shape, k.shape, v.shape)
        last_anchor = [_split(ws)[0].clone() for ws in last_start]
        return (o, *WS_out, *last_anchor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, *grads):
        opts = ctx.opts
        L = opts["L"]
        b, f, G, bl, el, fl, gl, pl = ctx.coefs
        starts, acts, A = ctx.starts, ctx.acts, ctx.A
        nc = len(starts)
        dWS = [torch.zeros_like(ws) if g is None else g.clone(memory_format=torch.contiguous_format)
               for ws, g in zip(starts[-1], grads[:L])]  # the carry, updated in place from here on
        d_last_anchor = grads[L:]
        qs, ks, vs = ctx.shapes
        dq, dk, dv = do.new_empty(qs), do.new_empty(ks), do.new_empty(vs)
        db, df, dG = torch.empty_like(b), torch.empty_like(f), torch.empty_like(G)
        dbl, del_, dfl = torch.empty_like(bl), torch.empty_like(el), torch.empty_like(fl)
        dgl, dpl = torch.empty_like(gl), torch.empty_like(pl)
        dA = None
        for c in range(nc - 1, -1, -1):
            Ac = A if c == 0 else None
            out = _chunk_backward(do[c], dWS, starts[c], Ac, acts[c], b[c], f[c], G[c], bl[c], el[c], fl[c], gl[c],
                                  pl[c], **opts["kw"])
            dq[c], dk[c], dv[c], db[c], df[c], dG[c], dbl[c], del_[c], dfl[c], dgl[c], dpl[c], dWS, dA_c = out
            if c == nc - 1:  # the last chunk's starting memory is also an output
                for i, g in enumerate(d_last_anchor):
                    if g is not None:
                        dWS[i][..., : g.shape[-2], :] += g
            if c == 0:
                dA = dA_c
        grads_in = [None, dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, *dWS]
        if A is not None:
            grads_in += dA
        return tuple(grads_in)


# ----------------------------------------------------------------------------------------------------------------------
# the op


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
    check_values: bool = True,
    normalize_step: bool = False,
) -> tuple[Tensor, MemoryState | None]:
    """Chunk-parallel form of the memory rule in PyTorch; same contract as :func:`mnemos.ops.neural_memory`."""
    return _chunked(q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum, residual=residual,
                    activation=activation, loss=loss, initial_state=initial_state,
                    output_final_state=output_final_state, check_values=check_values, normalize_step=normalize_step,
                    backend="torch")


def neural_memory_triton(
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
    """The chunk-parallel form with the chunk loop in fused Triton kernels (triton_scan.py); same contract as
    :func:`mnemos.ops.neural_memory`. Raises ValueError naming the reason for configs the kernels do not cover."""
    return _chunked(q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum, residual=residual,
                    activation=activation, loss=loss, initial_state=initial_state,
                    output_final_state=output_final_state, check_values=check_values, normalize_step=normalize_step,
                    backend="triton")


def triton_unsupported_reason(q: Tensor, weights: Sequence[Tensor] | None, initial_state: MemoryState | None,
                              chunk_size: int, normalize_step: bool = False) -> str | None:
    """Why :func:`neural_memory_triton` cannot take these inputs (None when it can)."""
    from .triton_scan import unsupported_reason

    if normalize_step:
        return "normalize_step is not implemented in the kernels (impl='torch' runs it)"
    ws = initial_state.weights if initial_state is not None else weights
    if not isinstance(q, Tensor) or q.ndim != 4 or not ws:
        return "malformed inputs"
    widths = [ws[0].shape[-1]] + [w.shape[-2] for w in ws]
    return unsupported_reason(q.device, q.dtype, widths, chunk_size)


def _one_token(q, k, v, theta, eta, alpha, W0, S0, A, *, residual, activation, loss, normalize):
    """The rule for a call of one token (decoding), with the per-token update written out: no chunk layout and no
    coefficients. q, k, v ``[B, H, 1, D]``, gates ``[B, H]``, W0, S0: L x ``[B, H, D_out, D_in]``, A: the anchor.
    Plain differentiable torch ops; returns o ``[B, H, 1, V]`` and the new W, S (new tensors)."""
    a, _, _, _, d = _anchor_forward(k, v, A, residual=residual, activation=activation, loss=loss)
    if normalize:
        scale = _step_scale(a, d)
        d = [di * scale for di in d]
    th, et, be = theta[..., None, None], eta[..., None, None], (1.0 - alpha)[..., None, None]
    W, S = [], []
    for w, s, ai, di in zip(W0, S0, a, d):
        S.append(torch.addcmul(et * s, th, di.mT @ ai, value=-1.0))  # S = eta S - theta u, u = d a^T
        W.append(torch.addcmul(S[-1], be, w))  # W = (1 - alpha) W + S
    h = q
    for i, w in enumerate(W):
        h = h @ w.mT
        if i < len(W) - 1:
            h = activate(h, activation)
    return (h + q if residual else h), W, S


def _chunked(q, k, v, theta, eta, alpha, weights, *, chunk_size, momentum, residual, activation, loss, initial_state,
             output_final_state, check_values, normalize_step, backend: str):
    spec = check_inputs(
        q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum, residual=residual,
        activation=activation, initial_state=initial_state, loss=loss, check_values=check_values,
    )
    if not isinstance(normalize_step, bool):
        raise TypeError(f"normalize_step must be a bool, got {normalize_step!r}")
    if backend == "triton":
        reason = triton_unsupported_reason(q, spec.weights, None, chunk_size, normalize_step)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run this call: {reason}")
    B, T, H, dt, dev = spec.B, spec.T, spec.H, spec.dtype, q.device
    C, L = chunk_size, len(spec.weights)
    with _no_autocast(dev):
        W0 = tuple(w.to(dt).expand(B, *w.shape[-3:]) for w in spec.weights)  # [B, H, D_out, D_in]
        if spec.momentum is None:
            S0 = tuple(torch.zeros(B, *w.shape[-3:], dtype=dt, device=dev) for w in W0)
        else:
            S0 = tuple(s.to(dt) for s in spec.momentum)
        # a stream that stopped inside a chunk finishes that chunk first, against the anchor it carried
        A = tuple(a.to(dt) for a in spec.anchor) if spec.offset > 0 else None
        kw = dict(residual=residual, activation=activation, loss=loss)  # the kernels' options
        tkw = dict(kw, normalize=normalize_step)  # the torch path's
        if T == 1 and backend == "torch":  # decoding: one token's update written out, no chunk machinery
            bh = lambda x: x.to(dt).transpose(1, 2)  # noqa: E731  [B, 1, H, D] -> [B, H, 1, D]; gates -> [B, H]
            o, W, S = _one_token(bh(q), bh(k), bh(v), bh(theta)[..., 0], bh(eta)[..., 0], bh(alpha)[..., 0], W0, S0,
                                 W0 if A is None else A, **tkw)
            o = o.transpose(1, 2).to(q.dtype)
            return o, _final_state(spec, W, S, W0, A, None, nc=1, T=1, chunk_size=C) if output_final_state else None

        WS0 = tuple(torch.cat((w, s), dim=-2) for w, s in zip(W0, S0))
        # chunks: [the rest of a chunk in progress] + full chunks + [a last partial chunk]
        n0 = min(C - spec.offset, T) if spec.offset > 0 else 0
        full, rem = divmod(T - n0, C)
        lengths = ([n0] if n0 else []) + [C] * full + ([rem] if rem else [])
        nc = len(lengths)
        if backend == "torch":
            o, WS, last_anchor = _torch_scan(q, k, v, theta, eta, alpha, WS0, A, lengths, dt=dt, opts=tkw)
        else:
            o, WS, last_anchor = _triton_scan(q, k, v, theta, eta, alpha, WS0, A, lengths, C=C, dt=dt, kw=kw)
        o = o.to(q.dtype)
    if not output_final_state:
        return o, None
    W = tuple(_split(ws)[0].clone() for ws in WS)  # own storage: a state is measured and saved by its storage
    S = tuple(_split(ws)[1].clone() for ws in WS)
    return o, _final_state(spec, W, S, W0, A, last_anchor, nc=nc, T=T, chunk_size=C)


def _runs(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of equal chunk lengths as (first token, chunks, length)."""
    runs: list[list[int]] = []
    pos = 0
    for n in lengths:
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([pos, 1, n])
        pos += n
    return [(a, b, c) for a, b, c in runs]


def _torch_scan(q, k, v, theta, eta, alpha, WS, A, lengths, *, dt, opts):
    """The torch path's chunk loop, one run of equal-length chunks at a time, each in a chunk-major layout of its own
    without padding (a partial chunk costs its own tokens, not a whole chunk's); the state carries from run to run.
    Returns o ``[B, T, H, V]``, the final ``[W; S]`` per layer and the memory at the last chunk's start."""
    B, T, H = theta.shape
    L, outs = len(WS), []
    for first, count, n in _runs(lengths):
        def chunks(x: Tensor) -> Tensor:  # [B, T, H(, D)] -> chunk-major [count, B, H, n(, D)]
            x = x[:, first:first + count * n].to(dt).transpose(1, 2)
            return x.reshape(B, H, count, n, *x.shape[3:]).movedim(2, 0).contiguous()

        qc, kc, vc, thc, etc, alc = (chunks(x) for x in (q, k, v, theta, eta, alpha))
        b, e, f, G, P = chunk_coefficients(thc, etc, alc)  # [count, B, H, n(, n)]
        rows = (b[..., -1], e[..., -1], f[..., -1], G[..., -1, :], P[..., -1, :])  # at each chunk's last token
        inputs = (qc, kc, vc, b, f, G, *rows, *WS, *(A or ()))
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            o_c, *rest = _ChunkScan.apply(dict(L=L, kw=opts), *inputs)
            WS, last_anchor = rest[:L], rest[L:]
        else:
            o_c, WS, last_start, _, _ = _scan(*inputs[:11], list(WS), A, save=False, **opts)
            last_anchor = [_split(ws)[0].clone() for ws in last_start]
        outs.append(o_c.movedim(0, 2).reshape(B, H, count * n, -1))  # [B, H, tokens, V]
        A = None  # only a stream's first chunk has an anchor of its own
    return torch.cat(outs, dim=2).transpose(1, 2), WS, last_anchor


def _triton_scan(q, k, v, theta, eta, alpha, WS0, A, lengths, *, C, dt, kw):
    """The kernels' chunk loop: every chunk padded at its end to C tokens (padding sits after every real token of its
    chunk, so causality keeps it out). Returns o ``[B, T, H, V]``, the final ``[W; S]`` and the last chunk's start."""
    from .triton_scan import TritonChunkScan, scan_forward_only

    B, T, H = theta.shape
    L, nc, dev = len(WS0), len(lengths), q.device
    idx = torch.full((nc, C), T, dtype=torch.long)
    pos = 0
    for c, n in enumerate(lengths):
        idx[c, :n] = torch.arange(pos, pos + n)
        pos += n
    real = (idx < T).flatten().nonzero().squeeze(1).to(dev)  # padded position of token t, in order
    idx = idx.to(dev)

    def chunks(x: Tensor) -> Tensor:  # [B, T, H(, D)] -> chunk-major [nc, B, H, C(, D)]
        x = x.to(dt).transpose(1, 2)
        x = F.pad(x, (0, 0, 0, 1) if x.ndim == 4 else (0, 1))  # one zero token to pad with
        return x[:, :, idx].movedim(2, 0).contiguous()

    qc, kc, vc, thc, etc, alc = (chunks(x) for x in (q, k, v, theta, eta, alpha))
    b, e, f, G, P = chunk_coefficients(thc, etc, alc)  # [nc, B, H, C(, C)]
    ar, last = torch.arange(nc, device=dev), torch.tensor(lengths, device=dev) - 1
    rows = lambda x: x.movedim(0, 2)[:, :, ar, last].movedim(2, 0)  # noqa: E731  value at each chunk's last token
    inputs = (qc, kc, vc, b, f, G, rows(b), rows(e), rows(f), rows(G), rows(P), *WS0, *(A or ()))
    inputs = tuple(t.contiguous() for t in inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        o_c, *rest = TritonChunkScan.apply(dict(L=L, kw=kw), *inputs)
        WS, last_anchor = rest[:L], rest[L:]
    else:
        o_c, WS, last_anchor = scan_forward_only(*inputs[:11], list(inputs[11:11 + L]), list(inputs[11 + L:]) or None,
                                                 L=L, **kw)
    # [nc, B, H, C, V] -> [B, T, H, V]
    return o_c.movedim(0, 2).reshape(B, H, nc * C, -1)[:, :, real].transpose(1, 2), WS, last_anchor


def _final_state(spec, W, S, W0, A, last_anchor, *, nc: int, T: int, chunk_size: int) -> MemoryState:
    """The state after a call of T tokens in nc chunks: W, S (tensors of their own), and the anchor of the chunk in
    progress (W itself on a boundary; the one the call started with if it crossed none; else the last chunk's
    starting memory, ``last_anchor``)."""
    offset = (spec.offset + T) % chunk_size
    if offset == 0:
        anchor = tuple(w.view_as(w) for w in W)  # its own tensor objects (views), whatever the offset
    elif nc == 1:  # the call never crossed a chunk boundary: the anchor it started with still holds
        anchor = A if A is not None else W0
    else:
        anchor = tuple(last_anchor)
    anchor = tuple(x.expand(spec.B, *x.shape[-3:]).contiguous() if x.ndim == 3 else x for x in anchor)
    return MemoryState(tuple(W), tuple(S), anchor, offset, chunk_size)
