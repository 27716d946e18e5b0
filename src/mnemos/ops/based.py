"""BASED's linear attention (Arora et al. 2024, arXiv 2402.18668): causal linear attention with the 2nd-order Taylor
feature map and its normaliser, exactly, in chunks.

Feature map on a feature dim F (16 per head in the paper; ``D_phi = 1 + F + F^2`` features, 273 at F = 16)::

    phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]
    phi(q) . phi(k) = 1 + (q.k) / sqrt(F) + (q.k)^2 / (2 F)           (exp(q.k / sqrt F) to 2nd order; >= 1/2)

Per head, with the sums ``S = sum_s v_s phi(k_s)^T`` ``[V, D_phi]`` and ``z = sum_s phi(k_s)`` ``[D_phi]`` over the
tokens so far (the recurrent state: the KV and K sums)::

    S_t = S_{t-1} + v_t phi(k_t)^T      z_t = z_{t-1} + phi(k_t)      y_t = S_t phi(q_t) / (z_t . phi(q_t) + eps)

(the token reads its own write). The denominator is at least t / 2, so ``eps`` (1e-12, as in the BASED code) only
guards an empty state.

Chunked form. Within a chunk of C tokens starting from ``(S_0, z_0)``, the kernel matrix
``K[t, s] = 1 + s_ts + s_ts^2 / 2`` with ``s_ts = q_t . k_s / sqrt(F)`` (for s <= t, 0 above the diagonal) replaces
the features inside the chunk, and the features meet the state only::

    num = K V + phi(Q) S_0^T          den = K 1 + phi(Q) z_0          y = num / (den + eps)
    S_C = S_0 + V^T phi(K)            z_C = z_0 + sum_s phi(k_s)

Every chunk's own sums are computed at once; the states entering the chunks are their prefix sums (no decay, so no
loop). Gradients come from autograd.

Why not the memory rule's linear attention (:func:`mnemos.ops.neural_memory` with the dot loss, what the
``linear_attention`` baseline runs): it has no normaliser (that baseline lets a per-head RMSNorm stand in for it),
and it would carry the ``D_phi``-wide features through every chunk, where here they meet only the carried sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_rule.common import _no_autocast, compute_dtype

__all__ = ["based_linear_attention", "based_linear_attention_reference", "taylor_feature_map", "taylor_feature_dim"]


def taylor_feature_dim(feature_dim: int) -> int:
    """``D_phi = 1 + F + F^2``, the size of :func:`taylor_feature_map`'s output for a feature dim F."""
    return 1 + feature_dim + feature_dim * feature_dim


