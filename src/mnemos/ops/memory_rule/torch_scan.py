"""The memory rule's chunk loop in PyTorch, with a hand-written backward: the torch backend of the chunked driver.
Derivation: docs/MEMORY_RULE.md. Contract with the driver (``chunked.py``), shared with the Triton backend:
``backends.py``.

Inside a chunk every gradient is taken at one anchor state, so token j's update to layer l is an outer product
``u_j = delta_j a_j^T`` of two vectors computed once at the anchor (the backpropagated error and the layer input).
Every per-token state of the chunk is then

    W_i = b_i W_0 + f_i S_0 - sum_{j<=i} G[i, j] theta_j u_j        S_i = e_i S_0 - sum_{j<=i} P_eta[i, j] theta_j u_j

with the scalar coefficients the driver computes (``chunked.chunk_coefficients``). Reading the memory at W_i is a
C x C masked matmul per layer; no per-token copy of the weights is ever formed. The chunk-to-chunk dependency (each
anchor is the previous chunk's last state) is a loop over chunks; everything else is batched.

The rule's axes that keep this form live here too: the loss enters only through the output-side gradient of the
anchor error (``common.loss_output_grad``; lp and huber save that error, and huber's thresholds delta are one more
input of the node, for the backward: ``common.loss_output_grad_backward``), and an Omega window only lengthens the
key side of a chunk (k, v of m = n + window - 1 tokens, G of n x m: the driver folds the band into the coefficients).
Moneta's retention (lq = 4, momentum) keeps it on the CPU with one more read per token, its accumulator's norm, from
``cpu_scan``'s lq4 kernel (the ``lq`` input below). The other retentions (kl, lq elsewhere) and Muon do not keep it:
``dense_scan.py``.

Per layer the state is kept stacked as ``[W; S]`` (``[B, H, 2 D_out, D_in]``), so that reading both, updating both
and backpropagating into both are one matmul each.

Stages of one chunk (each is a plain function; ``_chunk_backward`` is their reverse, written out):
    1. anchor_forward:   layer inputs a and errors delta of the keys at the anchor (the gradients u = delta a^T)
    2. _read_forward:    outputs of the chunk's queries through W_1..W_C (dual form)
    3. _state_forward:   [W; S] after the chunk's last real token (state carry)

:func:`scan` runs them over every chunk; :class:`TorchChunkScan` is that loop as one autograd node, whose backward
walks the chunks in reverse with the gradient of the state as its carry. It keeps the state at every chunk start and
the chunk's small activations from the forward, and recomputes nothing. Autograd's own backward of the same loop was
~3x the forward; this one is ~2x (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import cpu_scan
from .backends import Coefficients, ScanGrads, split_state
from .common import activate, activate_grad, activate_grad2, loss_keeps_error, loss_output_grad, \
    loss_output_grad_backward

# ----------------------------------------------------------------------------------------------------------------------
# one chunk, forward. Shapes: tokens [B, H, n, D], coefficients [B, H, n] / [B, H, n, n], states [B, H, 2 D_out, D_in]


def _bmm_add(base: Tensor, x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
    """``base += alpha * x @ y`` in place for [B, H, m, n] operands (one fused batched matmul-add); returns base.

    base must be a tensor the caller owns whose (B, H) dims merge into one (contiguous, or a slice of the last two
    dims of a contiguous tensor). In place on purpose: a fresh state-sized output per chunk costs
    more in first-touch page faults than the matmul itself on a CPU."""
    base.view(-1, *base.shape[-2:]).baddbmm_(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]), alpha=alpha)
    return base


def anchor_forward(k: Tensor, v: Tensor, anchor: Sequence[Tensor], *, residual: bool, activation: str, loss: str,
                   p: float = 3.0, delta: Tensor | None = None, scales: Sequence[Tensor] | None = None):
    """Forward the chunk's keys through the anchor memory and backpropagate the associative loss by hand.

    Returns per layer l: ``a[l]`` its input (a[0] = k), ``d[l]`` its output error (token j's gradient for layer l is
    ``outer(d[l][j], a[l][j])``); per hidden layer: ``z[l]`` the pre-activation, ``dact[l] = act'(z[l])``,
    ``back[l] = d[l + 1] @ W[l + 1]`` (what the backward needs); and ``err = M(k) - v`` for a loss whose output
    gradient's derivative needs it (lp, huber; None otherwise). ``p``: lp's exponent; ``delta`` ``[..., n]``: huber's
    thresholds. ``scales``: per layer a ``[B, H, 1, 1]`` factor, the memory being ``W[l] = scales[l] anchor[l]``
    (Moneta's ``F(A) = r A``), applied to the small products instead of forming W; z then also holds the last
    layer's pre-activation (before the residual), which Moneta's backward reads.
    """
    L = len(anchor)
    a, z = [k], []
    h = k
    for i, w in enumerate(anchor):
        zi = h @ w.mT
        if scales is not None:
            zi = zi * scales[i]
        if i < L - 1:
            z.append(zi)
            h = activate(zi, activation)
            a.append(h)
        else:
            pred = zi + k if residual else zi
    dact = [activate_grad(zi, activation) for zi in z]
    if scales is not None:
        z.append(zi)
    d: list[Tensor] = [None] * L  # type: ignore[list-item]
    back: list[Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    d[-1] = loss_output_grad(pred, v, loss, p, delta)
    err = pred - v if loss_keeps_error(loss) else None
    for i in range(L - 2, -1, -1):
        back[i] = d[i + 1] @ anchor[i + 1] if scales is None else (d[i + 1] * scales[i + 1]) @ anchor[i + 1]
        d[i] = back[i] * dact[i]
    return a, z, dact, back, d, err


def curvature(a: Sequence[Tensor], d: Sequence[Tensor]) -> Tensor:
    """``||u||^2 / ||d_L||^2`` per token from the layer inputs a and errors d (u_l = d_l a_l^T): ``[..., n]``."""
    num = sum(ai.pow(2).sum(-1) * di.pow(2).sum(-1) for ai, di in zip(a, d, strict=True))
    return num / d[-1].pow(2).sum(-1).clamp_min(1e-30)


def step_scale(a: Sequence[Tensor], d: Sequence[Tensor]) -> Tensor:
    """``normalize_step``: each token's step is divided by max(1, curvature) at the anchor: ``s [..., n, 1]``.
    Differentiable like any torch op (decoding); the chunk scan's backward writes its gradient out
    (:func:`_step_scale_backward`)."""
    return curvature(a, d).clamp_min(1.0).reciprocal().unsqueeze(-1)


def _step_scale_backward(a, d, s, dd, da) -> None:
    """The gradient through ``du_l = s d_l`` with ``s = 1 / max(1, rho)``, ``rho = sum_l |a_l|^2 |d_l|^2 / |d_L|^2``.
    On entry ``dd[l]`` is the gradient of du_l and ``da[l]`` that of a_l from the read and the state; on return both
    hold the gradients of d_l and a_l (in place where they can be)."""
    g_s = sum((x * di).sum(-1, keepdim=True) for x, di in zip(dd, d, strict=True))  # [B, H, n, 1]
    g_rho = torch.where(s < 1.0, -g_s * s * s, torch.zeros_like(g_s))  # ds/drho = -1/rho^2 = -s^2 where rho > 1
    inv_q = d[-1].pow(2).sum(-1, keepdim=True).clamp_min(1e-30).reciprocal()
    c = 2.0 * g_rho * inv_q
    for i, (ai, di) in enumerate(zip(a, d, strict=True)):
        dd[i] = dd[i] * s + (c * ai.pow(2).sum(-1, keepdim=True)) * di
        da[i] = da[i] + (c * di.pow(2).sum(-1, keepdim=True)) * ai
    # rho's denominator |d_L|^2; c is 0 wherever rho <= 1, and rho = 1 / s wherever it is not
    dd[-1] = dd[-1] - (c / s) * d[-1]


def _read_forward(q, WS, a, d, b, f, G, *, residual: bool, activation: str, scales: Sequence[Tensor] | None = None):
    """``o_i = M(q_i; W_i)`` for every token i of the chunk, without forming W_i.

    Layer l maps its query-side input x_i to ``W_{l,i} x_i = b_i W_l x_i + f_i S_l x_i - sum_j G[i, j] (a_{l,j} . x_i)
    d_{l,j}``, times ``scales[l][..., i]`` where given (Moneta's read ``F(A_i) x = ||A_i||_4^-2 A_i x``: W is then the
    accumulator A). Returns o and, per layer, the input x, ``x @ [W; S]^T`` and ``P = x a^T``, per hidden layer the
    pre-activation y, and per layer the unscaled ``W_{l,i} x_i`` where scaled (else None): saved for the backward.
    """
    L = len(WS)
    bc, fc = b.unsqueeze(-1), f.unsqueeze(-1)
    h = q
    xs, ys, xws, ps = [], [], [], []
    unscaled: list[Tensor] | None = None if scales is None else []
    for i in range(L):
        d_out = WS[i].shape[-2] // 2
        xw = h @ WS[i].mT  # [B, H, n, 2 D_out]: x W^T | x S^T
        p = h @ a[i].mT  # [B, H, n, n]
        y = torch.addcmul(bc * xw[..., :d_out], fc, xw[..., d_out:]) - (G * p) @ d[i]
        if unscaled is not None:
            unscaled.append(y)
            y = scales[i].unsqueeze(-1) * y
        xs.append(h)
        xws.append(xw)
        ps.append(p)
        if i < L - 1:
            ys.append(y)
            h = activate(y, activation)
    o = y + q if residual else y
    return o, xs, ys, xws, ps, unscaled


def _mix(ws: Tensor, top: Tensor, bottom: Tensor, cross: Tensor, inplace: bool = False) -> Tensor:
    """``[top X + cross Y; bottom Y]`` for ``ws = [X; Y]`` and per-(batch, head) scalars ``[B, H]`` (the state carry
    of a chunk), into a new tensor or, with ``inplace``, into ws; 1.5 passes over the state either way."""
    out = ws if inplace else torch.empty_like(ws)
    (X, Y), (oX, oY) = split_state(ws), split_state(out)
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


# Moneta's retention (lq = 4) in the dual form: the state [A; S] holds the accumulator, the anchor's gradients are taken
# at F(A) = r A with r = ||A||_4^-2 per matrix, and token i reads A_i x scaled by its own ||A_i||_4^-2, the norms of
# every token's accumulator read by cpu_scan's lq4 kernel without forming them (docs/MEMORY_RULE.md, "Moneta in the
# dual form"). F(0) = 0: where A = 0 the scale is 1.


def _lq4_anchor(acc: Tensor, N: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Moneta's effective anchor ``F(A) = r A`` of one accumulator ``[B, H, P, Q]``, kept as ``(r, N, A,
    inherited)`` with ``N = sum A^4`` and ``r = N^-1/2`` (1 where N = 0) ``[B, H, 1, 1]``; F(A) itself is never
    formed (:func:`anchor_forward`'s ``scales``). ``N`` given: the norm the previous chunk's read took of its last
    token's accumulator, which is this one (``inherited``; its gradient goes back through that read)."""
    inherited = N is not None
    if N is None:
        sq = acc * acc
        N = (sq * sq).sum((-2, -1))
    r = torch.where(N > 0, N, torch.ones_like(N)).rsqrt()
    return r[..., None, None], N, acc, inherited


def _lq4_anchor_backward(rg: Tensor, dot: Tensor, anchor: tuple) -> tuple[Tensor, Tensor | None]:
    """From ``rg = r g``, g the gradient of ``F(A) = r A`` (the backward folds r into the small factors of g's outer
    products), and ``dot = <r g, A>`` ``[B, H]`` (read off those factors: no pass over the state), to the
    accumulator's gradient: ``r g - 2 r^3 <g, A> A^3`` (the second term 0 where A = 0, whose scale is the constant 1).
    With an inherited N, returns ``r g`` and the gradient of N, ``-r^3 <g, A> / 2``, for the previous chunk's read to
    take back (``(dA, dN)``; dN None otherwise)."""
    r, N, acc, inherited = anchor
    r = r.view(N.shape)
    gN = torch.where(N > 0, (-0.5 * r * r) * dot, torch.zeros_like(N))
    if inherited:
        return rg, gN
    return torch.addcmul(rg, (4.0 * gN)[..., None, None], acc * acc * acc), None


def _lq4_scales(WS, a, d, rec) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, ``N_i = sum A_i^4`` of every token's accumulator ``[B, H, n]`` (``cpu_scan.lq4_rows``, from the
    chunk's starting ``[A; S]`` where it lies, the update's factors d, a and the recurrence's ``(beta, eta, Wb)``) and
    the read's scale ``N_i^-1/2`` (1 where N_i = 0)."""
    Ns = [cpu_scan.lq4_rows(*split_state(ws), di, ai, *rec) for ws, ai, di in zip(WS, a, d, strict=True)]
    return Ns, [torch.where(N > 0, N, torch.ones_like(N)).rsqrt() for N in Ns]


def _state_forward(WS, a, d, bl, el, fl, gl, pl, inplace: bool = False) -> list[Tensor]:
    """``[W; S]`` after the chunk's last real token. bl, el, fl ``[B, H]`` and gl, pl ``[B, H, n]`` are the
    coefficients' values (rows) at that token: ``W' = bl W + fl S - d^T diag(gl) a``, ``S' = el S - d^T diag(pl) a``.
    ``inplace`` overwrites WS (when nothing keeps the chunk's starting state)."""
    gc, pc = gl.unsqueeze(-1), pl.unsqueeze(-1)
    out = []
    for ws, ai, di in zip(WS, a, d, strict=True):
        coef = torch.cat((gc * di, pc * di), dim=-1)  # [B, H, n, 2 D_out]
        out.append(_bmm_add(_mix(ws, bl, el, fl, inplace), coef.mT, ai, alpha=-1.0))
    return out


def scan(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, residual, activation, loss, save: bool,
         normalize: bool = False, p: float = 3.0, delta: Tensor | None = None, lq: Sequence[Tensor] | None = None):
    """Every chunk in order. Chunk-major inputs: tokens ``[nc, B, H, n, D]``, coefficients ``[nc, B, H, n(, n)]`` and
    ``[nc, B, H(, n)]`` (rows at each chunk's last real token); WS: L x ``[B, H, 2 D_out, D_in]`` at the first chunk's
    start (without ``save`` they are updated in place: the caller must own them); A: the first chunk's anchor
    (L x ``[B, H, D_out, D_in]``) when it is not that chunk's starting memory (a stream continued mid-chunk), else None.

    The keys k, v may hold m >= n tokens per chunk (an Omega window: the chunk's n tokens after the window - 1 before
    them), G ``[nc, B, H, n, m]`` and gl, pl ``[nc, B, H, m]`` then weigh every one of them (the driver folds the
    window's band into them). ``p``: lp's exponent; ``delta`` ``[nc, B, H, m]``: huber's thresholds, else None.
    ``lq``: Moneta's retention (lq = 4; WS and A hold accumulators): the per-token recurrence's ``(beta, eta, Wb)``
    ``[nc, B, H, n]`` twice and ``[nc, B, H, n, w]`` (``cpu_scan.lq4_rows``), else None. From the second chunk on,
    a chunk's anchor takes its norm from the previous chunk's read of its last token (the same accumulator).

    Returns o ``[nc, B, H, n, V]``, the final WS, the last chunk's starting WS, and when ``save``: every chunk's
    starting WS and activations."""
    nc = q.shape[0]
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    starts, saved = [], []
    opts = dict(residual=residual, activation=activation)
    L, Ns = len(WS), None
    for c in range(nc):
        anchor = A if (c == 0 and A is not None) else [split_state(ws)[0] for ws in WS]
        rec = None if lq is None else tuple(x[c] for x in lq)
        lqa = ascale = None
        if rec is not None:  # the anchor's gradients at F(A); from the second chunk on, its norm is the last read's
            lqa = [_lq4_anchor(x, None if Ns is None else N[..., -1])
                   for x, N in zip(anchor, Ns or [None] * L, strict=True)]
            ascale = [t[0] for t in lqa]
        dc = None if delta is None else delta[c]
        a, z, dact, back, d, err = anchor_forward(k[c], v[c], anchor, loss=loss, p=p, delta=dc, scales=ascale, **opts)
        s = step_scale(a, d).detach() if normalize else None  # the backward differentiates it by hand
        du = d if s is None else [di * s for di in d]  # the errors the update uses: u_l = du_l a_l^T
        Ns, scales = (None, None) if rec is None else _lq4_scales(WS, a, du, rec)
        o[c], xs, ys, xws, ps, unscaled = _read_forward(q[c], WS, a, du, b[c], f[c], G[c], scales=scales, **opts)
        if save:
            starts.append(WS)
            saved.append((a, z, dact, back, d, xs, ys, xws, ps, s, err, dc, lqa, Ns, scales, unscaled))
        last_start = WS if save or c < nc - 1 else [ws.clone() for ws in WS]
        WS = _state_forward(WS, a, du, bl[c], el[c], fl[c], gl[c], pl[c], inplace=not save)
    return o, WS, last_start, starts, saved


# ----------------------------------------------------------------------------------------------------------------------
# one chunk, backward: the reverse of the three forward stages, written out


def _chunk_backward(do, dWS_next, WS, A, acts, coef: Coefficients, *, residual, activation, loss,
                    normalize: bool = False, p: float = 3.0, rec: Sequence[Tensor] | None = None,
                    gN_last: Sequence[Tensor] | None = None
                    ) -> tuple[ScanGrads, Tensor | None, list[Tensor] | None, list[Tensor] | None]:
    """Gradients of one chunk, given ``do`` (its outputs) and ``dWS_next`` (the state after it; owned, and turned in
    place into the gradient of the state before the chunk); ``coef``: the chunk's coefficients.

    dWS is the gradient of the chunk's starting ``[W; S]`` (anchor included when the anchor is W), dA that of a
    separate anchor (None when A is None). Also returns ddelta, the gradient of huber's thresholds (None for any other
    loss; not part of the backends' contract), and with Moneta's retention (``rec``: the chunk's ``(beta, eta, Wb)``)
    their gradients and, where this chunk's anchor took its norm from the previous chunk's last read, that norm's
    gradient per layer (else None), which the previous chunk's call takes as ``gN_last``."""
    b, f, G, bl, el, fl, gl, pl = coef
    a, z, dact, back, d, xs, ys, xws, ps, s, err, delta, lqa, Ns, scales, unscaled = acts
    exponent = p  # lp's (the name p is the read's x a^T below)
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
    gN: list[Tensor] = [None] * L  # type: ignore[list-item]
    for i in range(L - 1, -1, -1):
        x, xw, p = xs[i], xws[i], ps[i]
        d_out = WS[i].shape[-2] // 2
        if scales is not None:  # y = scale * y~, scale = N^-1/2: dN = -scale^3 <dy, y~> / 2 (0 where N = 0)
            ds = torch.linalg.vecdot(dy, unscaled[i])
            gN[i] = torch.where(Ns[i] > 0, -0.5 * scales[i].pow(3) * ds, torch.zeros_like(ds))
            dy = dy * scales[i].unsqueeze(-1)
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

    dlq = None
    if scales is not None:  # every token's norm N_i: cpu_scan's kernel, backward
        dlq = [0.0, 0.0, 0.0]
        if gN_last is not None:  # the next chunk's anchor norm is this chunk's last read's
            for i in range(L):
                gN[i][..., -1] += gN_last[i]
        for i in range(L):  # the starting state's gradients are added into dWS's halves in place
            gd, ga, *grec = cpu_scan.lq4_rows_backward(*split_state(WS[i]), du[i], a[i], *rec, gN[i],
                                                       *split_state(dWS[i]))
            dd[i] = dd[i] + gd
            da[i] = da[i] + ga
            dlq = [x + y for x, y in zip(dlq, grec, strict=True)]

    if s is not None:  # dd and da so far are gradients of du = s d and of a through the read and state only
        _step_scale_backward(a, d, s, dd, da)

    # 2. anchor: first the errors (d[0] was computed last), then the forward of the keys. Moneta's anchor is
    # F(A) = r A: its products are those of A with r on the small factor, dA collects r times F(A)'s gradient, and
    # <r g, A> is summed from the factors: <x^T (r y), A> = sum(x * ((r y) @ A^T)), and for layer l's own term
    # <(r dz)^T a, A> = sum(dz * z) with z = r a A^T its pre-activation
    anchor = A if A is not None else [split_state(ws)[0] for ws in WS]
    rs = None if lqa is None else [t[0] for t in lqa]
    dots: list[Tensor] = [0.0] * L  # type: ignore[list-item]
    dA: list[Tensor | None] = [None] * L
    dz: list[Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    for i in range(L - 1):  # d[i] = (d[i+1] @ W[i+1]) * act'(z[i])
        dback = dd[i] * dact[i]
        dz[i] = dd[i] * back[i] * activate_grad2(z[i], activation)
        if rs is None:
            dd[i + 1] = _bmm_add(dd[i + 1], dback, anchor[i + 1].mT)
        else:
            dback = dback * rs[i + 1]
            t = dback @ anchor[i + 1].mT
            dots[i + 1] = torch.linalg.vecdot(d[i + 1], t).sum(-1)
            dd[i + 1] = dd[i + 1] + t
        dA[i + 1] = d[i + 1].mT @ dback
    dpred, dv, ddelta = loss_output_grad_backward(dd[-1], err, loss, exponent, delta)  # d[L-1] = g(pred - v) (dot: -v)
    dzi = dpred
    for i in range(L - 1, -1, -1):  # z[i] = a[i] @ W[i]^T, a[i+1] = act(z[i])
        if i < L - 1:
            dzi = torch.addcmul(dz[i], da[i + 1], dact[i])
        if dzi is not None:
            rdz = dzi
            if rs is not None:
                rdz = dzi * rs[i]
                dots[i] = dots[i] + torch.linalg.vecdot(dzi, z[i]).sum(-1)
            gA = rdz.mT @ a[i]
            dA[i] = gA if dA[i] is None else dA[i] + gA
            da[i] = _bmm_add(da[i], rdz, anchor[i])
    dk = da[0] if not (residual and dpred is not None) else da[0] + dpred
    gN_anchor = None
    if lqa is not None:  # from F(A)'s gradient to the accumulator's (and to its norm's, where inherited)
        back_lq = [(None, None) if g is None else _lq4_anchor_backward(g, x, t)
                   for g, x, t in zip(dA, dots, lqa, strict=True)]
        dA = [x for x, _ in back_lq]
        if lqa[0][3]:
            gN_anchor = [torch.zeros_like(t[1]) if n is None else n for (_, n), t in zip(back_lq, lqa, strict=True)]

    if A is None:  # the anchor is the chunk's starting memory
        for i in range(L):
            if dA[i] is not None:
                dWS[i][..., : dA[i].shape[-2], :] += dA[i]
        dA_out = None
    else:
        dA_out = [torch.zeros_like(A[i]) if g is None else g for i, g in enumerate(dA)]
    return ScanGrads(dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, dWS, dA_out), ddelta, dlq, gN_anchor


class TorchChunkScan(torch.autograd.Function):
    """The chunk loop as one autograd node (contract: ``backends.py``): forward saves each chunk's starting state and
    activations, backward is ``_chunk_backward`` over the chunks in reverse. Outputs: o, the final L states
    ``[W; S]``, and the memory at the last chunk's start (the anchor a stream continued from here would use).

    Beyond the contract's inputs, the torch node takes huber's thresholds ``delta`` ``[nc, B, H, m]`` after the states
    when ``opts["delta"]`` is true, then Moneta's recurrence ``(beta, eta, Wb)`` (:func:`scan`'s ``lq``) when
    ``opts["lq"]`` is true (and gives their gradients), and lp's exponent as ``opts["kw"]["p"]``."""

    @staticmethod
    def forward(ctx, opts: dict, q, k, v, b, f, G, bl, el, fl, gl, pl, *states):
        L = opts["L"]
        lq = tuple(states[-3:]) if opts.get("lq") else None
        states = states[:-3] if lq is not None else states
        has_delta = bool(opts.get("delta"))
        delta = states[-1] if has_delta else None
        states = states[:-1] if has_delta else states
        WS, A = list(states[:L]), (list(states[L:]) or None)
        o, WS_out, last_start, starts, saved = scan(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, save=True,
                                                    delta=delta, lq=lq, **opts["kw"])
        ctx.opts, ctx.starts, ctx.acts, ctx.A, ctx.has_delta, ctx.lq = opts, starts, saved, A, has_delta, lq
        ctx.coef = Coefficients(b, f, G, bl, el, fl, gl, pl)
        ctx.shapes = (q.shape, k.shape, v.shape)
        ctx.delta_shape = None if delta is None else delta.shape
        last_anchor = [split_state(ws)[0].clone() for ws in last_start]
        return (o, *WS_out, *last_anchor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, *grads):
        L, coef, starts, acts, A = ctx.opts["L"], ctx.coef, ctx.starts, ctx.acts, ctx.A
        nc = len(starts)
        dWS = [torch.zeros_like(ws) if g is None else g.clone(memory_format=torch.contiguous_format)
               for ws, g in zip(starts[-1], grads[:L], strict=True)]  # the carry, updated in place from here on
        d_last_anchor = grads[L:]
        qs, ks, vs = ctx.shapes
        out = ScanGrads(do.new_empty(qs), do.new_empty(ks), do.new_empty(vs), *(torch.empty_like(x) for x in coef),
                        dWS=dWS, dA=None)  # every chunk's gradients, written chunk by chunk
        ddelta = None if ctx.delta_shape is None else do.new_empty(ctx.delta_shape)
        dlq = None if ctx.lq is None else [torch.empty_like(x) for x in ctx.lq]
        gN_carry = None  # Moneta: the gradient of the norm a chunk's anchor took from the chunk before
        for c in range(nc - 1, -1, -1):
            g, ddelta_c, dlq_c, gN_carry = _chunk_backward(
                do[c], dWS, starts[c], A if c == 0 else None, acts[c], Coefficients(*(x[c] for x in coef)),
                rec=None if ctx.lq is None else tuple(x[c] for x in ctx.lq), gN_last=gN_carry, **ctx.opts["kw"])
            for name in ScanGrads.PER_CHUNK:
                getattr(out, name)[c] = getattr(g, name)
            if ddelta is not None:
                ddelta[c] = ddelta_c
            if dlq is not None:
                for x, y in zip(dlq, dlq_c, strict=True):
                    x[c] = y
            dWS = g.dWS
            if c == nc - 1:  # the last chunk's starting memory is also an output
                for i, dl in enumerate(d_last_anchor):
                    if dl is not None:
                        dWS[i][..., : dl.shape[-2], :] += dl
            if c == 0:
                out = out._replace(dWS=dWS, dA=g.dA)
        return (*out.node_grads(), *(() if ddelta is None else (ddelta,)), *(dlq or ()))
