"""Triton kernels of the chunk loop for a depth-1 (matrix) memory: ``M(x) = W x (+ x)``.

Launcher contract: ``backends.py``. Math: ``torch_scan.py`` (``anchor_forward``, ``_read_forward``,
``_state_forward`` and their reverse ``_chunk_backward``) with L = 1. Per chunk, with the chunk's starting state
``W, S`` (``[V, K]``) and anchor ``Wa`` (W, or A for chunk 0 when a stream continues mid-chunk):

    pred = k Wa^T (+ k)        d = 2 (pred - v) (loss "l2") or -v (loss "dot")
    o    = b * (q W^T) + f * (q S^T) - (G * q k^T) d (+ q)
    W'   = bl W + fl S - (gl * d)^T k        S' = el S - (pl * d)^T k

Organisation. Grid ``(B * H, V / BLOCK_V)``: one program per (batch, head) and block of ``BLOCK_V`` rows of the state
(rows of W are independent in every line above except through sums over V, see the backward). Each program walks the
chunks itself (forward in order, backward in reverse; the chunk-to-chunk dependency never leaves the kernel), with
its slice of the state ``W, S`` (forward) or of the carried state gradient ``dW, dS`` (backward) in registers, in
float32 (float64 under the interpreter for float64 inputs). ``BLOCK_V = V`` (the interpreter's default) is one
program per (batch, head). In the backward, gradients that sum over V (dq, dk, db, df, dG and the coefficient rows)
are written per V-block to ``[V / BLOCK_V, ...]`` partial buffers that the launcher sums (no copy when there is one
block); everything else is written in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common
from .backends import ScanForward, ScanGrads, interpreting
from .triton_common import acc_dtype, empty

# Rows of the state per program (None: the default of ``_block_v``); tests set it to exercise the V split.
BLOCK_V: int | None = None


def _block_v(V: int, K: int) -> int:
    """Rows of the state per program. Interpreted: all of them (one program per (batch, head)). On a GPU: at most
    4096 state elements per tile, so that a program's state slice, its gradient and the chunk's start state fit in
    registers (an untuned choice: 32 rows at K = 128, 64 at K = 64)."""
    if BLOCK_V is not None:
        return min(BLOCK_V, V)
    if interpreting():
        return V
    return min(V, max(16, 4096 // K))


def _launch_opts(BV: int, K: int) -> dict:
    if interpreting():
        return {}
    return dict(num_warps=4 if BV * K <= 2048 else 8, num_stages=1)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr, fl_ptr, gl_ptr, pl_ptr,
    ws_ptr, a_ptr, ws_out_ptr, last_ptr, st_ptr,
    nc, BH,
    C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    RESIDUAL: tl.constexpr, L2: tl.constexpr, HAS_A: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Forward of every chunk for one (batch, head) and rows ``[pid_v BV, (pid_v + 1) BV)`` of the state.

    Writes o's columns of those rows, the final state, the last chunk's starting W and (``SAVE``) every chunk's
    starting ``[W; S]``. The state stays in registers; per chunk the program reads q, k (``C x K`` each), its
    ``C x BV`` slice of v, G (``C x C``) and the coefficient rows, and writes ``C x BV`` of o (plus ``2 BV x K`` of
    saved state when ``SAVE``).
    """
    bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = pid_v * BV + tl.arange(0, BV)  # this program's rows of W (and columns of v, o)
    w_off = rv[:, None] * K + rk[None, :]  # [BV, K] offsets of the rows in a [V, K] matrix
    s_off = (V + rv)[:, None] * K + rk[None, :]  # same rows of S in a stacked [2 V, K]
    ck_off = rc[:, None] * K + rk[None, :]
    cv_off = rc[:, None] * V + rv[None, :]

    W = tl.load(ws_ptr + bh * 2 * V * K + w_off).to(ACC)
    S = tl.load(ws_ptr + bh * 2 * V * K + s_off).to(ACC)
    for c in range(0, nc):
        row = c * BH + bh  # int64: (chunk, batch, head)
        q = tl.load(q_ptr + row * C * K + ck_off).to(ACC)  # [C, K]
        k = tl.load(k_ptr + row * C * K + ck_off).to(ACC)  # [C, K]
        v = tl.load(v_ptr + row * C * V + cv_off).to(ACC)  # [C, BV]
        b = tl.load(b_ptr + row * C + rc).to(ACC)
        f = tl.load(f_ptr + row * C + rc).to(ACC)
        gl = tl.load(gl_ptr + row * C + rc).to(ACC)
        pl = tl.load(pl_ptr + row * C + rc).to(ACC)
        G = tl.load(g_ptr + row * C * C + rc[:, None] * C + rc[None, :]).to(ACC)  # [C, C]
        bl = tl.load(bl_ptr + row).to(ACC)
        el = tl.load(el_ptr + row).to(ACC)
        fl = tl.load(fl_ptr + row).to(ACC)

        if SAVE:  # the chunk's starting state, for the backward
            tl.store(st_ptr + row * 2 * V * K + w_off, W)
            tl.store(st_ptr + row * 2 * V * K + s_off, S)
        if c == nc - 1:  # the last chunk's starting W is an output
            tl.store(last_ptr + bh * V * K + w_off, W)
        Wa = W
        if HAS_A:
            if c == 0:  # a stream continued mid-chunk finishes its first chunk against the anchor it carried
                Wa = tl.load(a_ptr + bh * V * K + w_off).to(ACC)

        # 2. anchor: the keys' prediction and its error
        if L2:
            pred = tl.dot(k, tl.trans(Wa), input_precision=PREC)  # [C, BV]
            if RESIDUAL:  # K == V: columns rv of k
                pred += tl.load(k_ptr + row * C * K + rc[:, None] * K + rv[None, :]).to(ACC)
            d = 2.0 * (pred - v)
        else:
            d = -v
        # 3. read (dual form)
        P = tl.dot(q, tl.trans(k), input_precision=PREC)  # [C, C]
        o = b[:, None] * tl.dot(q, tl.trans(W), input_precision=PREC)
        o += f[:, None] * tl.dot(q, tl.trans(S), input_precision=PREC)
        o -= tl.dot(G * P, d, input_precision=PREC)
        if RESIDUAL:
            o += tl.load(q_ptr + row * C * K + rc[:, None] * K + rv[None, :]).to(ACC)
        tl.store(o_ptr + row * C * V + cv_off, o)
        # 4. state carry
        W_next = bl * W + fl * S - tl.dot(tl.trans(gl[:, None] * d), k, input_precision=PREC)
        S = el * S - tl.dot(tl.trans(pl[:, None] * d), k, input_precision=PREC)
        W = W_next

    tl.store(ws_out_ptr + bh * 2 * V * K + w_off, W)
    tl.store(ws_out_ptr + bh * 2 * V * K + s_off, S)


