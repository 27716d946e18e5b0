"""Mamba-2's selective state space recurrence (SSD: Dao & Gu 2024, arXiv 2405.21060), exactly, in chunks.

Per head h, with a matrix state ``S [P, N]`` (P the head dim of x, N the state dim of B and C), for every token t::

    a_t = exp(dt_t A_h)                   (A_h <= 0, dt_t >= 0: a_t in (0, 1])
    S_t = a_t S_{t-1} + dt_t x_t B_t^T    y_t = S_t C_t

It is gated linear attention with ``q = C``, ``k = B``, ``v = dt x`` and a scalar decay per token and head (Gated
DeltaNet without its erase term: :func:`mnemos.ops.delta_rule` cannot run it, its beta scales the erase and the write
together; without the erase no triangular solve is needed either, which is what makes this form cheaper). B and C
come in G groups shared by H / G heads each (head h reads group ``h // (H / G)``); Mamba-2's default is one group.
The D skip, the gate and the norm are the layer's (:class:`mnemos.models.mamba2.Mamba2Mixer`), not the op's.

Chunked form (the paper's SSD algorithm, ``ssd_minimal_discrete``). Within a chunk of C tokens that starts from S_0,
with the log decays ``l_t = dt_t A_h`` and their in-chunk cumulative sum ``Lam_t = sum_{m<=t} l_m``::

    L[t, s]   = exp(sum_{s<m<=t} l_m)  for s <= t, else 0          (segment sums, built by a masked cumsum: no
                                                                    differences of cumsums, no -inf)
    Y_diag    = (L * C B^T) (dt x)                                 (1. the chunk's own tokens, C x C)
    S_local   = sum_s L[C, s] dt_s x_s B_s^T                        (2. the chunk's own contribution to its end state)
    S_in(c+1) = exp(Lam_C) S_in(c) + S_local(c)                     (3. state passing: the only loop, over chunks)
    Y_off     = exp(Lam_t) S_in(c) C_t                              (4. the carried state's read)
    y         = Y_diag + Y_off

Steps 1, 2 and 4 run for all chunks at once; step 3 is an elementwise recurrence over the chunks. Padding at the end
uses ``dt = 0`` (``a = 1``, no write), so it leaves the state unchanged. Gradients come from autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory_rule.common import _no_autocast, compute_dtype

__all__ = ["ssd", "ssd_reference", "segment_sum_decay"]


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check(x, dt, A, B, C, initial_state, chunk_size, check_values) -> tuple[int, int, int, int, int, int]:
    """Validate the op's arguments; returns ``(B, T, H, P, G, N)``."""
    for name, t, rank, letters in (("x", x, 4, "[B, T, H, P]"), ("dt", dt, 3, "[B, T, H]"), ("A", A, 1, "[H]"),
                                   ("B", B, 4, "[B, T, G, N]"), ("C", C, 4, "[B, T, G, N]")):
        if not isinstance(t, Tensor) or t.ndim != rank:
            raise ValueError(f"{name} must be a {letters} tensor, got {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    Bsz, T, H, P = x.shape
    if T < 1:
        raise ValueError(f"x must hold at least one token, got T={T}")
    if tuple(dt.shape) != (Bsz, T, H):
        raise ValueError(f"dt must be [B, T, H] = {(Bsz, T, H)} (x's B, T, H), got {tuple(dt.shape)}")
    if tuple(A.shape) != (H,):
        raise ValueError(f"A must be [H] = {(H,)} (one decay rate per head of x), got {tuple(A.shape)}")
    G, N = B.shape[2:]
    if tuple(B.shape[:2]) != (Bsz, T) or G < 1 or N < 1 or H % G:
        raise ValueError(f"B must be [B, T, G, N] with x's B, T = {(Bsz, T)} and G dividing H = {H}, got "
                         f"{tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if initial_state is not None:
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != (Bsz, H, P, N):
            raise ValueError(f"initial_state must be a [B, H, P, N] = {(Bsz, H, P, N)} tensor, got "
                             f"{_shape(initial_state)}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be a floating-point tensor, got dtype {initial_state.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if check_values:
        for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("initial_state", initial_state)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        if not bool((dt >= 0).all()):
            raise ValueError(f"dt must be >= 0 (a step size, softplus of the layer's projection), got min "
                             f"{dt.min().item()}")
        if not bool((A <= 0).all()):
            raise ValueError(f"A must be <= 0 (a decay rate: exp(dt A) <= 1), got max {A.max().item()}")
    return Bsz, T, H, P, G, N


def segment_sum_decay(log_a: Tensor) -> Tensor:
    """``L[..., t, s] = exp(sum_{s<m<=t} log_a[..., m])`` for s <= t, 0 above the diagonal; log_a ``[..., n]`` ->
    ``[..., n, n]``. A masked cumsum (no differences of cumulative sums), so it is exact for long runs of decay and
    its gradient has no NaN from a masked -inf."""
    n = log_a.shape[-1]
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=log_a.device).tril(-1)
    terms = torch.where(strictly_lower, log_a.unsqueeze(-1), torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    seg = torch.cumsum(terms, dim=-2)  # [..., n, n]: [t, s] = sum_{s<m<=t} log_a_m (0 for t < s)
    return torch.where(strictly_lower | torch.eye(n, dtype=torch.bool, device=log_a.device), seg.exp(),
                       torch.zeros((), dtype=log_a.dtype, device=log_a.device))


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    check_values: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Mamba-2's recurrence ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T``, ``y_t = S_t C_t``, in its chunked form.

    Args:
        x: ``[B, T, H, P]`` the values (the layer's post-conv x).
        dt: ``[B, T, H]`` step sizes Δ >= 0 (softplus of the projection plus its bias: the layer applies it).
        A: ``[H]`` decay rates <= 0 (``-exp(A_log)``).
        B, C: ``[B, T, G, N]`` input and output projections of the state, G groups dividing H.
        chunk_size: tokens per chunk of the computation; any value gives the same result (64 by default; Mamba-2's
            kernels use 256). T need not be a multiple of it.
        initial_state: ``[B, H, P, N]`` the state to continue from (zeros when None): a stream split into calls with
            the state carried equals one call.
        output_final_state: also return the state after the last token.
        check_values: check that every input is finite, dt >= 0 and A <= 0 (host syncs on CUDA); layers that compute
            these inputs pass False.

    Returns:
        ``(y [B, T, H, P] in x's dtype, S_T [B, H, P, N] in the compute dtype, or None)``; differentiable with respect
        to every tensor argument. Half-precision inputs run in float32.

    Example:
        >>> x, dt = torch.randn(1, 5, 2, 3), torch.rand(1, 5, 2)
        >>> A, B, C = -torch.rand(2), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4)
        >>> y, S = ssd(x, dt, A, B, C, chunk_size=2, output_final_state=True)
        >>> y.shape, S.shape
        (torch.Size([1, 5, 2, 3]), torch.Size([1, 2, 3, 4]))
    """
    Bsz, T, H, P, G, N = _check(x, dt, A, B, C, initial_state, chunk_size, check_values)
    cdt, dev = compute_dtype(x.dtype), x.device
    with _no_autocast(dev):
        Q = min(chunk_size, T)
        nc = -(-T // Q)
        pad = nc * Q - T  # padded tokens: x = B = C = 0 and dt = 0 (a = 1, no write) leave the state as it is

        def chunks(t: Tensor) -> Tensor:  # [B, T, H(, D)] -> [B, H, nc, Q(, D)]
            t = t.to(cdt).transpose(1, 2)
            if pad:
                t = F.pad(t, (0, 0, 0, pad) if t.ndim == 4 else (0, pad))
            return t.reshape(Bsz, H, nc, Q, *t.shape[3:])

        rep = H // G  # heads per group: head h reads group h // rep
        xc = chunks(x)  # [B, H, nc, Q, P]
        dtc = chunks(dt)  # [B, H, nc, Q]
        Bc = chunks(B.repeat_interleave(rep, dim=2))  # [B, H, nc, Q, N]
        Cc = chunks(C.repeat_interleave(rep, dim=2))  # [B, H, nc, Q, N]
        log_a = dtc * A.to(cdt)[:, None, None]  # [B, H, nc, Q], <= 0
        L = segment_sum_decay(log_a)  # [B, H, nc, Q, Q]
        xbar = dtc.unsqueeze(-1) * xc  # [B, H, nc, Q, P]: dt x, the values written
        # 1. the chunk's own tokens
        y = (L * (Cc @ Bc.mT)) @ xbar  # [B, H, nc, Q, P]
        # 2. each chunk's own contribution to its end state: sum_s L[Q, s] xbar_s B_s^T
        S_local = (xbar * L[..., -1, :].unsqueeze(-1)).mT @ Bc  # [B, H, nc, P, N]
        # 3. state passing: the state entering each chunk, then the final state
        chunk_decay = L[..., -1, 0] * log_a[..., 0].exp()  # [B, H, nc]: exp(Lam_Q), the whole chunk's decay
        S = (torch.zeros(Bsz, H, P, N, dtype=cdt, device=dev) if initial_state is None
             else initial_state.to(cdt))
        S_in = []
        for c in range(nc):
            S_in.append(S)
            S = chunk_decay[:, :, c, None, None] * S + S_local[:, :, c]
        S_in = torch.stack(S_in, dim=2)  # [B, H, nc, P, N]
        # 4. the carried state's read, decayed to each token: exp(Lam_t) S_in C_t
        gamma = L[..., :, 0] * log_a[..., :1].exp()  # [B, H, nc, Q]: exp(Lam_t)
        y = y + gamma.unsqueeze(-1) * (Cc @ S_in.mT)  # [B, H, nc, Q, P]
        y = y.reshape(Bsz, H, nc * Q, P)[:, :, :T].transpose(1, 2).to(x.dtype)  # [B, T, H, P]
    return y, (S if output_final_state else None)


def ssd_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    check_values: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """:func:`ssd` one token at a time, as written (the truth the chunked form is tested against); ``chunk_size`` is
    checked and ignored."""
    Bsz, T, H, P, G, N = _check(x, dt, A, B, C, initial_state, chunk_size, check_values)
    cdt = compute_dtype(x.dtype)
    with _no_autocast(x.device):
        rep = H // G
        S = (torch.zeros(Bsz, H, P, N, dtype=cdt, device=x.device) if initial_state is None
             else initial_state.to(cdt))  # [B, H, P, N]
        Bh = B.to(cdt).repeat_interleave(rep, dim=2)  # [B, T, H, N]
        Ch = C.to(cdt).repeat_interleave(rep, dim=2)  # [B, T, H, N]
        ys = []
        for t in range(T):
            dtt = dt[:, t].to(cdt)  # [B, H]
            a = torch.exp(dtt * A.to(cdt))[..., None, None]  # [B, H, 1, 1]
            xt = x[:, t].to(cdt)  # [B, H, P]
            S = a * S + (dtt[..., None] * xt).unsqueeze(-1) * Bh[:, t].unsqueeze(-2)  # [B, H, P, N]
            ys.append((S @ Ch[:, t].unsqueeze(-1)).squeeze(-1))  # [B, H, P]
        y = torch.stack(ys, dim=1).to(x.dtype)  # [B, T, H, P]
    return y, (S if output_final_state else None)
