"""Muon's chunk (Atlas) in the row space its momenta share: Newton-Schulz on ``[m, m + k]`` coordinates of every
token's momentum instead of the ``[m, N]`` momentum itself. Derivation and measurements: docs/MEMORY_RULE.md,
"Muon in the chunk's row space".

Orient each layer matrix short side first: ``Y = S`` when ``D_out <= D_in`` ("wide"), ``Y = S^T`` otherwise, so Y is
``[m, N]`` with m <= N. Inside a chunk every momentum is the chunk's first one plus the chunk's rank-one terms,

    Y_i = e_i Y_0 - sum_t Pe[i, t] u_t w_t^T      (t over the chunk's k = n + window - 1 key-side tokens)

so every Y_i has its rows in the span of Y_0's m rows and the k vectors w_t: at most m + k of the N dimensions. With
Q ``[N, m + k]`` an orthonormal basis of that span (one Householder QR a chunk and layer), ``Y_i = L_i Q^T`` with
``L_i = Y_i Q`` ``[m, m + k]``, and since Newton-Schulz commutes with an orthonormal change of basis on the right
(``X X^T`` and the norm are unchanged), ``NS(Y_i) = NS(L_i) Q^T`` exactly: the iteration runs in its plain form (the
reference's rounding behaviour, every iterate formed) on matrices of m + k columns instead of N. At the layer's CPU
shape (m 64, N 256, chunk 16, window 4) that is 83 columns (88 with the padding of :data:`BASIS_MULTIPLE`) instead
of 256. The reads then need only ``Q^T h`` (wide) or ``Q z`` (tall), and the chunk's last accumulator one product with
Q^T. ``dense_scan.dense_chunk`` takes this path for Muon with retention decay where :func:`rowspace_pays`.

The gradient. Q is a constant of the computation (it is computed without autograd): differentiating ``NS(L_i) Q^T``
with Q fixed gives the exact derivative for every change of the inputs that keeps the momenta's rows in span(Q), and
nothing for the rest. The rest is closed-form: for a change D of Y whose rows are orthogonal to span(Q) (so to Y's
rows), ``Y D^T = 0``, so neither ``G = Y Y^T`` nor ``||Y||_F`` moves, and every iterate moves by ``p_k D``:
``dNS(Y) = R D`` with ``R = (p_(s-1) ... p_0) / r`` (``p_k = a I + b G_k + c G_k^2`` of the iteration, ``r =
||Y||_F + eps``). Only Y_0 and the w_t can move the rows out of span(Q) (``e``, ``Pe`` and the u_t move inside it), so
:class:`_ReadCorrection` and :class:`_EndCorrection` add exactly that missing part to their gradients: the first
from the reads' output gradients (every read's outer product ``l_i r_i^T``), the second from the last accumulator's.
Both nodes pass their values and output gradients through unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .rule import NS_COEFFICIENTS, NS_EPS


BASIS_MULTIPLE = 8  # the basis padded with zero columns to a multiple of this: a product with an inner or outer size
# of 83 ran at a third of the rate of one of 88 on this CPU (docs/PERFORMANCE.md, "Muon in the chunk's row space")


def rowspace_pays(S: Tensor, n_keys: int, devices: tuple[str, ...] = ("cpu",)) -> bool:
    """Whether a layer's momentum ``S [..., D_out, D_in]`` is cheaper in the chunk's row space: its short side plus
    the chunk's ``n_keys`` rank-one terms below its long side, on a dtype that Householder QR takes (float32 /
    float64), on one of ``devices``: the CPU by default, where it was measured (on a GPU the batched QR's cost against
    NS on the full momenta is not measured yet, so the path there stays the one that forms every momentum;
    ``benchmarks/memory_rules_speed.py`` times both)."""
    m, N = sorted(S.shape[-2:])
    return m + n_keys < N and S.dtype in (torch.float32, torch.float64) and S.device.type in devices


def newton_schulz_with_polynomial(L: Tensor, steps: int, polynomial: bool) -> tuple[Tensor, Tensor | None]:
    """The plain Newton-Schulz iteration on ``L [..., m, n]`` (m <= n; the reference's ``X <- a X + (b G + c G^2)
    X``, one fused multiply-add a step) -> ``(X, R)``, with R ``[..., m, m]`` (no gradient) ``= p_(s-1) ... p_0 / r``
    when ``polynomial`` (else None): the map of a change orthogonal to L's rows (module docstring). Differentiable in
    L by :class:`_PlainNewtonSchulz`'s hand-written backward."""
    X, R = _PlainNewtonSchulz.apply(L, steps, polynomial)
    return X, (R if polynomial else None)


