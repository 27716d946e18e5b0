"""The memory rule, chunk-parallel (the "dual form"): the driver of the two chunk-loop backends.
Derivation: docs/MEMORY_RULE.md.

Inside a chunk every gradient is taken at one anchor state (the memory at the end of the previous chunk), so every
per-token state of the chunk is a combination of anchor quantities with scalar coefficients built from cumulative
products of eta and (1 - alpha) (:func:`chunk_coefficients`). This module holds everything around the sequential part:

    1. checks (``common.check_inputs``) and the starting state ``[W; S]`` per layer;
    2. the chunk layout: tokens cut into chunks, chunk-major; a stream that stopped inside a chunk finishes that chunk
       first, against the anchor it carried;
    3. the coefficients of every chunk at once (differentiated by autograd);
    4. the chunk loop, one autograd node from a backend (contract: ``backends.py``): ``torch_scan.TorchChunkScan``
       (PyTorch, hand-written backward) or ``triton_scan.TritonChunkScan`` (fused Triton kernels);
    5. the final :class:`MemoryState`.

A call of one token (decoding) skips 2-4: its update is written out (:func:`_one_token`). Entry points:
:func:`neural_memory_chunked` (the torch backend; ``dispatch.neural_memory_triton`` is the kernels' one, through
:func:`chunked_memory_rule`) and :func:`step_curvature`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import split_state, triton_unsupported_reason
from .common import MemoryState, _no_autocast, activate, check_inputs
from .torch_scan import TorchChunkScan, anchor_forward, curvature, scan, step_scale


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


def step_curvature(k: Tensor, v: Tensor, weights: Sequence[Tensor], *, residual: bool = True,
                   activation: str = "gelu") -> Tensor:
    """How far one inner step moves the memory's own answer, per unit of step: ``||grad_W l||^2 / ||grad_M l||^2``.

    For token t with ``l = ||M(k_t; W) - v_t||^2`` a step ``-theta * grad_W l`` changes ``M(k_t)`` along its error
    by ``-theta * rho_t * grad_M l`` to first order, with ``rho_t`` returned here ``[B, T, H]``: the curvature of the
    inner problem along that error (``||k_t||^2`` for a matrix memory: 1 with unit keys; for an MLP memory it depends
    on the weights). k, v ``[B, T, H, D]``; weights L x ``[B, H, D_out, D_in]`` or ``[H, D_out, D_in]``.
    """
    with torch.no_grad(), _no_autocast(k.device):
        a, _, _, _, d = anchor_forward(k.float().transpose(1, 2), v.float().transpose(1, 2),
                                        [w.float() for w in weights], residual=residual, activation=activation,
                                        loss="l2")
        rho = curvature(a, d)  # [B, H, T]
    return rho.transpose(1, 2)


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
    return chunked_memory_rule(q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum,
                               residual=residual, activation=activation, loss=loss, initial_state=initial_state,
                               output_final_state=output_final_state, check_values=check_values,
                               normalize_step=normalize_step, backend="torch")


def _one_token(q, k, v, theta, eta, alpha, W0, S0, A, *, residual, activation, loss, normalize):
    """The rule for a call of one token (decoding), with the per-token update written out: no chunk layout and no
    coefficients. q, k, v ``[B, H, 1, D]``, gates ``[B, H]``, W0, S0: L x ``[B, H, D_out, D_in]``, A: the anchor.
    Plain differentiable torch ops; returns o ``[B, H, 1, V]`` and the new W, S (new tensors)."""
    a, _, _, _, d = anchor_forward(k, v, A, residual=residual, activation=activation, loss=loss)
    if normalize:
        scale = step_scale(a, d)
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


def chunked_memory_rule(q, k, v, theta, eta, alpha, weights, *, chunk_size, momentum, residual, activation, loss,
                        initial_state, output_final_state, check_values, normalize_step, backend: str):
    """The chunked rule with the chunk loop of ``backend``, ``"torch"`` or ``"triton"`` (ValueError naming the reason
    where the kernels cannot run the call); the contract of :func:`mnemos.ops.neural_memory`."""
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
            o, WS, last_anchor = _run_torch(q, k, v, theta, eta, alpha, WS0, A, lengths, dt=dt, opts=tkw)
        else:
            o, WS, last_anchor = _run_triton(q, k, v, theta, eta, alpha, WS0, A, lengths, C=C, dt=dt, kw=kw)
        o = o.to(q.dtype)
    if not output_final_state:
        return o, None
    W = tuple(split_state(ws)[0].clone() for ws in WS)  # own storage: a state is measured and saved by its storage
    S = tuple(split_state(ws)[1].clone() for ws in WS)
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


def _run_torch(q, k, v, theta, eta, alpha, WS, A, lengths, *, dt, opts):
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
            o_c, *rest = TorchChunkScan.apply(dict(L=L, kw=opts), *inputs)
            WS, last_anchor = rest[:L], rest[L:]
        else:
            o_c, WS, last_start, _, _ = scan(*inputs[:11], list(WS), A, save=False, **opts)
            last_anchor = [split_state(ws)[0].clone() for ws in last_start]
        outs.append(o_c.movedim(0, 2).reshape(B, H, count * n, -1))  # [B, H, tokens, V]
        A = None  # only a stream's first chunk has an anchor of its own
    return torch.cat(outs, dim=2).transpose(1, 2), WS, last_anchor


def _run_triton(q, k, v, theta, eta, alpha, WS0, A, lengths, *, C, dt, kw):
    """The kernels' chunk loop: every chunk padded at its end to C tokens (padding sits after every real token of its
    chunk, so causality keeps it out). Returns o ``[B, T, H, V]``, the final ``[W; S]`` and the last chunk's start."""
    from .triton_scan import TritonChunkScan, scan_forward_only  # here: triton is optional, imported on first use

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
