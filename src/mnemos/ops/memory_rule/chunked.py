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
       (PyTorch, hand-written backward), on CPU tensors its compiled form ``cpu_scan.CpuChunkScan`` where that
       covers the call, or ``triton_scan.TritonChunkScan`` (fused Triton kernels);
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

from .backends import kernel_tile, split_state, triton_unsupported_reason
from .common import MemoryState, _no_autocast, activate, check_inputs
from .rule import MemoryRule, check_orthogonal_depth, check_rule_inputs, normalize_step_unsupported, resolve_rule, \
    torch_unsupported_reason
from . import cpu_scan
from .dense_scan import dense_scan
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
        a, _, _, _, d, _ = anchor_forward(k.float().transpose(1, 2), v.float().transpose(1, 2),
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
    """Chunk-parallel form of the memory rule in PyTorch; same contract as :func:`mnemos.ops.neural_memory`.
    ValueError naming the axis for a rule this path does not cover (:func:`~.rule.torch_unsupported_reason`)."""
    rule = resolve_rule(rule, loss)
    reason = torch_unsupported_reason(rule)
    if reason is not None:
        raise ValueError(f"impl='torch' cannot run this call: {reason}")
    check_rule_inputs(rule, q, delta, gamma, initial_state, check_values=check_values)
    return chunked_memory_rule(q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum,
                               residual=residual, activation=activation, loss=rule.loss, initial_state=initial_state,
                               output_final_state=output_final_state, check_values=check_values,
                               normalize_step=normalize_step, backend="torch", rule=rule, delta=delta, gamma=gamma)


def _one_token(q, k, v, theta, eta, alpha, W0, S0, A, *, residual, activation, loss, normalize, p=3.0, delta=None):
    """The rule for a call of one token (decoding), with the per-token update written out: no chunk layout and no
    coefficients. q, k, v ``[B, H, 1, D]``, gates ``[B, H]``, W0, S0: L x ``[B, H, D_out, D_in]``, A: the anchor;
    delta ``[B, H, 1]`` (huber) or None. Plain differentiable torch ops; returns o ``[B, H, 1, V]`` and the new W, S
    (new tensors). Window 1 only (a window's earlier tokens go through the chunk machinery)."""
    a, _, _, _, d, _ = anchor_forward(k, v, A, residual=residual, activation=activation, loss=loss, p=p, delta=delta)
    if normalize:
        scale = step_scale(a, d)
        d = [di * scale for di in d]
    th, et, be = theta[..., None, None], eta[..., None, None], (1.0 - alpha)[..., None, None]
    W, S = [], []
    for w, s, ai, di in zip(W0, S0, a, d, strict=True):
        S.append(torch.addcmul(et * s, th, di.mT @ ai, value=-1.0))  # S = eta S - theta u, u = d a^T
        W.append(torch.addcmul(S[-1], be, w))  # W = (1 - alpha) W + S
    h = q
    for i, w in enumerate(W):
        h = h @ w.mT
        if i < len(W) - 1:
            h = activate(h, activation)
    return (h + q if residual else h), W, S


def chunked_memory_rule(q, k, v, theta, eta, alpha, weights, *, chunk_size, momentum, residual, activation, loss,
                        initial_state, output_final_state, check_values, normalize_step, backend: str,
                        rule: MemoryRule | None = None, delta: Tensor | None = None, gamma: Tensor | None = None):
    """The chunked rule with the chunk loop of ``backend``, ``"torch"`` or ``"triton"`` (ValueError naming the reason
    where the kernels cannot run the call); the contract of :func:`mnemos.ops.neural_memory`.

    ``rule`` (already resolved, its inputs delta and gamma already checked by the caller; None: Titans' axes with
    ``loss``) carries the axes the torch backend covers beyond Titans' (rule.torch_unsupported_reason): the losses lp
    and huber and the Omega window in the hand-written dual form (torch_scan.py), the retentions lq / kl and Muon with
    every token's state formed (dense_scan.py). With window 1 and momentum, gamma scales theta (a token's gradient is
    in its own write only)."""
    spec = check_inputs(
        q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum, residual=residual,
        activation=activation, initial_state=initial_state, loss=None if rule is not None else loss,
        check_values=check_values,
    )
    if not isinstance(normalize_step, bool):
        raise TypeError(f"normalize_step must be a bool, got {normalize_step!r}")
    if rule is None:
        rule = resolve_rule("titans", loss)
    if normalize_step and normalize_step_unsupported(rule) is not None:
        raise ValueError(normalize_step_unsupported(rule))
    check_orthogonal_depth(rule, len(spec.weights))
    P = rule.window - 1  # the tokens before a chunk that its writes also fit
    # Moneta's lq = 4 with momentum on the CPU: the hand-written dual form (torch_scan.py), every token's norm from
    # cpu_scan's kernel; any other retention, Muon and Lattice form every token's state (dense_scan.py)
    lq = backend == "torch" and lq4_dual_form(rule, q.new_empty(0, dtype=spec.dtype))  # the dtype it computes in
    dense = (rule.retention != "decay" or rule.optimizer != "momentum") and not lq
    if P == 0 and gamma is not None and not dense:  # window 1: gamma_t scales the token's gradient, as theta_t does
        theta = theta * gamma
    if backend == "triton":
        reason = triton_unsupported_reason(q, spec.weights, None, chunk_size)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run this call: {reason}")
    B, T, dt, dev = spec.B, spec.T, spec.dtype, q.device
    C = chunk_size
    with _no_autocast(dev):
        W0 = tuple(w.to(dt).expand(B, *w.shape[-3:]) for w in spec.weights)  # [B, H, D_out, D_in]
        if spec.momentum is None:
            S0 = tuple(torch.zeros(B, *w.shape[-3:], dtype=dt, device=dev) for w in W0)
        else:
            S0 = tuple(s.to(dt) for s in spec.momentum)
        # a stream that stopped inside a chunk finishes that chunk first, against the anchor it carried
        A = tuple(a.to(dt) for a in spec.anchor) if spec.offset > 0 else None
        kw = dict(residual=residual, activation=activation, loss=rule.loss)  # the kernels' options
        tkw = dict(kw, normalize=normalize_step)  # the torch path's
        if rule.loss == "lp":
            tkw["p"] = rule.p
        huber = rule.loss == "huber"
        # decoding: one token's update, no chunk machinery
        if T == 1 and backend == "torch" and P == 0 and not dense and not lq:
            bh = lambda x: x.to(dt).transpose(1, 2)  # noqa: E731  [B, 1, H, D] -> [B, H, 1, D]; gates -> [B, H]
            o, W, S = _one_token(bh(q), bh(k), bh(v), bh(theta)[..., 0], bh(eta)[..., 0], bh(alpha)[..., 0], W0, S0,
                                 W0 if A is None else A, delta=bh(delta) if huber else None, **tkw)
            o = o.transpose(1, 2).to(q.dtype)
            return o, _final_state(spec, W, S, W0, A, None, nc=1, T=1, chunk_size=C) if output_final_state else None
        # the key side of every write: the call's tokens after P earlier ones (a window's: carried by the state, or
        # absent at a stream's start, weight 0), [B, P + T, H, ...]; window 1: the call's tokens, gamma in theta
        carried = tuple(initial_state.window) if initial_state is not None and P > 0 else ()
        if backend == "torch":
            keys = _key_side(k, v, gamma, delta if huber else None, carried, P, dt=dt, weighted=dense)
        # chunks: [the rest of a chunk in progress] + full chunks + [a last partial chunk]
        n0 = min(C - spec.offset, T) if spec.offset > 0 else 0
        full, rem = divmod(T - n0, C)
        lengths = ([n0] if n0 else []) + [C] * full + ([rem] if rem else [])
        nc = len(lengths)
        if dense:
            o, A_T, S_T, last_anchor = _run_dense(q, keys, theta, eta, alpha, W0, S0, A, lengths, P=P, dt=dt,
                                                  rule=rule, residual=residual, activation=activation)
            WS = [torch.cat((a_, s_), dim=-2) for a_, s_ in zip(A_T, S_T, strict=True)]
        else:
            WS0 = tuple(torch.cat((w, s), dim=-2) for w, s in zip(W0, S0, strict=True))
            if backend == "torch":
                o, WS, last_anchor = _run_torch(q, keys, theta, eta, alpha, WS0, A, lengths, P=P, dt=dt, opts=tkw,
                                                lq=lq)
            else:
                o, WS, last_anchor = _run_triton(q, k, v, theta, eta, alpha, WS0, A, lengths, C=C, dt=dt, kw=kw,
                                                 normalize=normalize_step)
        o = o.to(q.dtype)
    if not output_final_state:
        return o, None
    W = tuple(split_state(ws)[0].clone() for ws in WS)  # own storage: a state is measured and saved by its storage
    S = tuple(split_state(ws)[1].clone() for ws in WS)
    window = _window_state(k, v, theta, gamma, delta if huber else None, carried, P) if P > 0 else ()
    return o, _final_state(spec, W, S, W0, A, last_anchor, nc=nc, T=T, chunk_size=C, window=window)


def _key_side(k, v, gamma, delta, carried, P: int, *, dt, weighted: bool = False):
    """The tokens the writes fit, ``(k, v, g, d)`` ``[B, P + T, H(, D)]`` in dtype dt: P earlier tokens (the carried
    window's last ones, after zeros of weight 0 where the stream holds fewer) then the call's. g: the window weights
    (None for window 1 unless ``weighted``: there gamma scales theta); d: huber's thresholds (1 where absent) or
    None."""
    if P == 0 and not weighted:
        return k.to(dt), v.to(dt), None, None if delta is None else delta.to(dt)
    B, T, H = k.shape[:3]
    n0 = carried[0].shape[1] if carried else 0
    absent = P - n0

    def side(x, cx, fill):  # [B, T, H(, D)] after the carried [B, n0, H(, D)] after `absent` fill values
        parts = [torch.full((B, absent, *x.shape[2:]), fill, dtype=dt, device=x.device)] if absent else []
        if cx is not None:
            parts.append(cx.to(dt))
        parts.append(x.to(dt))
        return torch.cat(parts, dim=1)

    cx = lambda i: carried[i] if carried else None  # noqa: E731
    g = gamma if gamma is not None else torch.ones(B, T, H, dtype=dt, device=k.device)
    return (side(k, cx(0), 0.0), side(v, cx(1), 0.0), side(g, cx(2), 0.0),
            None if delta is None else side(delta, cx(3), 1.0))


def _window_state(k, v, theta, gamma, delta, carried, P: int) -> tuple[Tensor, ...]:
    """What a windowed stream carries: the last min(P, tokens so far) tokens' k, v, gamma (and delta), as the
    reference keeps them (``MemoryState.window``): the inputs' own values, in their own dtypes."""
    T = k.shape[1]
    g = gamma if gamma is not None else torch.ones_like(theta)
    now = (k, v, g) + (() if delta is None else (delta,))
    n0 = carried[0].shape[1] if carried else 0
    keep = min(P, n0 + T)
    if T >= keep:
        return tuple(x[:, T - keep:] for x in now)
    return tuple(torch.cat((c[:, n0 - (keep - T):], x), dim=1) for c, x in zip(carried, now, strict=True))


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


def _band(n: int, P: int, device) -> Tensor:
    """``[n, n + P]``: token j of a chunk (key-side index j + P) fits the key-side tokens j .. j + P."""
    j = torch.arange(n, device=device).unsqueeze(1)
    e = torch.arange(n + P, device=device).unsqueeze(0)
    return (e >= j) & (e <= j + P)


def lq4_dual_form(rule: MemoryRule, x: Tensor) -> bool:
    """Whether the torch path runs ``rule`` in the hand-written dual form with Moneta's retention (lq = 4, the momentum
    optimiser) on tensors like x: where ``cpu_scan``'s lq4 kernel reads every token's norm (float32 / float64 on the
    CPU, the library built)."""
    return (rule.retention == "lq" and rule.lq == 4.0 and rule.optimizer == "momentum"
            and cpu_scan.state_reads_unsupported_reason(x) is None)


def _run_torch(q, keys, theta, eta, alpha, WS, A, lengths, *, P, dt, opts, lq: bool = False):
    """The torch path's chunk loop, one run of equal-length chunks at a time, each in a chunk-major layout of its own
    without padding (a partial chunk costs its own tokens, not a whole chunk's); the state carries from run to run.
    ``keys``: the key side (:func:`_key_side`), P tokens before the call's. With a window (P > 0) each chunk of n
    tokens writes with the n + P key-side tokens that end at its last one, and the coefficient rows that weigh them
    are the band of gamma times the window-1 ones: ``G' = G @ Band``, ``Band[j, e] = gamma_e [j <= e <= j + P]``.
    ``lq``: Moneta's retention (:func:`lq4_dual_form`; WS holds accumulators), the per-token recurrence's gates
    ``(1 - alpha, eta, Wb)`` passed beside the coefficients.
    Returns o ``[B, T, H, V]``, the final ``[W; S]`` per layer and the memory at the last chunk's start."""
    B, T, H = theta.shape
    k, v, g, d = keys
    L, outs = len(WS), []
    for first, count, n in _runs(lengths):
        def chunks(x: Tensor) -> Tensor:  # [B, T, H(, D)] -> chunk-major [count, B, H, n(, D)]
            x = x[:, first:first + count * n].to(dt).transpose(1, 2)
            return x.reshape(B, H, count, n, *x.shape[3:]).movedim(2, 0).contiguous()

        qc, thc, etc, alc = (chunks(x) for x in (q, theta, eta, alpha))
        b, e, f, G, Pm = chunk_coefficients(thc, etc, alc)  # [count, B, H, n(, n)]
        if P == 0:
            kc, vc = chunks(k), chunks(v)
            dc = None if d is None else chunks(d)
            gl, pl = G[..., -1, :], Pm[..., -1, :]
            Wb = thc.unsqueeze(-1) if lq else None  # gamma is in theta
        else:  # key-side tokens first + c n + (0 .. n + P - 1): the chunk's n after the P before them
            idx = (first + n * torch.arange(count, device=q.device).unsqueeze(1)
                   + torch.arange(n + P, device=q.device))  # [count, n + P]
            side = lambda x: x[:, idx].movedim(1, 0).movedim(3, 2).contiguous()  # noqa: E731  [count, B, H, m(, D)]
            kc, vc, gc = side(k), side(v), side(g)
            dc = None if d is None else side(d)
            band = _band(n, P, q.device).to(dt) * gc.unsqueeze(-2)  # [count, B, H, n, m]
            G = G @ band
            gl, pl = G[..., -1, :], (Pm[..., -1:, :] @ band).squeeze(-2)
            # token t's write weighs key-side tokens t .. t + P by gamma (the band's nonzero diagonals)
            Wb = thc.unsqueeze(-1) * gc.unfold(-1, P + 1, 1) if lq else None
        rec = (1.0 - alc, etc, Wb) if lq else ()
        rows = (b[..., -1], e[..., -1], f[..., -1], gl, pl)  # at each chunk's last token
        inputs = (qc, kc, vc, b, f, G, *rows, *WS, *(A or ()), *(() if dc is None else (dc,)), *rec)
        if cpu_scan.unsupported_reason(q.device, dt, L, n, dict(opts, lq=lq), window=P > 0, delta=dc is not None,
                                       rows=B * H, state=sum(ws.shape[-2] * ws.shape[-1] for ws in WS)) is None:
            o_c, WS, last_anchor = cpu_scan.scan(inputs[:11], WS, A, opts, L)  # the same loop, compiled
        elif torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            o_c, *rest = TorchChunkScan.apply(dict(L=L, kw=opts, delta=dc is not None, lq=lq), *inputs)
            WS, last_anchor = rest[:L], rest[L:]
        else:
            o_c, WS, last_start, _, _ = scan(*inputs[:11], list(WS), A, save=False, delta=dc, lq=rec or None,
                                             **opts)
            last_anchor = [split_state(ws)[0].clone() for ws in last_start]
        outs.append(o_c.movedim(0, 2).reshape(B, H, count * n, -1))  # [B, H, tokens, V]
        A = None  # only a stream's first chunk has an anchor of its own
    return torch.cat(outs, dim=2).transpose(1, 2), WS, last_anchor


def _run_dense(q, keys, theta, eta, alpha, A0, S0, A, lengths, *, P, dt, rule, residual, activation):
    """The chunk loop of a retention other than decay, of Muon or of Lattice (dense_scan.py), one run of equal-length
    chunks at a time like :func:`_run_torch`, with the window's band and gamma folded into the coefficients (never
    into theta: Muon orthogonalises the weighted gradients' momentum before theta scales it). Returns o
    ``[B, T, H, V]``, the final accumulators A and S per layer and the last chunk's starting A."""
    B, T, H = theta.shape
    k, v, g, d = keys
    A0, S0, outs = list(A0), list(S0), []
    for first, count, n in _runs(lengths):
        def chunks(x: Tensor) -> Tensor:  # [B, T, H(, D)] -> chunk-major [count, B, H, n(, D)]
            x = x[:, first:first + count * n].to(dt).transpose(1, 2)
            return x.reshape(B, H, count, n, *x.shape[3:]).movedim(2, 0).contiguous()

        idx = (first + n * torch.arange(count, device=q.device).unsqueeze(1)
               + torch.arange(n + P, device=q.device))  # key-side tokens of each chunk, [count, n + P]
        side = lambda x: x[:, idx].movedim(1, 0).movedim(3, 2).contiguous()  # noqa: E731  [count, B, H, m(, D)]
        qc, thc, etc, alc = (chunks(x) for x in (q, theta, eta, alpha))
        kc, vc, gc = side(k), side(v), side(g)
        dc = None if d is None else side(d)
        band = _band(n, P, q.device).to(dt) * gc.unsqueeze(-2)  # [count, B, H, n, m]: gamma_e [j <= e <= j + P]
        if rule.optimizer == "momentum":
            b, e, f, G, Pm = chunk_coefficients(thc, etc, alc)
            coef = (b, f, G @ band, e[..., -1], (Pm[..., -1:, :] @ band).squeeze(-2))
            if rule.retention == "kl":  # the per-token recurrence's gates, for cpu_scan's reads of every state
                # token t's write weighs key-side tokens t .. t + P by gamma (the band's nonzero diagonals)
                coef += (1.0 - alc, etc, thc.unsqueeze(-1) * gc.unfold(-1, P + 1, 1))  # Wb [.., n, P + 1]
        elif rule.optimizer == "orthogonal":  # Lattice: Titans' momentum (theta in it), each A_i stepped in turn
            p_theta = segment_products(etc) * thc.unsqueeze(-2)  # chunk_coefficients' P_theta, without its G
            coef = (torch.cumprod(etc, dim=-1), p_theta @ band, 1.0 - alc)
        else:
            p_eta, p_beta = segment_products(etc), segment_products(1.0 - alc)
            coef = (torch.cumprod(1.0 - alc, dim=-1), torch.cumprod(etc, dim=-1), p_eta @ band,
                    p_beta * thc.unsqueeze(-2))
        o_c, A0, S0, last_start = dense_scan(qc, kc, vc, dc, coef, A0, S0, A, rule=rule, residual=residual,
                                             activation=activation)
        outs.append(o_c.movedim(0, 2).reshape(B, H, count * n, -1))  # [B, H, tokens, V]
        A = None  # only a stream's first chunk has an anchor of its own
    return torch.cat(outs, dim=2).transpose(1, 2), A0, S0, [a.clone() for a in last_start]


def _run_triton(q, k, v, theta, eta, alpha, WS0, A, lengths, *, C, dt, kw, normalize: bool = False):
    """The kernels' chunk loop: every chunk padded at its end to the kernels' tile (:func:`~.backends.kernel_tile` of
    C tokens; padding sits after every real token of its chunk, so causality keeps it out). Returns o
    ``[B, T, H, V]``, the final ``[W; S]`` and the last chunk's start.

    ``normalize`` (normalize_step): for a matrix memory the step's curvature is |k|^2 whatever the anchor (u = d k^T),
    so the scale s_j = 1 / max(1, |k_j|^2) folds into the coefficients that weigh token j's update (G's column j and
    the rows gl, pl), differentiated by autograd; the depth-2 kernels compute it at the anchor themselves."""
    from .triton_scan import TritonChunkScan, scan_forward_only  # here: triton is optional, imported on first use

    B, T, H = theta.shape
    L, nc, dev = len(WS0), len(lengths), q.device
    C = kernel_tile(C)  # chunks of fewer than 16 tokens (or of a size not a power of two) padded to the tile
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
    if normalize and L == 1:  # u_j = s_j d_j k_j^T: token j's update weighed by s_j wherever it enters
        scale = kc.pow(2).sum(-1).clamp_min(1.0).reciprocal().unsqueeze(-2)  # [nc, B, H, 1, C]
        G, P = G * scale, P * scale
    elif normalize:
        kw = dict(kw, normalize=True)
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


def _final_state(spec, W, S, W0, A, last_anchor, *, nc: int, T: int, chunk_size: int, window=()) -> MemoryState:
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
    return MemoryState(tuple(W), tuple(S), anchor, offset, chunk_size, tuple(window))
