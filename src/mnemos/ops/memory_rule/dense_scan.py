"""The chunked torch path for a retention other than decay (Moneta's lq, Memora's kl), for the Muon optimiser
(Atlas) and for Lattice's orthogonal slot update: every token's state of a chunk materialised from the chunk's anchor
quantities, differentiated by autograd and recomputed chunk by chunk in the backward. Derivation:
docs/MEMORY_RULE.md, "The chunked form of each axis".

Inside a chunk every gradient is still taken at one anchor (the effective weights ``F(A)`` at the chunk's start), so
token j's gradient for layer l is the outer product ``U_j = d_j a_j^T`` (``torch_scan.anchor_forward`` at F(A)) and
the accumulator recurrence stays linear:

    momentum: A_i = b_i A_0 + f_i S_0 - sum_j G[i, j] U_j           (G: theta and the window's band folded in)
    muon:     S_i = e_i S_0 - sum_j Pe[i, j] U_j,   A_i = b_i A_0 + sum_{j<=i} Pb[i, j] theta_j NS(S_j)
    Lattice:  S_i = e_i S_0 - sum_j Pe[i, j] theta_j U_j,   A_i = orthogonal_step((1 - alpha_i) A_{i-1}, S_i)

(Lattice's A is not linear in its past: the S_i are formed at once, the A_i one token after another.)

But the read ``o_i = M(q_i; F(A_i))`` needs F of every token's accumulator (softmax is not linear; lq divides by a
norm of A_i whose power has no low-rank form), and Muon needs NS of every token's momentum: so each A_i (and S_i) is
formed, ``[n, D_out, D_in]`` per layer, as products of the chunk's coefficients and factors (:class:`_RankStates`,
the outer products never formed; its backward is matmuls too); NS runs on all of a chunk's S_i in one batched
call. Moneta's lq reads take the dual form of the decay path scaled per token (``F(A_i) x = ||A_i||^(2-lq) A_i x``),
so there A_i is needed only for its norm. (Moneta with lq = 4 and momentum on the CPU does not come here: it runs the
hand-written dual form of ``torch_scan.py``, every token's norm from ``cpu_scan``'s lq4 kernel; this path takes lq on
other devices, dtypes and exponents.) On the CPU with momentum, Memora's reads (kl by rows) form no A_i at all:
``cpu_scan.kl_row_read`` steps the accumulator's recurrence through the chunk in registers and returns the last A and
S (:func:`stateless_reads`), and such a chunk is recorded by autograd as it runs. Where the hand-written dual form of
``torch_scan.py`` never forms a per-token state, this path costs O(n^2 D_out D_in) per chunk and layer; autograd
differentiates it, one chunk at a time (:class:`DenseChunk`: the backward recomputes a chunk from its starting state,
so memory is the states at chunk starts, not every token's). NS runs in the Gram domain where that is cheaper
(:func:`~.rule.newton_schulz_fast`); Muon with decay on the CPU, where a layer's short side plus the chunk's rank-one
terms is below its long side, forms no momentum at all and runs NS in the momenta's shared row space
(``muon_rowspace.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import cpu_scan
from .common import activate
from .muon_rowspace import RowspaceMuon, muon_rowspace, rowspace_pays
from .rule import MemoryRule, effective_weights, newton_schulz_fast, orthogonal_step
from .torch_scan import anchor_forward


def _combine(coef: Tensor, X: Tensor) -> Tensor:
    """``sum_j coef[..., i, j] X[..., j, :, :]``: coef ``[B, H, n, m]``, X ``[B, H, m, P, Q]`` ->
    ``[B, H, n, P, Q]``."""
    B, H, m, P, Q = X.shape
    return (coef @ X.reshape(B, H, m, P * Q)).view(B, H, coef.shape[-2], P, Q)


def _with_starts(coefs: Sequence[Tensor], rows: Sequence[Tensor], U: Tensor) -> Tensor:
    """``sum_r coefs[r][..., i] rows[r] + sum_j G[..., i, j] U_j`` as one matmul: the per-token scalars ``coefs``
    ``[B, H, n]`` of the matrices ``rows`` ``[B, H, P, Q]`` stacked before the last entry of coefs, ``G [B, H, n, m]``,
    against ``[rows; U]``. -> ``[B, H, n, P, Q]``."""
    *scalars, G = coefs
    stack = torch.cat([r.unsqueeze(2) for r in rows] + [U], dim=2)  # [B, H, r + m, P, Q]
    return _combine(torch.cat([c.unsqueeze(-1) for c in scalars] + [G], dim=-1), stack)


class _RankStates(torch.autograd.Function):
    """Every token's state of a chunk from its rank-one terms, ``out_i = sum_r C[i, r] R_r + sum_j G[i, j] d_j a_j^T``
    (C ``[B, H, n, r]``, R ``[B, H, r, P, Q]``, G ``[B, H, n, m]``, d ``[B, H, m, P]``, a ``[B, H, m, Q]``) ->
    ``[B, H, n, P, Q]``, the outer products never formed. Forward and backward are products only: each pass over
    the ``[n, P, Q]`` output or its gradient is a matmul (autograd's backward of the broadcast form multiplied the
    full-size gradient by every factor)."""

    @staticmethod
    def forward(ctx, C: Tensor, R: Tensor, G: Tensor, d: Tensor, a: Tensor) -> Tensor:
        B, H, n, m = G.shape
        r, P, Q = R.shape[2:]
        # the starts by multiply-adds (a matmul of inner dim r = 1 or 2 runs far below the memory's speed)
        out = torch.mul(R[:, :, 0].unsqueeze(2), C[..., 0, None, None])
        for k in range(1, r):
            out.addcmul_(R[:, :, k].unsqueeze(2), C[..., k, None, None])
        X = G.unsqueeze(-1) * d.unsqueeze(-3)  # [B, H, n, m, P]: X[i, j] = G[i, j] d_j
        a_n = a.unsqueeze(2).expand(B, H, n, m, Q).reshape(B * H * n, m, Q)
        out.view(B * H * n, P, Q).baddbmm_(X.view(B * H * n, m, P).mT, a_n)
        ctx.save_for_backward(C, R, G, d, a)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        C, R, G, d, a = ctx.saved_tensors
        B, H, n, m = G.shape
        r, P, Q = R.shape[2:]
        g = g.contiguous()
        gf = g.view(B, H, n, P * Q)
        dC = gf @ R.reshape(B, H, r, P * Q).mT  # [B, H, n, r]
        dR = (C.mT @ gf).view(B, H, r, P, Q)
        a_n = a.unsqueeze(2).expand(B, H, n, m, Q).reshape(B * H * n, m, Q)
        dX = (g.view(B * H * n, P, Q) @ a_n.mT).view(B, H, n, P, m).mT  # [B, H, n, m, P]
        X = G.unsqueeze(-1) * d.unsqueeze(-3)
        da = X.permute(0, 1, 3, 2, 4).reshape(B, H, m, n * P) @ g.view(B, H, n * P, Q)  # sum_i X[i, j]^T g_i
        dG = (dX * d.unsqueeze(-3)).sum(-1)
        dd = (dX * G.unsqueeze(-1)).sum(2)
        return dC, dR, dG, dd, da


def _last_state(S: Tensor, scale: Tensor, row: Tensor, d: Tensor, a: Tensor) -> Tensor:
    """A chunk's last momentum from its first one and its rank-one terms, no per-token state formed: ``scale S -
    sum_j row[j] d_j a_j^T`` (scale ``[B, H]``, row ``[B, H, m]``, d ``[B, H, m, P]``, a ``[B, H, m, Q]``; signs on
    the small factors: a negated state-sized product is one more pass over the state)."""
    return torch.addcmul(((-row).unsqueeze(-1) * d).mT @ a, scale[..., None, None], S)


def _rank_states(coefs: Sequence[Tensor], rows: Sequence[Tensor], d: Tensor, a: Tensor) -> Tensor:
    """:func:`_with_starts` for rank-one terms ``U_j = d_j a_j^T`` without forming them: ``sum_r coefs[r][..., i]
    rows[r] + sum_j G[..., i, j] d_j a_j^T`` (G the last entry of coefs ``[B, H, n, m]``; d ``[B, H, m, P]``, a
    ``[B, H, m, Q]``) -> ``[B, H, n, P, Q]`` (:class:`_RankStates`)."""
    *scalars, G = coefs
    return _RankStates.apply(torch.stack(scalars, -1), torch.stack(rows, 2), G, d, a)


class _Lq4Power(torch.autograd.Function):
    """``||A_i||_4^4 = sum A_i^4`` per matrix of A ``[..., P, Q]`` -> ``[...]``, in two passes forward (the squares,
    then their dot with themselves) and two backward (``4 g A^3`` from the saved squares)."""

    @staticmethod
    def forward(ctx, A: Tensor) -> Tensor:
        sq = (A * A).flatten(-2)
        ctx.save_for_backward(A, sq)
        return (sq.unsqueeze(-2) @ sq.unsqueeze(-1)).squeeze(-1).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        A, sq = ctx.saved_tensors
        return (sq.view_as(A) * A).mul_((4.0 * g)[..., None, None])


def _effective(A: Tensor, rule: MemoryRule) -> Tensor:
    """``rule.effective_weights`` for many matrices at once, in fewer passes (lq: :func:`_lq_scale`; no multiply by a
    softmax scale of 1): the same map, equal up to rounding."""
    if rule.retention == "lq":
        return A * _lq_scale(A, rule.lq)[..., None, None]  # A / ||A||_lq^(lq - 2), F(0) = 0
    if rule.retention == "kl" and rule.softmax_scale == 1.0:
        if rule.softmax_dim == "row":
            return torch.softmax(A, dim=-1)
        return torch.softmax(A.flatten(-2), dim=-1).view_as(A)
    return effective_weights(A, rule)


def _lq_scale(A: Tensor, lq: float) -> Tensor:
    """``||A_i||_lq^(2 - lq)`` per matrix of A ``[..., D_out, D_in]`` -> ``[...]``, 1 where A_i = 0 (F(0) = 0
    whatever it scales): Moneta's F(A_i) = A_i * this."""
    if lq == 4.0:
        n = _Lq4Power.apply(A)
        return torch.where(n > 0, n, torch.ones_like(n)).rsqrt()
    norm = torch.linalg.vector_norm(A, ord=lq, dim=(-2, -1))
    return torch.where(norm > 0, norm, torch.ones_like(norm)).pow(2.0 - lq)