@triton.jit
def _bwd_kernel(
    do_ptr, dws_fin_ptr, dlast_ptr,
    q_ptr, k_ptr, v_ptr,
    b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr, fl_ptr, gl_ptr, pl_ptr,
    st_ptr, a_ptr,
    dq_ptr, dk_ptr, dv_ptr, db_ptr, df_ptr, dg_ptr, dbl_ptr, del_ptr, dfl_ptr, dgl_ptr, dpl_ptr, dws0_ptr, da_ptr,
    nc, BH,
    C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    RESIDUAL: tl.constexpr, L2: tl.constexpr, HAS_A: tl.constexpr, HAS_DWS: tl.constexpr, HAS_DLAST: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Backward of every chunk, last first, for one (batch, head) and rows ``[pid_v BV, (pid_v + 1) BV)`` of the
    state; the carry is the gradient of those rows of the state after the chunk, ``dW, dS`` (``[BV, K]`` each), in
    registers. The chunk's prediction error d is recomputed from its starting state (read from ``starts``).

    Writes dv's columns of those rows and the starting-state gradient rows in place; dq, dk, db, df, dG, dbl, del,
    dfl, dgl, dpl are sums over V and go to this block's slot of their partial buffers (``[V / BV, ...]``). Per chunk
    the program reads q, k (``C x K``), its ``C x BV`` slices of v and do, G, the coefficient rows and ``2 BV x K``
    of saved state, and writes ``C x K`` twice (dq, dk), ``C x BV`` (dv), ``C x C`` (dG) and the coefficient rows.
    """
    bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = pid_v * BV + tl.arange(0, BV)
    w_off = rv[:, None] * K + rk[None, :]
    s_off = (V + rv)[:, None] * K + rk[None, :]
    ck_off = rc[:, None] * K + rk[None, :]
    cv_off = rc[:, None] * V + rv[None, :]
    part = pid_v * nc * BH  # this block's slot in the partial buffers, in units of (chunk, batch, head)

    if HAS_DWS:
        dW = tl.load(dws_fin_ptr + bh * 2 * V * K + w_off).to(ACC)
        dS = tl.load(dws_fin_ptr + bh * 2 * V * K + s_off).to(ACC)
    else:
        dW = tl.zeros([BV, K], dtype=ACC)
        dS = tl.zeros([BV, K], dtype=ACC)
    if HAS_A:
        if not L2:  # the anchor does not enter the "dot" loss
            tl.store(da_ptr + bh * V * K + w_off, tl.zeros([BV, K], dtype=ACC))
    for j in range(0, nc):
        c = nc - 1 - j
        row = c * BH + bh
        prow = part + row  # int64 row in the partial buffers
        # (statements are ordered to end each tile's live range early: stores go out as soon as a value is final)
        # recompute the error d of the chunk's keys at the anchor
        k = tl.load(k_ptr + row * C * K + ck_off).to(ACC)  # [C, K]
        v = tl.load(v_ptr + row * C * V + cv_off).to(ACC)  # [C, BV]
        W = tl.load(st_ptr + row * 2 * V * K + w_off).to(ACC)  # the chunk's starting state
        S = tl.load(st_ptr + row * 2 * V * K + s_off).to(ACC)
        Wa = W
        if HAS_A:
            if c == 0:
                Wa = tl.load(a_ptr + bh * V * K + w_off).to(ACC)
        if L2:
            pred = tl.dot(k, tl.trans(Wa), input_precision=PREC)
            if RESIDUAL:
                pred += tl.load(k_ptr + row * C * K + rc[:, None] * K + rv[None, :]).to(ACC)
            d = 2.0 * (pred - v)
        else:
            d = -v

        # 4. state: W' = bl W + fl S - (gl d)^T k, S' = el S - (pl d)^T k; the carry (dW, dS) is d/d[W'; S']
        bl = tl.load(bl_ptr + row).to(ACC)
        el = tl.load(el_ptr + row).to(ACC)
        fl = tl.load(fl_ptr + row).to(ACC)
        gl = tl.load(gl_ptr + row * C + rc).to(ACC)
        pl = tl.load(pl_ptr + row * C + rc).to(ACC)
        tl.store(dbl_ptr + prow, tl.sum(tl.sum(dW * W, axis=1), axis=0))
        tl.store(dfl_ptr + prow, tl.sum(tl.sum(dW * S, axis=1), axis=0))
        tl.store(del_ptr + prow, tl.sum(tl.sum(dS * S, axis=1), axis=0))
        rW = tl.dot(k, tl.trans(dW), input_precision=PREC)  # [C, BV]
        rS = tl.dot(k, tl.trans(dS), input_precision=PREC)
        dd = -(gl[:, None] * rW + pl[:, None] * rS)
        tl.store(dgl_ptr + prow * C + rc, -tl.sum(d * rW, axis=1))
        tl.store(dpl_ptr + prow * C + rc, -tl.sum(d * rS, axis=1))
        dk = -(tl.dot(gl[:, None] * d, dW, input_precision=PREC) + tl.dot(pl[:, None] * d, dS, input_precision=PREC))
        dW_prev = bl * dW
        dS_prev = el * dS + fl * dW

        # 3. read: o = b (q W^T) + f (q S^T) - (G * P) d (+ q)
        q = tl.load(q_ptr + row * C * K + ck_off).to(ACC)  # [C, K]
        dy = tl.load(do_ptr + row * C * V + cv_off).to(ACC)  # [C, BV]
        b = tl.load(b_ptr + row * C + rc).to(ACC)
        f = tl.load(f_ptr + row * C + rc).to(ACC)
        bdy = b[:, None] * dy
        fdy = f[:, None] * dy
        dW_prev += tl.dot(tl.trans(bdy), q, input_precision=PREC)
        dS_prev += tl.dot(tl.trans(fdy), q, input_precision=PREC)
        tl.store(db_ptr + prow * C + rc, tl.sum(dy * tl.dot(q, tl.trans(W), input_precision=PREC), axis=1))
        tl.store(df_ptr + prow * C + rc, tl.sum(dy * tl.dot(q, tl.trans(S), input_precision=PREC), axis=1))
        dq = tl.dot(bdy, W, input_precision=PREC) + tl.dot(fdy, S, input_precision=PREC)
        P = tl.dot(q, tl.trans(k), input_precision=PREC)  # [C, C]
        G = tl.load(g_ptr + row * C * C + rc[:, None] * C + rc[None, :]).to(ACC)
        dM = -tl.dot(dy, tl.trans(d), input_precision=PREC)  # [C, C]
        tl.store(dg_ptr + prow * C * C + rc[:, None] * C + rc[None, :], dM * P)
        dP = dM * G
        dd -= tl.dot(tl.trans(G * P), dy, input_precision=PREC)
        dq += tl.dot(dP, k, input_precision=PREC)
        if RESIDUAL:  # K == V: this block's columns of do go to the same columns of dq
            if BV == K:
                dq += dy
            else:
                mine = (rk >= pid_v * BV) & (rk < pid_v * BV + BV)
                dq += tl.load(do_ptr + row * C * V + rc[:, None] * V + rk[None, :], mask=mine[None, :],
                              other=0.0).to(ACC)
        tl.store(dq_ptr + prow * C * K + ck_off, dq)
        dk += tl.dot(tl.trans(dP), q, input_precision=PREC)

        # 2. anchor: d = 2 (k Wa^T (+ k) - v) or -v
        if L2:
            dpred = 2.0 * dd
            tl.store(dv_ptr + row * C * V + cv_off, -dpred)
            dWa = tl.dot(tl.trans(dpred), k, input_precision=PREC)  # [BV, K]
            dk += tl.dot(dpred, Wa, input_precision=PREC)
            if RESIDUAL:
                if BV == K:
                    dk += dpred
                else:  # scatter the block's columns into [C, K] (exact: a 0/1 selection matrix)
                    sel = (rv[:, None] == rk[None, :]).to(ACC)
                    dk += tl.dot(dpred, sel, input_precision=PREC)
            if HAS_A:
                if c == 0:
                    tl.store(da_ptr + bh * V * K + w_off, dWa)
                else:
                    dW_prev += dWa
            else:
                dW_prev += dWa
        else:
            tl.store(dv_ptr + row * C * V + cv_off, -dd)
        tl.store(dk_ptr + prow * C * K + ck_off, dk)
        if HAS_DLAST:
            if c == nc - 1:  # the last chunk's starting W is an output of the forward too
                dW_prev += tl.load(dlast_ptr + bh * V * K + w_off).to(ACC)
        dW = dW_prev
        dS = dS_prev

    tl.store(dws0_ptr + bh * 2 * V * K + w_off, dW)
    tl.store(dws0_ptr + bh * 2 * V * K + s_off, dS)


def _check(q, v, WS, A, residual, loss):
    if len(WS) != 1 or (A is not None and len(A) != 1):
        raise ValueError(f"triton_d1 runs depth-1 memories, got {len(WS)} layers")
    if loss not in ("l2", "dot"):
        raise ValueError(f"loss must be 'l2' or 'dot', got {loss!r}")
    K, V = q.shape[-1], v.shape[-1]
    if residual and K != V:
        raise ValueError(f"a residual memory needs K == V, got K={K}, V={V}")


def _acc(b: torch.Tensor, q: torch.Tensor) -> torch.dtype:
    """The compute dtype: the coefficients' (float32, or float64 for float64 inputs)."""
    acc = b.dtype
    if (q.dtype == torch.float64) != (acc == torch.float64):
        raise ValueError(f"float64 inputs come with float64 coefficients, got {q.dtype} and {acc}")
    return acc


def fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, residual, activation, loss, save) -> ScanForward:
    """Forward of the chunk loop (contract: ``backends.py``). ``activation`` is unused (no hidden layer)."""
    _check(q, v, WS, A, residual, loss)
    nc, B, H, C, K = q.shape
    V = v.shape[-1]
    BH, dev, acc = B * H, q.device, _acc(b, q)
    q, k, v = (x.contiguous() for x in (q, k, v))
    b, f, G, bl, el, fl, gl, pl = (x.to(acc).contiguous() for x in (b, f, G, bl, el, fl, gl, pl))
    ws = WS[0].to(acc).expand(B, H, 2 * V, K).contiguous()
    a = A[0].to(acc).expand(B, H, V, K).contiguous() if A is not None else ws
    o = empty(nc, B, H, C, V, dtype=acc, device=dev)
    ws_out = empty(B, H, 2 * V, K, dtype=acc, device=dev)
    last = empty(B, H, V, K, dtype=acc, device=dev)
    starts = empty(nc, B, H, 2 * V, K, dtype=acc, device=dev) if save else ws_out
    BV = _block_v(V, K)
    _fwd_kernel[(BH, V // BV)](
        q, k, v, o, b, f, G, bl, el, fl, gl, pl, ws, a, ws_out, last, starts, nc, BH,
        C=C, K=K, V=V, BV=BV, RESIDUAL=residual, L2=loss == "l2", HAS_A=A is not None, SAVE=save,
        ACC=acc_dtype(acc), PREC=triton_common.DOT_PRECISION, **_launch_opts(BV, K),
    )
    return ScanForward(o, [ws_out], [last], [starts] if save else None)


def bwd(do, dWS, d_last, q, k, v, b, f, G, bl, el, fl, gl, pl, starts, A, *, residual, activation,
        loss) -> ScanGrads:
    """Backward of the chunk loop (contract: ``backends.py``): every input's gradient, in the compute dtype."""
    _check(q, v, starts, A, residual, loss)
    nc, B, H, C, K = q.shape
    V = v.shape[-1]
    BH, dev, acc = B * H, q.device, _acc(b, q)
    q, k, v = (x.contiguous() for x in (q, k, v))
    b, f, G, bl, el, fl, gl, pl = (x.to(acc).contiguous() for x in (b, f, G, bl, el, fl, gl, pl))
    st = starts[0].to(acc).contiguous()
    do = do.contiguous()
    dws_fin = dWS[0].to(acc).contiguous() if dWS[0] is not None else st
    dlast = d_last[0].to(acc).contiguous() if d_last[0] is not None else st
    a = A[0].to(acc).expand(B, H, V, K).contiguous() if A is not None else st
    BV = _block_v(V, K)
    NV = V // BV

    def part(*shape):  # one slot per V-block
        return empty(NV, *shape, dtype=acc, device=dev)

    dq, dk = part(*q.shape), part(*k.shape)
    db, df, dG, dbl, del_, dfl, dgl, dpl = (part(*x.shape) for x in (b, f, G, bl, el, fl, gl, pl))
    dv = empty(*v.shape, dtype=acc, device=dev)
    dws0 = empty(B, H, 2 * V, K, dtype=acc, device=dev)
    dA = empty(B, H, V, K, dtype=acc, device=dev) if A is not None else dws0
    _bwd_kernel[(BH, NV)](
        do, dws_fin, dlast, q, k, v, b, f, G, bl, el, fl, gl, pl, st, a,
        dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, dws0, dA, nc, BH,
        C=C, K=K, V=V, BV=BV, RESIDUAL=residual, L2=loss == "l2", HAS_A=A is not None,
        HAS_DWS=dWS[0] is not None, HAS_DLAST=d_last[0] is not None,
        ACC=acc_dtype(acc), PREC=triton_common.DOT_PRECISION, **_launch_opts(BV, K),
    )
    parts = [x[0] if NV == 1 else x.sum(0) for x in (dq, dk, db, df, dG, dbl, del_, dfl, dgl, dpl)]
    dq, dk, db, df, dG, dbl, del_, dfl, dgl, dpl = parts
    dA_out = None if A is None else [dA if A[0].shape == dA.shape else dA.sum_to_size(A[0].shape)]
    return ScanGrads(dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, [dws0], dA_out)