def taylor_feature_map(x: Tensor) -> Tensor:
    """``phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]``: x ``[..., F]`` -> ``[..., 1 + F + F^2]``,
    so that ``phi(q) . phi(k) = 1 + q.k / sqrt(F) + (q.k)^2 / (2 F)``."""
    Fd = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # [..., F * F]
    return torch.cat([torch.ones_like(x[..., :1]), x / Fd ** 0.25, outer / (math.sqrt(2) * math.sqrt(Fd))], dim=-1)


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check(q, k, v, initial_state, chunk_size, eps, check_values) -> tuple[int, int, int, int, int]:
    """Validate the op's arguments; returns ``(B, T, H, F, V)``."""
    for name, t, letters in (("q", q, "[B, T, H, F]"), ("k", k, "[B, T, H, F]"), ("v", v, "[B, T, H, V]")):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a {letters} tensor, got {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    B, T, H, Fd = q.shape
    V = v.shape[-1]
    if T < 1:
        raise ValueError(f"q must hold at least one token, got T={T}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H = {(B, T, H)}, got {tuple(v.shape)}")
    D = taylor_feature_dim(Fd)
    if initial_state is not None:
        ok = isinstance(initial_state, (tuple, list)) and len(initial_state) == 2
        kv, ks = initial_state if ok else (None, None)
        if not (ok and isinstance(kv, Tensor) and isinstance(ks, Tensor) and tuple(kv.shape) == (B, H, V, D)
                and tuple(ks.shape) == (B, H, D)):
            got = (tuple(_shape(t) for t in initial_state) if isinstance(initial_state, (tuple, list))
                   else _shape(initial_state))
            raise ValueError(f"initial_state must be a pair (kv [B, H, V, D_phi] = {(B, H, V, D)}, k_sum [B, H, D_phi] "
                             f"= {(B, H, D)}) with D_phi = 1 + F + F^2, got {got}")
        for name, t in (("initial_state kv", kv), ("initial_state k_sum", ks)):
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if check_values:
        tensors = [("q", q), ("k", k), ("v", v)]
        if initial_state is not None:
            tensors += [("initial_state kv", initial_state[0]), ("initial_state k_sum", initial_state[1])]
        for name, t in tensors:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
    return B, T, H, Fd, V


def based_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
    check_values: bool = True,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Causal linear attention with BASED's Taylor feature map and its normaliser, in chunks (module docstring).

    Args:
        q, k: ``[B, T, H, F]`` queries and keys before the feature map (F: the feature dim, 16 in the paper).
        v: ``[B, T, H, V]``.
        chunk_size: tokens per chunk of the computation; any value gives the same result. T need not be a multiple.
        initial_state: ``(kv [B, H, V, D_phi], k_sum [B, H, D_phi])`` to continue from (zeros when None), with
            ``D_phi = 1 + F + F^2``: a stream split into calls with the state carried equals one call.
        output_final_state: also return the state after the last token.
        eps: added to the normaliser (>= t / 2 > 0 from an empty state).
        check_values: check that the inputs are finite (a host sync per tensor on CUDA); layers pass False.

    Returns:
        ``(y [B, T, H, V] in q's dtype, (kv, k_sum) in the compute dtype, or None)``; differentiable with respect to
        every tensor argument. Half-precision inputs run in float32.

    Example:
        >>> q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 3)
        >>> y, (kv, k_sum) = based_linear_attention(q, k, v, chunk_size=2, output_final_state=True)
        >>> y.shape, kv.shape, k_sum.shape
        (torch.Size([1, 5, 2, 3]), torch.Size([1, 2, 3, 21]), torch.Size([1, 2, 21]))
    """
    B, T, H, Fd, V = _check(q, k, v, initial_state, chunk_size, eps, check_values)
    D = taylor_feature_dim(Fd)
    cdt, dev = compute_dtype(q.dtype), q.device
    with _no_autocast(dev):
        Q = min(chunk_size, T)
        nc = -(-T // Q)
        pad = nc * Q - T  # padded tokens are masked out of the sums (phi(0) = [1, 0, 0] is not zero)

        def chunks(t: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, nc, Q, D]
            t = t.to(cdt).transpose(1, 2)
            if pad:
                t = F.pad(t, (0, 0, 0, pad))
            return t.reshape(B, H, nc, Q, t.shape[-1])

        qc, kc, vc = chunks(q), chunks(k), chunks(v)
        # inside a chunk: the kernel 1 + s + s^2 / 2 of the features' inner product, causal
        s = (qc @ kc.mT) / math.sqrt(Fd)  # [B, H, nc, Q, Q]
        causal = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
        kern = torch.where(causal, 1 + s + s * s / 2, torch.zeros((), dtype=cdt, device=dev))
        num = kern @ vc  # [B, H, nc, Q, V]
        den = kern.sum(-1)  # [B, H, nc, Q]
        # each chunk's own sums, then the state entering each chunk (an exclusive prefix sum over chunks)
        phi_k = taylor_feature_map(kc)  # [B, H, nc, Q, D]
        if pad:
            valid = (torch.arange(nc * Q, device=dev) < T).to(cdt).view(nc, Q, 1)
            phi_k = phi_k * valid
        kv_local = vc.mT @ phi_k  # [B, H, nc, V, D]
        ks_local = phi_k.sum(-2)  # [B, H, nc, D]
        kv0 = torch.zeros(B, H, V, D, dtype=cdt, device=dev) if initial_state is None else initial_state[0].to(cdt)
        ks0 = torch.zeros(B, H, D, dtype=cdt, device=dev) if initial_state is None else initial_state[1].to(cdt)
        kv_in = torch.cat([kv0.unsqueeze(2), kv_local[:, :, :-1]], dim=2).cumsum(2)  # [B, H, nc, V, D]
        ks_in = torch.cat([ks0.unsqueeze(2), ks_local[:, :, :-1]], dim=2).cumsum(2)  # [B, H, nc, D]
        # the carried state's share: through the features
        phi_q = taylor_feature_map(qc)  # [B, H, nc, Q, D]
        num = num + phi_q @ kv_in.mT  # [B, H, nc, Q, V]
        den = den + (phi_q @ ks_in.unsqueeze(-1)).squeeze(-1)  # [B, H, nc, Q]
        y = num / (den.unsqueeze(-1) + eps)
        y = y.reshape(B, H, nc * Q, V)[:, :, :T].transpose(1, 2).to(q.dtype)  # [B, T, H, V]
        state = None
        if output_final_state:
            state = (kv_in[:, :, -1] + kv_local[:, :, -1], ks_in[:, :, -1] + ks_local[:, :, -1])
    return y, state


def based_linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
    check_values: bool = True,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """:func:`based_linear_attention` one token at a time through the explicit features (the truth the chunked form
    is tested against); ``chunk_size`` is checked and ignored."""
    B, T, H, Fd, V = _check(q, k, v, initial_state, chunk_size, eps, check_values)
    D = taylor_feature_dim(Fd)
    cdt = compute_dtype(q.dtype)
    with _no_autocast(q.device):
        kv = torch.zeros(B, H, V, D, dtype=cdt, device=q.device) if initial_state is None else initial_state[0].to(cdt)
        ks = torch.zeros(B, H, D, dtype=cdt, device=q.device) if initial_state is None else initial_state[1].to(cdt)
        ys = []
        for t in range(T):
            phi_q = taylor_feature_map(q[:, t].to(cdt))  # [B, H, D]
            phi_k = taylor_feature_map(k[:, t].to(cdt))  # [B, H, D]
            kv = kv + v[:, t].to(cdt).unsqueeze(-1) * phi_k.unsqueeze(-2)  # [B, H, V, D]
            ks = ks + phi_k
            num = (kv @ phi_q.unsqueeze(-1)).squeeze(-1)  # [B, H, V]
            den = (ks * phi_q).sum(-1, keepdim=True)  # [B, H, 1]
            ys.append(num / (den + eps))
        y = torch.stack(ys, dim=1).to(q.dtype)  # [B, T, H, V]
    return y, ((kv, ks) if output_final_state else None)