def stateless_reads(rule: MemoryRule, x: Tensor, ncoef: int) -> bool:
    """Whether a chunk of this rule reads every token's state through ``cpu_scan``'s kernel, forming none: kl by rows
    with momentum on tensors like x (float32 / float64 on the CPU), the recurrence's gates in the coefficients
    (``ncoef`` 8)."""
    return (rule.retention == "kl" and rule.softmax_dim == "row" and rule.optimizer == "momentum" and ncoef == 8
            and cpu_scan.state_reads_unsupported_reason(x) is None)


def _lq_norms_scale(A: Tensor, S: Tensor, d: Tensor, a: Tensor, coef: Sequence[Tensor], rule: MemoryRule) -> Tensor:
    """:func:`_lq_scale` of every token's accumulator of a chunk with the momentum optimiser, ``[B, H, n]``, from the
    states formed by :func:`_rank_states`. ``coef``: :func:`dense_chunk`'s momentum coefficients."""
    b, f, G = coef[:3]
    return _lq_scale(_rank_states((b, f, -G), (A, S), d, a), rule.lq)


def dense_chunk(q: Tensor, k: Tensor, v: Tensor, delta: Tensor | None, coef: tuple[Tensor, ...],
                A0: Sequence[Tensor], S0: Sequence[Tensor], anchor: Sequence[Tensor], *, rule: MemoryRule,
                residual: bool, activation: str) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One chunk: q ``[B, H, n, K]``, key side k, v ``[B, H, m, D]`` (m = n + window - 1), delta ``[B, H, m]`` or
    None; A0, S0, anchor: L x ``[B, H, D_out, D_in]`` (accumulators). ``coef``: momentum ``(b, f, G, el, pl)`` with
    b, f ``[B, H, n]``, G ``[B, H, n, m]``, el ``[B, H]``, pl ``[B, H, m]``, for kl followed by the
    recurrence's ``(beta, eta, Wb)`` (``[B, H, n]`` twice, ``[B, H, n, window]``: :func:`stateless_reads`); muon
    ``(b, e, Pe, Pb)`` with b, e ``[B, H, n]``, Pe ``[B, H, n, m]`` (the window's band and gamma folded in, no
    theta), Pb ``[B, H, n, n]`` (theta folded in); orthogonal (Lattice) ``(e, Pt, beta)`` with e, beta ``[B, H, n]``
    (beta = 1 - alpha), Pt ``[B, H, n, m]`` (the band, gamma and theta folded in): every S_i from the chunk's outer
    products, then A_i = orthogonal_step(beta_i A_{i-1}, S_i) token after token (not linear in A: no coefficient form). Returns o
    ``[B, H, n, V]`` and the accumulators A, S after the chunk's last token."""
    W_bar = tuple(_effective(x, rule) for x in anchor)
    a, _, _, _, d, _ = anchor_forward(k, v, W_bar, residual=residual, activation=activation, loss=rule.loss,
                                      p=rule.p, delta=delta)
    A_tok, A_out, S_out = [], [], []
    # lq with momentum: a token's read F(A_i) x = ||A_i||_lq^(2 - lq) A_i x, and A_i x has the dual form of the decay
    # path (b_i A_0 x + f_i S_0 x - sum_j G[i, j] (a_j . x) d_j): A_i is formed only for its norm. kl by rows with
    # momentum on the CPU: cpu_scan.kl_row_read reads every A_i without forming it, and returns the last A and S.
    dual = rule.retention == "lq" and rule.optimizer == "momentum"
    stateless = stateless_reads(rule, q, len(coef))
    kl_rows = stateless and rule.retention == "kl"
    for A, S, ai, di in zip(A0, S0, a, d, strict=True):
        if kl_rows:  # the kernel steps A and S through the chunk: the final ones come out of it (below)
            A_tok.append((None, A, S, ai, di))
            continue
        if rule.optimizer == "momentum":
            b, f, G, el, pl = coef[:5]
            # (signs on the small factors: a negated state-sized product is one more pass over the state)
            S_out.append(_last_state(S, el, pl, di, ai))  # no U
            if dual:  # the last state from its own row of the coefficients: no gradient into every A_i
                A_out.append(torch.addcmul(torch.addcmul(((-G[..., -1, :, None]) * di).mT @ ai, b[..., -1, None, None],
                                                         A), f[..., -1, None, None], S))
                A_tok.append((_lq_norms_scale(A, S, di, ai, coef, rule), A, S, ai, di))
                continue
            Ai = _rank_states((b, f, -G), (A, S), di, ai)  # [B, H, n, D_out, D_in]
        elif rule.optimizer == "orthogonal":
            e, Pt, beta = coef
            Si = _rank_states((e, -Pt), (S,), di, ai)  # Titans' momentum at every token
            steps, a_i = [], A
            for i in range(Si.shape[2]):
                a_i = orthogonal_step(beta[..., i, None, None] * a_i, Si[:, :, i])
                steps.append(a_i)
            Ai = torch.stack(steps, dim=2)
            S_out.append(Si[:, :, -1].clone())
        else:
            b, e, Pe, Pb = coef
            if rule.retention == "decay" and rowspace_pays(S, Pe.shape[-1]):  # NS in the momenta's row space
                states, A_n = muon_rowspace(A, S, b, e, Pe, Pb, di, ai, rule.ns_steps, _rank_states)
                A_tok.append(states)
                A_out.append(A_n)
                S_out.append(_last_state(S, e[..., -1], Pe[..., -1, :], di, ai))
                continue
            Si = _rank_states((e, -Pe), (S,), di, ai)  # the momentum of the raw gradients, every token
            Ai = _with_starts((b, Pb), (A,), newton_schulz_fast(Si, rule.ns_steps))
            S_out.append(Si[:, :, -1].clone())  # not a view: it would keep every token's S alive
        A_tok.append(Ai)
        A_out.append(Ai[:, :, -1].clone())
    h = q
    for i, Ai in enumerate(A_tok):  # o_i = M(q_i; F(A_i)), every token through its own memory
        if dual:
            scale, A, S, ai, di = Ai
            b, f, G = coef[:3]
            y = torch.addcmul(b.unsqueeze(-1) * (h @ A.mT), f.unsqueeze(-1), h @ S.mT) - (G * (h @ ai.mT)) @ di
            h = scale.unsqueeze(-1) * y
        elif isinstance(Ai, RowspaceMuon):
            h = Ai.read(h)
        elif kl_rows:
            _, A, S, ai, di = Ai
            h, A_n, S_n = cpu_scan.kl_row_read(A, S, di, ai, *coef[5:], h, final=True)
            A_out.append(A_n)
            S_out.append(S_n)
            if rule.softmax_scale != 1.0:
                h = rule.softmax_scale * h
        else:
            h = (_effective(Ai, rule) @ h.unsqueeze(-1)).squeeze(-1)
        if i < len(A_tok) - 1:
            h = activate(h, activation)
    return (h + q if residual else h), A_out, S_out