NS_BLOCK = 32  # matrices a block: each block's steps run while its iterates are in cache (fwd+bwd of one chunk's
# 128 matrices of 64 x 88 on this CPU: 61 -> 52 ms; the op at T 1024: 12.5-13.7 -> 11.2-12.0 s)


class _PlainNewtonSchulz(torch.autograd.Function):
    """:func:`newton_schulz_with_polynomial` with its backward written out: three products of ``m^2 n`` and one of
    ``m^3`` a step, against autograd's four and two and its state-sized scalings. Step k, ``X' = a X + B X`` with
    ``B = b G + c G^2``, ``G = X X^T`` (both symmetric), back-propagates ``g -> a g + B^T g + (H + H^T) X``, where
    ``H = b Bg + c (Bg G + G Bg)``, ``Bg = g X^T``, so ``H + H^T = b Bs + c (Bs G + (Bs G)^T)`` with ``Bs = Bg +
    Bg^T``; then ``X_0 = L / r``, ``r = ||L||_F + eps``. Both directions run :data:`NS_BLOCK` matrices at a time,
    every step of a block before the next block. The forward keeps every step's X, G and B (one chunk's: the
    caller's backward recomputes chunk by chunk)."""

    @staticmethod
    def forward(ctx, L: Tensor, steps: int, polynomial: bool):
        a, b, c = NS_COEFFICIENTS
        shape = L.shape
        m, n = shape[-2:]
        norm = torch.linalg.matrix_norm(L, keepdim=True)
        r = (norm + NS_EPS).reshape(-1, 1, 1)
        flat = L.reshape(-1, m, n)
        eye = torch.eye(m, dtype=L.dtype, device=L.device)
        out = torch.empty_like(flat)
        R = flat.new_empty(flat.shape[0], m, m) if polynomial else L.new_empty(0)
        kept = []
        for s in range(0, flat.shape[0], NS_BLOCK):
            end = out[s:s + NS_BLOCK]  # the last iterate is written here directly (no copy of the block)
            X = torch.div(flat[s:s + NS_BLOCK], r[s:s + NS_BLOCK], out=end if steps == 0 else None)
            P, block = None, []
            for k in range(steps):
                G = X @ X.mT
                Bk = torch.baddbmm(G, G, G, beta=b, alpha=c)  # b G + c G^2
                if polynomial:
                    p = torch.add(Bk, eye, alpha=a)  # p_k
                    P = p if P is None else p @ P
                block += [X, G, Bk]
                X = torch.baddbmm(X, Bk, X, beta=a, out=end if k == steps - 1 else None)  # a X + B X = p_k X
            if polynomial:
                R[s:s + NS_BLOCK] = (eye if P is None else P) / r[s:s + NS_BLOCK]
            kept.append(block)
        ctx.kept = kept  # intermediates, not inputs or outputs: kept on ctx
        ctx.save_for_backward(L, norm)
        R = R.view(*shape[:-2], m, m) if polynomial else R
        ctx.mark_non_differentiable(R)
        return out.view(shape), R

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gX: Tensor, _gR):
        a, b, c = NS_COEFFICIENTS
        L, norm = ctx.saved_tensors
        m, n = L.shape[-2:]
        flat, flat_L = gX.reshape(-1, m, n), L.reshape(-1, m, n)
        norm = norm.reshape(-1, 1, 1)
        out = torch.empty_like(flat)
        for i, s in enumerate(range(0, flat.shape[0], NS_BLOCK)):
            g, block = flat[s:s + NS_BLOCK], ctx.kept[i]
            for k in range(len(block) // 3 - 1, -1, -1):
                X, G, Bk = block[3 * k:3 * k + 3]
                Bs = g @ X.mT  # the gradient of B, then its symmetric part (B and G are symmetric)
                Bs = Bs + Bs.mT
                T = Bs @ G
                Hs = torch.add(T, T.mT).mul_(c).add_(Bs, alpha=b)  # H + H^T = b Bs + c (Bs G + G Bs)
                g = torch.baddbmm(g, Bk.mT, g, beta=a).baddbmm_(Hs, X)
            # X_0 = L / r, r = ||L|| + eps: dL = g / r - L <g, L> / (r^2 ||L||) (0 where L = 0), the block in cache
            Lb, nb = flat_L[s:s + NS_BLOCK], norm[s:s + NS_BLOCK]
            rb = nb + NS_EPS
            along = (g * Lb).sum((-2, -1), keepdim=True) / (rb * rb * torch.where(nb > 0, nb, torch.ones_like(nb)))
            torch.div(g, rb, out=out[s:s + NS_BLOCK]).addcmul_(Lb, along, value=-1.0)
        ctx.kept = None
        return out.view(L.shape), None, None


class _ReadCorrection(torch.autograd.Function):
    """``y`` unchanged; in the backward, the part of Y_0's and the w_t's gradients that the reads' outer products
    ``l_i r_i^T`` put outside span(Q) (module docstring). ``apply(y, S, Wv, h, R, Q, e, Pb, Pe, U, wide)``: y the
    layer's reads ``[B, H, n, D_out]``, S the chunk's first momentum, Wv ``[B, H, k, N]`` the w_t, h ``[B, H, n,
    D_in]`` the reads' inputs, R ``[B, H, n, m, m]``, Q ``[B, H, N, m + k]``, e ``[B, H, n]``, Pb ``[B, H, n, n]``,
    Pe ``[B, H, n, k]``, U ``[B, H, k, m]`` the u_t."""

    @staticmethod
    def forward(ctx, y, S, Wv, h, R, Q, e, Pb, Pe, U, wide: bool):
        ctx.wide = wide
        ctx.save_for_backward(h, R, Q, e, Pb, Pe, U)
        return y.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        h, R, Q, e, Pb, Pe, U = ctx.saved_tensors
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return gy, None, None, *(None,) * 8
        left, right = (gy, h) if ctx.wide else (h, gy)  # the reads' gradient of NS(Y_j): sum_i Pb[i, j] l_i r_i^T
        right = right - (right @ Q) @ Q.mT  # [B, H, n, N], the part outside span(Q)
        Z = R.mT @ left.mT.unsqueeze(2)  # [B, H, n_j, m, n_i]: R_j^T l_i
        coef = torch.einsum("bhij,bhjdi->bhid", Pb * e.unsqueeze(-2), Z)  # sum_j e_j Pb[i, j] R_j^T l_i
        gY0 = coef.mT @ right  # [B, H, m, N]
        Zu = torch.einsum("bhtd,bhjdi->bhjit", U, Z)  # l_i^T R_j u_t
        Cw = torch.einsum("bhij,bhjt,bhjit->bhit", Pb, Pe, Zu)
        gW = -(Cw.mT @ right)  # [B, H, k, N]
        return gy, (gY0 if ctx.wide else gY0.mT), gW, *(None,) * 8


class _EndCorrection(torch.autograd.Function):
    """``A_end`` unchanged; in the backward, the part of Y_0's and the w_t's gradients that the last accumulator's
    gradient puts outside span(Q). ``apply(A_end, S, Wv, M1, V, Q, wide)``: M1 ``[B, H, m, m] = sum_j e_j Pb[-1, j]
    R_j^T``, V ``[B, H, m, k]``, ``V[:, t] = sum_j Pb[-1, j] Pe[j, t] R_j u_t``."""

    @staticmethod
    def forward(ctx, A_end, S, Wv, M1, V, Q, wide: bool):
        ctx.wide = wide
        ctx.save_for_backward(M1, V, Q)
        return A_end.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gA):
        M1, V, Q = ctx.saved_tensors
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return gA, None, None, None, None, None, None
        gAY = gA if ctx.wide else gA.mT  # [B, H, m, N]
        gAY = gAY - (gAY @ Q) @ Q.mT
        gY0 = M1 @ gAY
        return gA, (gY0 if ctx.wide else gY0.mT), -(V.mT @ gAY), None, None, None, None


