"""The (gated) delta rule, exactly, in chunks: DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet
(Yang, Kautz, Hatamizadeh 2024), the depth-1, momentum-free members of the memory family.

Per head, with a matrix state ``S [V, K]``, for every token t::

    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T        o_t = S_t q_t

(a = 1: DeltaNet). Unlike the Titans rule, every step is taken at the state of the token before, so the natural
chunked form is not an anchor approximation: it is the same recurrence, exact for any chunk size.

Chunked form (the WY / UT-transform idea of Yang et al. 2024, derived here for per-token decay). Write
``S_t = a_t S_{t-1} + u_t k_t^T`` with the "new value" ``u_t = beta_t (v_t - a_t S_{t-1} k_t)``. Inside a chunk that
starts from S_0, with ``gamma_t = prod_{m<=t} a_m`` and ``P[t, s] = prod_{s<m<=t} a_m`` (segment products, no
divisions)::

    S_t = gamma_t S_0 + sum_{s<=t} P[t, s] u_s k_s^T
    u_t + sum_{s<t} beta_t P[t, s] (k_t . k_s) u_s = beta_t v_t - beta_t gamma_t S_0 k_t

so ``(I + A) U = beta V - (beta gamma) K S_0^T`` with A strictly lower triangular, and with ``T = (I + A)^{-1}``
(one triangular solve per chunk, independent of the state)::

    U   = T (beta V) - T ((beta gamma) K) S_0^T                 (the only matmul of U with the state)
    O   = (gamma Q) S_0^T + (P * Q K^T) U
    S_C = gamma_C S_0 + U^T diag(P[C, :]) K

Everything except the three state products runs for all chunks at once; the loop over chunks carries S. Gradients
come from autograd (every step is a differentiable torch op, the triangular solve included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_rule.chunked import segment_products
from .memory_rule.common import _check_finite, _check_float, _no_autocast, compute_dtype

__all__ = ["delta_rule", "delta_rule_reference"]


def _check(q, k, v, beta, decay, initial_state, chunk_size, check_values) -> tuple[int, int, int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"{name} must be a [B, T, H, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        _check_float(name, x)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {(B, T, H)}, got {tuple(v.shape)}")
    if T < 1:
        raise ValueError(f"q must hold at least one token, got T={T}")
    for name, g, hi in (("beta", beta, 2.0), ("decay", decay, 1.0)):
        if g is None and name == "decay":  # DeltaNet
            continue
        if not isinstance(g, Tensor) or tuple(g.shape) != (B, T, H):
            raise ValueError(f"{name} must be a [B, T, H] = {(B, T, H)} tensor, got {getattr(g, 'shape', g)}")
        _check_float(name, g)
        if check_values and not bool(((g >= 0) & (g <= hi)).all()):
            raise ValueError(f"{name} must lie in [0, {hi:g}], got values in [{g.min().item()}, {g.max().item()}]")
    if initial_state is not None:
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != (B, H, V, K):
            raise ValueError(f"initial_state must be a [B, H, V, K] = {(B, H, V, K)} tensor, got "
                             f"{getattr(initial_state, 'shape', type(initial_state).__name__)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if check_values:
        for name, x in (("q", q), ("k", k), ("v", v), ("initial_state", initial_state)):
            if x is not None:
                _check_finite(name, x)
    return B, T, H, K, V


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    decay: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    output_final_state: bool = False,
    check_values: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule ``S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``o_t = S_t q_t``.

    Args:
        q, k: ``[B, T, H, K]`` (l2-normalised keys keep ``I - beta k k^T`` a contraction for beta in [0, 2]).
        v: ``[B, T, H, V]``.
        beta: ``[B, T, H]`` write strength in [0, 2].
        decay: ``[B, T, H]`` the gate a_t in [0, 1] (Gated DeltaNet); None for DeltaNet (a = 1).
        initial_state: ``[B, H, V, K]`` state to continue from (zeros when None). Any split of a stream into calls
            equals one call: the chunks are a way to compute, not part of the semantics.
        chunk_size: tokens per chunk of the computation (64, as in fla); any value gives the same result.
        output_final_state: also return the state after the last token.
        check_values: check that the inputs are finite and the gates in range (a host sync per check on CUDA);
            layers that compute these inputs pass False.

    Returns:
        ``(o [B, T, H, V] in q's dtype, S_T [B, H, V, K] in the compute dtype, or None)``; differentiable with
        respect to every tensor argument. Half-precision inputs run in float32.
    """
    B, T, H, K, V = _check(q, k, v, beta, decay, initial_state, chunk_size, check_values)
    dt, dev = compute_dtype(q.dtype), q.device
    with _no_autocast(dev):
        C = min(chunk_size, T)
        nc = -(-T // C)
        pad = nc * C - T  # padded tokens (k = v = q = 0, beta = 0, a = 1) leave the state as it is

        def chunks(x: Tensor, fill: float = 0.0) -> Tensor:  # [B, T, H(, D)] -> [B, H, nc, C(, D)]
            x = x.to(dt).transpose(1, 2)
            if pad:
                x = F.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad), value=fill)
            return x.reshape(B, H, nc, C, *x.shape[3:])

        qc, kc, vc, bc = chunks(q), chunks(k), chunks(v), chunks(beta)
        ac = chunks(decay, 1.0) if decay is not None else None
        causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
        if ac is None:
            P = causal.to(dt).expand(B, H, nc, C, C)
            gamma = torch.ones(B, H, nc, C, dtype=dt, device=dev)
        else:
            P = segment_products(ac)  # [B, H, nc, C, C], P[t, s] = prod_{s<m<=t} a_m (0 above the diagonal)
            gamma = torch.cumprod(ac, dim=-1)  # [B, H, nc, C]
        A = (bc.unsqueeze(-1) * P * (kc @ kc.mT)).tril(-1)  # [B, H, nc, C, C]
        eye = torch.eye(C, dtype=dt, device=dev)
        Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
        Uv = Tinv @ (bc.unsqueeze(-1) * vc)  # [B, H, nc, C, V]
        Wk = Tinv @ ((bc * gamma).unsqueeze(-1) * kc)  # [B, H, nc, C, K]
        Aqk = P * (qc @ kc.mT)  # [B, H, nc, C, C], lower triangular with its diagonal
        Qg = gamma.unsqueeze(-1) * qc  # [B, H, nc, C, K]
        last = P[..., -1, :].unsqueeze(-1)  # [B, H, nc, C, 1]: P[C, s], the decay from token s to the chunk's end

        S = (torch.zeros(B, H, V, K, dtype=dt, device=dev) if initial_state is None
             else initial_state.to(dt).expand(B, H, V, K))
        outs = []
        for c in range(nc):
            U = Uv[:, :, c] - Wk[:, :, c] @ S.mT  # [B, H, C, V]
            outs.append(Qg[:, :, c] @ S.mT + Aqk[:, :, c] @ U)
            S = gamma[:, :, c, -1, None, None] * S + (U * last[:, :, c]).mT @ kc[:, :, c]
        o = torch.stack(outs, dim=2).reshape(B, H, nc * C, V)[:, :, :T].transpose(1, 2).to(q.dtype)
    return o, (S if output_final_state else None)


def delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    decay: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    output_final_state: bool = False,
    check_values: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """:func:`delta_rule` one token at a time, as written (the truth the chunked form is tested against);
    ``chunk_size`` is accepted and ignored."""
    B, T, H, K, V = _check(q, k, v, beta, decay, initial_state, chunk_size, check_values)
    dt = compute_dtype(q.dtype)
    with _no_autocast(q.device):
        S = (torch.zeros(B, H, V, K, dtype=dt, device=q.device) if initial_state is None
             else initial_state.to(dt).expand(B, H, V, K))
        eye = torch.eye(K, dtype=dt, device=q.device)
        outs = []
        for t in range(T):
            qt, kt, vt = (x[:, t].to(dt) for x in (q, k, v))  # [B, H, D]
            bt = beta[:, t].to(dt)[..., None, None]
            at = 1.0 if decay is None else decay[:, t].to(dt)[..., None, None]
            S = at * S @ (eye - bt * kt.unsqueeze(-1) * kt.unsqueeze(-2)) + bt * vt.unsqueeze(-1) * kt.unsqueeze(-2)
            outs.append((S @ qt.unsqueeze(-1)).squeeze(-1))
        o = torch.stack(outs, dim=1).to(q.dtype)  # [B, T, H, V]
    return o, (S if output_final_state else None)