def _chunk_of(opts: dict, xs: Sequence[Tensor | None]):
    """:func:`dense_chunk` on the flat inputs of :class:`DenseChunk` ``(q, k, v, delta, *coef, *A0, *S0, *anchor)``."""
    L, nco = opts["L"], opts["ncoef"]
    co, rest = xs[4:4 + nco], xs[4 + nco:]
    o, A_out, S_out = dense_chunk(*xs[:4], co, rest[:L], rest[L:2 * L], rest[2 * L:], **opts["kw"])
    return (o, *A_out, *S_out)


class DenseChunk(torch.autograd.Function):
    """One chunk of :func:`dense_chunk` as an autograd node that keeps only its inputs: the backward recomputes the
    chunk with autograd recording and differentiates it (torch.autograd.grad). Memory is the chunk's inputs (its
    starting state), not its every-token states. ``apply(opts, q, k, v, delta, *coef, *A0, *S0, *anchor)`` ->
    ``(o, *A, *S)``."""

    @staticmethod
    def forward(ctx, opts: dict, *xs):
        ctx.opts = opts
        ctx.save_for_backward(*xs)
        with torch.no_grad():
            return _chunk_of(opts, xs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        xs = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        leaves = [None if x is None else x.detach().requires_grad_(n) for x, n in zip(xs, need, strict=True)]
        with torch.enable_grad():
            outs = _chunk_of(ctx.opts, leaves)
        wanted = [x for x, n in zip(leaves, need, strict=True) if n and x is not None]
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs and wanted else [None] * len(wanted))
        return (None, *(next(got) if n and x is not None else None for x, n in zip(leaves, need, strict=True)))