class RowspaceMuon(NamedTuple):
    """One layer's Muon states of a chunk in the row space (:func:`muon_rowspace`): ``Xs [B, H, n, m, m + k]``
    (``sum_j Pb[i, j] NS(L_j)``), the basis Q, the chunk's first accumulator A and b, the orientation, and what the
    reads' gradient correction needs (None when autograd does not record)."""
    Xs: Tensor
    Q: Tensor
    A: Tensor
    b: Tensor
    wide: bool
    correction: tuple | None

    def read(self, h: Tensor) -> Tensor:
        """Every token's read through its own accumulator, ``A_i h_i`` for h ``[B, H, n, D_in]`` ->
        ``[B, H, n, D_out]``."""
        base = self.b.unsqueeze(-1) * (h @ self.A.mT)
        # a matrix-vector product per token, as a product and a sum: with 0 NS steps the op's fwd+bwd measured 7-8%
        # faster so than with a one-column bmm, with 5 the same (docs/PERFORMANCE.md, "Session 42")
        if self.wide:
            y = base + (self.Xs * (h @ self.Q).unsqueeze(-2)).sum(-1)
        else:
            y = base + (self.Xs * h.unsqueeze(-1)).sum(-2) @ self.Q.mT
        if self.correction is None:
            return y
        S, Wv, R, e, Pb, Pe, U = self.correction
        return _ReadCorrection.apply(y, S, Wv, h.detach(), R, self.Q, e, Pb, Pe, U, self.wide)