def dense_scan(q, k, v, delta, coef, A0, S0, A, *, rule: MemoryRule, residual: bool, activation: str):
    """Every chunk in order, each one a :class:`DenseChunk` node when autograd records. Chunk-major inputs: q
    ``[nc, B, H, n, K]``, k, v ``[nc, B, H, m, D]``, delta ``[nc, B, H, m]`` or None, coef: :func:`dense_chunk`'s with
    a leading chunk dim; A0, S0: L x ``[B, H, D_out, D_in]`` at the first chunk's start; A: the first chunk's anchor
    when it is not A0 (a stream continued mid-chunk), else None. Returns o ``[nc, B, H, n, V]``, the final A and S
    and the last chunk's starting A (the anchor a stream continued from there would use)."""
    nc, L = q.shape[0], len(A0)
    opts = dict(L=L, ncoef=len(coef), kw=dict(rule=rule, residual=residual, activation=activation))
    stateless = stateless_reads(rule, q, len(coef))
    outs = []
    A_run, S_run = list(A0), list(S0)
    last_start = A_run
    # each input split into its chunks once: indexing x[c] per chunk would backpropagate through a chunk-sized slice
    # of a zero tensor the size of the whole input, O(nc^2) over the scan
    per_chunk = [x.unbind(0) for x in (q, k, v, *(() if delta is None else (delta,)), *coef)]
    if delta is None:
        per_chunk.insert(3, [None] * nc)
    for c in range(nc):
        anchor = A if (c == 0 and A is not None) else A_run
        last_start = A_run
        args = (*(x[c] for x in per_chunk), *A_run, *S_run, *anchor)
        record = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
        # a chunk that forms no per-token state is recorded by autograd as it runs (what it saves is a few states per
        # layer, like the node's inputs), so the backward does not run its forward again
        res = DenseChunk.apply(opts, *args) if record and not stateless else _chunk_of(opts, args)
        outs.append(res[0])
        A_run, S_run = list(res[1:1 + L]), list(res[1 + L:])
    return torch.stack(outs), A_run, S_run, last_start