def muon_rowspace(A: Tensor, S: Tensor, b: Tensor, e: Tensor, Pe: Tensor, Pb: Tensor, d: Tensor, a: Tensor,
                  steps: int, rank_states) -> tuple[RowspaceMuon, Tensor]:
    """One layer of a Muon chunk (``dense_scan.dense_chunk``'s coefficients b, e, Pe, Pb; d ``[B, H, k, D_out]``, a
    ``[B, H, k, D_in]`` the anchor's rank-one factors; ``rank_states``: ``dense_scan._rank_states``) -> the chunk's
    states for the reads and its last accumulator, every NS in the row space (module docstring; the last momentum is
    ``dense_scan._last_state``'s, as on the other paths)."""
    wide = S.shape[-2] <= S.shape[-1]
    Y0, U, Wv = (S, d, a) if wide else (S.mT, a, d)
    with torch.no_grad():
        Q = torch.linalg.qr(torch.cat([Y0.mT, Wv.mT], dim=-1)).Q  # [B, H, N, m + k]
        width = -(-Q.shape[-1] // BASIS_MULTIPLE) * BASIS_MULTIPLE
        if width > Q.shape[-1]:  # zero columns: L_i and NS(L_i) get zero columns, nothing else changes
            Q = torch.nn.functional.pad(Q, (0, width - Q.shape[-1]))
    L = rank_states((e, -Pe), (Y0 @ Q,), U, Wv @ Q)  # [B, H, n, m, m + k]: L_i = Y_i Q
    record = torch.is_grad_enabled() and (S.requires_grad or Wv.requires_grad)  # the correction's inputs
    X, R = newton_schulz_with_polynomial(L, steps, polynomial=record)
    Xs = (Pb @ X.flatten(-2)).view(X.shape)  # sum_j Pb[i, j] X_j
    last = (Pb[..., -1:, :] @ X.flatten(-2)).view(X.shape[:2] + X.shape[3:])  # its last row again: no select backward
    A_end = b[..., -1, None, None] * A + (last @ Q.mT if wide else Q @ last.mT)
    correction = None
    if record:
        with torch.no_grad():
            lastrow = Pb[..., -1, :]
            M1 = torch.einsum("bhj,bhjde->bhde", e * lastrow, R.mT)
            V = torch.einsum("bhj,bhjt,bhjdt->bhdt", lastrow, Pe, R @ U.mT.unsqueeze(2))
        A_end = _EndCorrection.apply(A_end, S, Wv, M1, V, Q, wide)
        correction = (S, Wv, R, e.detach(), Pb.detach(), Pe.detach(), U.detach())
    return RowspaceMuon(Xs, Q, A, b, wide, correction), A_end
