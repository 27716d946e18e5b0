"""Triton kernels of the chunk loop for a depth-2 (MLP) memory: ``M(x) = W2 act(W1 x) (+ x)``.

Launcher contract: ``backends.py``. Math: ``torch_scan.py`` (``anchor_forward``, ``_read_forward``,
``_state_forward`` and their reverse ``_chunk_backward``), with L = 2, written here per tile of the hidden width.

Layout and organisation. One program per (batch, head) walks the chunks (forward in order, backward in reverse); the
chunk-to-chunk dependency never leaves the kernel. The state ``[W1; S1]`` (``[2 Hd, K]``) and ``[W2; S2]``
(``[2 V, Hd]``) lives in a float32 (float64 under the interpreter) workspace in global memory, which stays in L2 for
the programs of one launch; each chunk streams it in tiles of ``BLOCK_H`` hidden units:

forward, per chunk (2 passes over the hidden tiles):
    1. keys through the anchor: ``z1_j = k W1_j^T``, ``z2 += act(z1_j) W2_j^T``; then the output error d2;
    2. per tile: ``back_j = d2 W2_j``, ``d1_j = back_j act'(z1_j)``, the queries' layer-1 read
       ``y1_j = b (q W1_j^T) + f (q S1_j^T) - (G * q k^T) d1_j``, ``x1_j = act(y1_j)``, the sums the layer-2 read
       needs (``x1 W2^T``, ``x1 S2^T``, ``x1 a1^T``), and the tile's state update. The layer-2 read closes the chunk.
backward, per chunk (3 passes): recompute pass 1; pass I does every per-tile term (state, read, the error path of
layer 1) and rewrites the carried state gradient in place; pass II adds the terms that need the complete output
error gradient (the anchor forward of the keys).

Traffic per chunk and (batch, head): the state ~3 reads + 1 write forward, ~5 reads + 2 writes backward (all in L2),
the chunk's q, k, v, gates once. The backward reads every chunk's starting state saved by the forward (``starts``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common
from .backends import ScanForward, ScanGrads
from .triton_common import act, act_grad, act_grad2, empty, launch_opts


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr, fl_ptr, gl_ptr, pl_ptr, row, rc, rk, rv,
                C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, ACC: tl.constexpr):
    """One chunk's tokens ([C, K], [C, K], [C, V], upcast to ACC) and coefficients."""
    q = tl.load(q_ptr + row * C * K + rc[:, None] * K + rk[None, :]).to(ACC)
    k = tl.load(k_ptr + row * C * K + rc[:, None] * K + rk[None, :]).to(ACC)
    v = tl.load(v_ptr + row * C * V + rc[:, None] * V + rv[None, :]).to(ACC)
    b = tl.load(b_ptr + row * C + rc)
    f = tl.load(f_ptr + row * C + rc)
    G = tl.load(g_ptr + row * C * C + rc[:, None] * C + rc[None, :])
    G = tl.where(rc[:, None] >= rc[None, :], G, 0.0)
    bl = tl.load(bl_ptr + row)
    el = tl.load(el_ptr + row)
    fl = tl.load(fl_ptr + row)
    gl = tl.load(gl_ptr + row * C + rc)
    pl = tl.load(pl_ptr + row * C + rc)
    return q, k, v, b, f, G, bl, el, fl, gl, pl


@triton.jit
def _copy_state(src1, src2, dst1, dst2, rk, rv, rh,
                K: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr, W_ONLY: tl.constexpr):
    """Copy ``[W1; S1]`` ([2 HD, K]) and ``[W2; S2]`` ([2 V, HD]), or only W1 and W2 (the top halves)."""
    R1: tl.constexpr = HD if W_ONLY else 2 * HD
    R2: tl.constexpr = 1 if W_ONLY else 2
    for j0 in range(0, R1, BLOCK_H):
        tl.store(dst1 + (j0 + rh)[:, None] * K + rk[None, :], tl.load(src1 + (j0 + rh)[:, None] * K + rk[None, :]))
    for r0 in range(0, R2):
        for j0 in range(0, HD, BLOCK_H):
            off = (r0 * V + rv)[:, None] * HD + (j0 + rh)[None, :]
            tl.store(dst2 + off, tl.load(src2 + off))


@triton.jit
def _anchor_pass(k, v, anc1, anc2, zs, rc, rk, rv, rh,
                 C: tl.constexpr, K: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr,
                 RESIDUAL: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr):
    """Pass 1: the keys through the anchor memory (z1 to the scratch ``zs``); returns the output error d2."""
    z2 = tl.zeros((C, V), dtype=ACC)
    for j0 in range(0, HD, BLOCK_H):
        w1a = tl.load(anc1 + (j0 + rh)[:, None] * K + rk[None, :])  # [BLOCK_H, K]
        w2a = tl.load(anc2 + rv[:, None] * HD + (j0 + rh)[None, :])  # [V, BLOCK_H]
        z1 = tl.dot(k, tl.trans(w1a), input_precision=PREC)  # [C, BLOCK_H]
        tl.store(zs + rc[:, None] * HD + (j0 + rh)[None, :], z1)
        z2 += tl.dot(act(z1, ACT), tl.trans(w2a), input_precision=PREC)
    if RESIDUAL:
        z2 += k
    if LOSS == 0:
        d2 = 2.0 * (z2 - v)
    else:
        d2 = -v
    return d2


@triton.jit
def _step_scale(k, d2, anc2, zs, rc, rv, rh,
                C: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr, ACT: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr):
    """``normalize_step`` (torch_scan.step_scale): s = 1 / max(1, rho) per token with rho = (|k|^2 |d1|^2 +
    |a1|^2 |d2|^2) / |d2|^2 at the anchor (one more pass over the hidden tiles for d1 and a1). Returns s and the
    squared norms |k|^2, |d1|^2, |a1|^2, |d2|^2 ([C] each; the backward needs them)."""
    nd1 = tl.zeros((C,), dtype=ACC)
    na1 = tl.zeros((C,), dtype=ACC)
    for j0 in range(0, HD, BLOCK_H):
        z1 = tl.load(zs + rc[:, None] * HD + (j0 + rh)[None, :])
        w2a = tl.load(anc2 + rv[:, None] * HD + (j0 + rh)[None, :])
        a1 = act(z1, ACT)
        d1 = tl.dot(d2, w2a, input_precision=PREC) * act_grad(z1, ACT)
        nd1 += tl.sum(d1 * d1, axis=1)
        na1 += tl.sum(a1 * a1, axis=1)
    nk = tl.sum(k * k, axis=1)
    nd2 = tl.sum(d2 * d2, axis=1)
    rho = (nk * nd1 + na1 * nd2) / tl.maximum(nd2, 1e-30)
    return 1.0 / tl.maximum(rho, 1.0), nk, nd1, na1, nd2


@triton.jit
def _fwd_chunk(q, k, v, b, f, G, bl, el, fl, gl, pl, src1, src2, dst1, dst2, anc1, anc2, zs, rc, rk, rv, rh,
               C: tl.constexpr, K: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr,
               RESIDUAL: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
               PREC: tl.constexpr):
    """One chunk forward: reads the starting state at ``src``, writes the state after the chunk to ``dst`` (may be
    ``src``: each tile is read before it is rewritten), returns the chunk's outputs ``[C, V]``. With NORM every
    token's errors are scaled by its step scale s before they are used (d1 = (d2 W2a) act'(z1) scales with d2)."""
    d2 = _anchor_pass(k, v, anc1, anc2, zs, rc, rk, rv, rh, C, K, HD, V, BLOCK_H, RESIDUAL, ACT, LOSS, ACC, PREC)
    if NORM:
        tl.debug_barrier()
        sc, _, _, _, _ = _step_scale(k, d2, anc2, zs, rc, rv, rh, C, HD, V, BLOCK_H, ACT, ACC, PREC)
        d2 = d2 * sc[:, None]
    gp1 = G * tl.dot(q, tl.trans(k), input_precision=PREC)  # [C, C]
    tl.debug_barrier()
    # pass 2: per tile, the errors of layer 1, the queries' layer-1 read, the sums of the layer-2 read, the update
    p2 = tl.zeros((C, C), dtype=ACC)
    r2 = tl.zeros((C, V), dtype=ACC)
    rs2 = tl.zeros((C, V), dtype=ACC)
    for j0 in range(0, HD, BLOCK_H):
        z1 = tl.load(zs + rc[:, None] * HD + (j0 + rh)[None, :])
        a1 = act(z1, ACT)
        w1 = tl.load(src1 + (j0 + rh)[:, None] * K + rk[None, :])
        s1 = tl.load(src1 + (HD + j0 + rh)[:, None] * K + rk[None, :])
        w2 = tl.load(src2 + rv[:, None] * HD + (j0 + rh)[None, :])
        s2 = tl.load(src2 + (V + rv)[:, None] * HD + (j0 + rh)[None, :])
        w2a = tl.load(anc2 + rv[:, None] * HD + (j0 + rh)[None, :])
        d1 = tl.dot(d2, w2a, input_precision=PREC) * act_grad(z1, ACT)  # [C, BLOCK_H]
        y1 = (b[:, None] * tl.dot(q, tl.trans(w1), input_precision=PREC)
              + f[:, None] * tl.dot(q, tl.trans(s1), input_precision=PREC)
              - tl.dot(gp1, d1, input_precision=PREC))
        x1 = act(y1, ACT)
        p2 += tl.dot(x1, tl.trans(a1), input_precision=PREC)
        r2 += tl.dot(x1, tl.trans(w2), input_precision=PREC)
        rs2 += tl.dot(x1, tl.trans(s2), input_precision=PREC)
        gd1 = tl.trans(gl[:, None] * d1)  # [BLOCK_H, C]
        pd1 = tl.trans(pl[:, None] * d1)
        tl.store(dst1 + (j0 + rh)[:, None] * K + rk[None, :], bl * w1 + fl * s1 - tl.dot(gd1, k, input_precision=PREC))
        tl.store(dst1 + (HD + j0 + rh)[:, None] * K + rk[None, :], el * s1 - tl.dot(pd1, k, input_precision=PREC))
        gd2 = tl.trans(gl[:, None] * d2)  # [V, C]
        pd2 = tl.trans(pl[:, None] * d2)
        tl.store(dst2 + rv[:, None] * HD + (j0 + rh)[None, :], bl * w2 + fl * s2 - tl.dot(gd2, a1, input_precision=PREC))
        tl.store(dst2 + (V + rv)[:, None] * HD + (j0 + rh)[None, :], el * s2 - tl.dot(pd2, a1, input_precision=PREC))
    o = b[:, None] * r2 + f[:, None] * rs2 - tl.dot(G * p2, d2, input_precision=PREC)
    if RESIDUAL:
        o += q
    tl.debug_barrier()
    return o


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr, fl_ptr, gl_ptr, pl_ptr,
    ws1_ptr, ws2_ptr, a1_ptr, a2_ptr, ck1_ptr, ck2_ptr, last1_ptr, last2_ptr, z_ptr,
    nc, BH,
    C: tl.constexpr, K: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr,
    RESIDUAL: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, NORM: tl.constexpr, HAS_A: tl.constexpr,
    SAVE: tl.constexpr, EVERY: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (B*H,). The state is updated in place in the workspace ``ws``; with SAVE, the state at the start of
    every EVERY-th chunk is copied to the checkpoints ``ck`` ([nc / EVERY, B*H, ...])."""
    pid = tl.program_id(0)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = tl.arange(0, V)
    rh = tl.arange(0, BLOCK_H)
    ws1 = ws1_ptr + pid * 2 * HD * K  # [W1; S1]: [2 HD, K]
    ws2 = ws2_ptr + pid * 2 * V * HD  # [W2; S2]: [2 V, HD]
    zs = z_ptr + pid * C * HD  # scratch: z1 of the current chunk, [C, HD]
    for c in range(0, nc):
        row = c * BH + pid
        q, k, v, b, f, G, bl, el, fl, gl, pl = _load_chunk(q_ptr, k_ptr, v_ptr, b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr,
                                                           fl_ptr, gl_ptr, pl_ptr, row, rc, rk, rv, C, K, V, ACC)
        if SAVE:
            if c % EVERY == 0:
                ck = (c // EVERY) * BH + pid
                _copy_state(ws1, ws2, ck1_ptr + ck * 2 * HD * K, ck2_ptr + ck * 2 * V * HD, rk, rv, rh,
                            K, HD, V, BLOCK_H, False)
        if c == nc - 1:  # the last chunk's starting W is an output (a stream continued from here anchors on it)
            _copy_state(ws1, ws2, last1_ptr + pid * HD * K, last2_ptr + pid * V * HD, rk, rv, rh, K, HD, V, BLOCK_H, True)
        anc1 = ws1
        anc2 = ws2
        if HAS_A:
            if c == 0:  # a stream continued mid-chunk: the first chunk's anchor was carried in
                anc1 = a1_ptr + pid * HD * K
                anc2 = a2_ptr + pid * V * HD
        o = _fwd_chunk(q, k, v, b, f, G, bl, el, fl, gl, pl, ws1, ws2, ws1, ws2, anc1, anc2, zs, rc, rk, rv, rh,
                       C, K, HD, V, BLOCK_H, RESIDUAL, ACT, LOSS, NORM, ACC, PREC)
        tl.store(o_ptr + row * C * V + rc[:, None] * V + rv[None, :], o)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,
    b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr, fl_ptr, gl_ptr, pl_ptr,
    ck1_ptr, ck2_ptr, seg1_ptr, seg2_ptr, a1_ptr, a2_ptr, dws1_ptr, dws2_ptr, dl1_ptr, dl2_ptr, da1_ptr, da2_ptr,
    z_ptr, sda_ptr, sdz_ptr,
    dq_ptr, dk_ptr, dv_ptr, db_ptr, df_ptr, dg_ptr, dbl_ptr, del_ptr, dfl_ptr, dgl_ptr, dpl_ptr,
    nc, BH,
    C: tl.constexpr, K: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr,
    RESIDUAL: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, NORM: tl.constexpr, HAS_A: tl.constexpr,
    HAS_DLAST: tl.constexpr, EVERY: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (B*H,). Segments of EVERY chunks, last first: rebuild the segment's chunk-start states from its checkpoint
    into ``seg`` ([B*H, EVERY, ...]), then walk its chunks in reverse with the state gradient ``dws`` as the carry."""
    pid = tl.program_id(0)
    rc = tl.arange(0, C)
    rk = tl.arange(0, K)
    rv = tl.arange(0, V)
    rh = tl.arange(0, BLOCK_H)
    dws1 = dws1_ptr + pid * 2 * HD * K  # carry: gradient of [W1; S1] after the chunk -> before it
    dws2 = dws2_ptr + pid * 2 * V * HD
    zs = z_ptr + pid * C * HD
    sda = sda_ptr + pid * C * HD  # pass I -> pass II: partial gradients of a1 and z1
    sdz = sdz_ptr + pid * C * HD
    seg1 = seg1_ptr + pid * EVERY * 2 * HD * K
    seg2 = seg2_ptr + pid * EVERY * 2 * V * HD
    nseg = (nc + EVERY - 1) // EVERY
    for ss in range(0, nseg):
        s = nseg - 1 - ss
        c0 = s * EVERY
        c1 = tl.minimum(c0 + EVERY, nc)
        # rebuild the segment's chunk-start states from its checkpoint (the forward again, without outputs)
        _copy_state(ck1_ptr + (s * BH + pid) * 2 * HD * K, ck2_ptr + (s * BH + pid) * 2 * V * HD, seg1, seg2,
                    rk, rv, rh, K, HD, V, BLOCK_H, False)
        tl.debug_barrier()
        for c in range(c0, c1 - 1):
            row = c * BH + pid
            q, k, v, b, f, G, bl, el, fl, gl, pl = _load_chunk(q_ptr, k_ptr, v_ptr, b_ptr, f_ptr, g_ptr, bl_ptr,
                                                               el_ptr, fl_ptr, gl_ptr, pl_ptr, row, rc, rk, rv,
                                                               C, K, V, ACC)
            src1 = seg1 + (c - c0) * 2 * HD * K
            src2 = seg2 + (c - c0) * 2 * V * HD
            anc1 = src1
            anc2 = src2
            if HAS_A:
                if c == 0:
                    anc1 = a1_ptr + pid * HD * K
                    anc2 = a2_ptr + pid * V * HD
            _fwd_chunk(q, k, v, b, f, G, bl, el, fl, gl, pl, src1, src2, src1 + 2 * HD * K, src2 + 2 * V * HD,
                       anc1, anc2, zs, rc, rk, rv, rh, C, K, HD, V, BLOCK_H, RESIDUAL, ACT, LOSS, NORM, ACC, PREC)
        for cc in range(0, c1 - c0):
            c = c1 - 1 - cc
            _bwd_chunk(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr, fl_ptr, gl_ptr, pl_ptr,
                       seg1 + (c - c0) * 2 * HD * K, seg2 + (c - c0) * 2 * V * HD, a1_ptr, a2_ptr, dws1, dws2,
                       dl1_ptr, dl2_ptr, da1_ptr, da2_ptr, zs, sda, sdz,
                       dq_ptr, dk_ptr, dv_ptr, db_ptr, df_ptr, dg_ptr, dbl_ptr, del_ptr, dfl_ptr, dgl_ptr, dpl_ptr,
                       c, nc, BH, pid, rc, rk, rv, rh, C, K, HD, V, BLOCK_H, RESIDUAL, ACT, LOSS, NORM, HAS_A,
                       HAS_DLAST, ACC, PREC)


@triton.jit
def _bwd_chunk(
    q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr, fl_ptr, gl_ptr, pl_ptr,
    ws1, ws2, a1_ptr, a2_ptr, dws1, dws2, dl1_ptr, dl2_ptr, da1_ptr, da2_ptr, zs, sda, sdz,
    dq_ptr, dk_ptr, dv_ptr, db_ptr, df_ptr, dg_ptr, dbl_ptr, del_ptr, dfl_ptr, dgl_ptr, dpl_ptr,
    c, nc, BH, pid, rc, rk, rv, rh,
    C: tl.constexpr, K: tl.constexpr, HD: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr,
    RESIDUAL: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, NORM: tl.constexpr, HAS_A: tl.constexpr,
    HAS_DLAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    """The backward of chunk c, its starting state at ``ws``: reads the carry ``dws`` (gradient of the state after the
    chunk) and leaves there the gradient of the state before it; writes the chunk's input gradients.

    With NORM, ``d2`` below is the scaled error s d2 (and d1 the scaled s d1) that the forward's update used, so pass I
    gives the gradients of the scaled errors; pass I.5 turns them into those of the raw ones and adds the terms of s
    itself (torch_scan._step_scale_backward), before pass II takes them through the anchor."""
    row = c * BH + pid
    q, k, v, b, f, G, bl, el, fl, gl, pl = _load_chunk(q_ptr, k_ptr, v_ptr, b_ptr, f_ptr, g_ptr, bl_ptr, el_ptr,
                                                       fl_ptr, gl_ptr, pl_ptr, row, rc, rk, rv, C, K, V, ACC)
    do = tl.load(do_ptr + row * C * V + rc[:, None] * V + rv[None, :]).to(ACC)
    lower = rc[:, None] >= rc[None, :]
    use_a = HAS_A and c == 0
    anc1 = ws1
    anc2 = ws2
    if HAS_A:
        if c == 0:
            anc1 = a1_ptr + pid * HD * K
            anc2 = a2_ptr + pid * V * HD
    d2 = _anchor_pass(k, v, anc1, anc2, zs, rc, rk, rv, rh, C, K, HD, V, BLOCK_H, RESIDUAL, ACT, LOSS, ACC, PREC)
    if NORM:
        tl.debug_barrier()
        sc, nk, nd1, na1, nd2 = _step_scale(k, d2, anc2, zs, rc, rv, rh, C, HD, V, BLOCK_H, ACT, ACC, PREC)
        d2r = d2  # the raw error
        d2 = d2 * sc[:, None]
    p1 = tl.dot(q, tl.trans(k), input_precision=PREC)
    gp1 = G * p1
    tl.debug_barrier()

    dm2 = -tl.dot(do, tl.trans(d2), input_precision=PREC)  # [C, C]
    dp2 = dm2 * G
    if RESIDUAL:
        dq = do
    else:
        dq = tl.zeros((C, K), dtype=ACC)
    dk = tl.zeros((C, K), dtype=ACC)
    dd2 = tl.zeros((C, V), dtype=ACC)
    r2w = tl.zeros((C, V), dtype=ACC)
    r2s = tl.zeros((C, V), dtype=ACC)
    p2 = tl.zeros((C, C), dtype=ACC)
    dm1 = tl.zeros((C, C), dtype=ACC)
    db = tl.zeros((C,), dtype=ACC)
    df = tl.zeros((C,), dtype=ACC)
    dgl = tl.zeros((C,), dtype=ACC)
    dpl = tl.zeros((C,), dtype=ACC)
    dbl = tl.sum(tl.zeros((C,), dtype=ACC), axis=0)
    dfl = dbl
    del_ = dbl

    # pass I: everything that is per tile
    for j0 in range(0, HD, BLOCK_H):
        z1 = tl.load(zs + rc[:, None] * HD + (j0 + rh)[None, :])
        a1 = act(z1, ACT)
        dact = act_grad(z1, ACT)
        w1 = tl.load(ws1 + (j0 + rh)[:, None] * K + rk[None, :])  # [BLOCK_H, K]
        s1 = tl.load(ws1 + (HD + j0 + rh)[:, None] * K + rk[None, :])
        w2 = tl.load(ws2 + rv[:, None] * HD + (j0 + rh)[None, :])  # [V, BLOCK_H]
        s2 = tl.load(ws2 + (V + rv)[:, None] * HD + (j0 + rh)[None, :])
        w2a = tl.load(anc2 + rv[:, None] * HD + (j0 + rh)[None, :])
        back = tl.dot(d2, w2a, input_precision=PREC)  # [C, BLOCK_H]
        d1 = back * dact
        xw1 = tl.dot(q, tl.trans(w1), input_precision=PREC)
        xs1 = tl.dot(q, tl.trans(s1), input_precision=PREC)
        y1 = b[:, None] * xw1 + f[:, None] * xs1 - tl.dot(gp1, d1, input_precision=PREC)
        x1 = act(y1, ACT)
        p2 += tl.dot(x1, tl.trans(a1), input_precision=PREC)

        gw1 = tl.load(dws1 + (j0 + rh)[:, None] * K + rk[None, :])
        gs1 = tl.load(dws1 + (HD + j0 + rh)[:, None] * K + rk[None, :])
        gw2 = tl.load(dws2 + rv[:, None] * HD + (j0 + rh)[None, :])
        gs2 = tl.load(dws2 + (V + rv)[:, None] * HD + (j0 + rh)[None, :])
        dbl += tl.sum(tl.sum(gw1 * w1, axis=1), axis=0) + tl.sum(tl.sum(gw2 * w2, axis=1), axis=0)
        dfl += tl.sum(tl.sum(gw1 * s1, axis=1), axis=0) + tl.sum(tl.sum(gw2 * s2, axis=1), axis=0)
        del_ += tl.sum(tl.sum(gs1 * s1, axis=1), axis=0) + tl.sum(tl.sum(gs2 * s2, axis=1), axis=0)

        # state term, layer 1 (input k, error d1) and layer 2 (input a1, error d2)
        rw1 = tl.dot(k, tl.trans(gw1), input_precision=PREC)  # [C, BLOCK_H]
        rs1 = tl.dot(k, tl.trans(gs1), input_precision=PREC)
        dd1 = -(gl[:, None] * rw1 + pl[:, None] * rs1)
        dgl -= tl.sum(d1 * rw1, axis=1)
        dpl -= tl.sum(d1 * rs1, axis=1)
        dk -= (tl.dot(gl[:, None] * d1, gw1, input_precision=PREC)
               + tl.dot(pl[:, None] * d1, gs1, input_precision=PREC))
        r2w += tl.dot(a1, tl.trans(gw2), input_precision=PREC)
        r2s += tl.dot(a1, tl.trans(gs2), input_precision=PREC)
        da1 = -(tl.dot(gl[:, None] * d2, gw2, input_precision=PREC)
                + tl.dot(pl[:, None] * d2, gs2, input_precision=PREC))
        nw1 = bl * gw1
        ns1 = el * gs1 + fl * gw1
        nw2 = bl * gw2
        ns2 = el * gs2 + fl * gw2

        # read term, layer 2 (input x1)
        tw = tl.dot(do, w2, input_precision=PREC)  # [C, BLOCK_H]
        ts = tl.dot(do, s2, input_precision=PREC)
        nw2 += tl.dot(tl.trans(b[:, None] * do), x1, input_precision=PREC)
        ns2 += tl.dot(tl.trans(f[:, None] * do), x1, input_precision=PREC)
        db += tl.sum(x1 * tw, axis=1)
        df += tl.sum(x1 * ts, axis=1)
        dx1 = b[:, None] * tw + f[:, None] * ts + tl.dot(dp2, a1, input_precision=PREC)
        da1 += tl.dot(tl.trans(dp2), x1, input_precision=PREC)
        dy1 = dx1 * act_grad(y1, ACT)
        # read term, layer 1 (input q)
        nw1 += tl.dot(tl.trans(b[:, None] * dy1), q, input_precision=PREC)
        ns1 += tl.dot(tl.trans(f[:, None] * dy1), q, input_precision=PREC)
        db += tl.sum(dy1 * xw1, axis=1)
        df += tl.sum(dy1 * xs1, axis=1)
        dm1 -= tl.dot(dy1, tl.trans(d1), input_precision=PREC)
        dd1 -= tl.dot(tl.trans(gp1), dy1, input_precision=PREC)
        dq += (tl.dot(b[:, None] * dy1, w1, input_precision=PREC)
               + tl.dot(f[:, None] * dy1, s1, input_precision=PREC))
        # the error path d1 = (d2 W2a) act'(z1)
        dback = dd1 * dact
        dz1 = dd1 * back * act_grad2(z1, ACT)
        dd2 += tl.dot(dback, tl.trans(w2a), input_precision=PREC)
        dw2a = tl.dot(tl.trans(d2), dback, input_precision=PREC)  # [V, BLOCK_H]
        tl.store(sda + rc[:, None] * HD + (j0 + rh)[None, :], da1)
        tl.store(sdz + rc[:, None] * HD + (j0 + rh)[None, :], dz1)
        if use_a:
            tl.store(da2_ptr + pid * V * HD + rv[:, None] * HD + (j0 + rh)[None, :], dw2a)
        else:
            nw2 += dw2a
        tl.store(dws1 + (j0 + rh)[:, None] * K + rk[None, :], nw1)
        tl.store(dws1 + (HD + j0 + rh)[:, None] * K + rk[None, :], ns1)
        tl.store(dws2 + rv[:, None] * HD + (j0 + rh)[None, :], nw2)
        tl.store(dws2 + (V + rv)[:, None] * HD + (j0 + rh)[None, :], ns2)

    dp1 = dm1 * G
    tl.store(dg_ptr + row * C * C + rc[:, None] * C + rc[None, :], tl.where(lower, dm2 * p2 + dm1 * p1, 0.0))
    dq += tl.dot(dp1, k, input_precision=PREC)
    dk += tl.dot(tl.trans(dp1), q, input_precision=PREC)
    dd2 -= gl[:, None] * r2w + pl[:, None] * r2s + tl.dot(tl.trans(G * p2), do, input_precision=PREC)
    dgl -= tl.sum(d2 * r2w, axis=1)
    dpl -= tl.sum(d2 * r2s, axis=1)
    if NORM:
        # dd2 is now the gradient of the scaled s d2 (through s d1 too: pass I took d1 as a function of d2).
        # rho = |k|^2 |d1|^2 / |d2|^2 + |a1|^2 where s < 1, ds/drho = -s^2; cn = 2 dL/drho / |d2|^2
        g_s = tl.sum(dd2 * d2r, axis=1)
        g_rho = tl.where(sc < 1.0, -g_s * sc * sc, 0.0)
        cn = 2.0 * g_rho / tl.maximum(nd2, 1e-30)
        dd2 = sc[:, None] * dd2 + (cn * na1 - cn / sc)[:, None] * d2r
        dk += (cn * nd1)[:, None] * k
        ce = cn * nk  # rho's gradient along the raw d1 is ce d1: taken back through d1 = (d2 W2a) act'(z1)
        tl.debug_barrier()
        # pass I.5: per tile, that gradient through the error path, and rho's term of a1
        for j0 in range(0, HD, BLOCK_H):
            z1 = tl.load(zs + rc[:, None] * HD + (j0 + rh)[None, :])
            w2a = tl.load(anc2 + rv[:, None] * HD + (j0 + rh)[None, :])
            dact = act_grad(z1, ACT)
            back = tl.dot(d2r, w2a, input_precision=PREC)
            dback = ce[:, None] * back * dact * dact  # ce d1 act'(z1), d1 = back act'(z1)
            dd2 += tl.dot(dback, tl.trans(w2a), input_precision=PREC)
            dw2a = tl.dot(tl.trans(d2r), dback, input_precision=PREC)  # [V, BLOCK_H]
            pz = sdz + rc[:, None] * HD + (j0 + rh)[None, :]
            tl.store(pz, tl.load(pz) + ce[:, None] * back * dact * back * act_grad2(z1, ACT))
            pa = sda + rc[:, None] * HD + (j0 + rh)[None, :]
            tl.store(pa, tl.load(pa) + (cn * nd2)[:, None] * act(z1, ACT))
            if use_a:
                p = da2_ptr + pid * V * HD + rv[:, None] * HD + (j0 + rh)[None, :]
            else:
                p = dws2 + rv[:, None] * HD + (j0 + rh)[None, :]
            tl.store(p, tl.load(p) + dw2a)
    if LOSS == 0:
        dpred = 2.0 * dd2
        dv = -dpred
        if RESIDUAL:
            dk += dpred
    else:
        dpred = tl.zeros((C, V), dtype=ACC)
        dv = -dd2
    tl.debug_barrier()

    # pass II: the keys' forward through the anchor, now that the output error's gradient is complete
    for j0 in range(0, HD, BLOCK_H):
        z1 = tl.load(zs + rc[:, None] * HD + (j0 + rh)[None, :])
        a1 = act(z1, ACT)
        w1a = tl.load(anc1 + (j0 + rh)[:, None] * K + rk[None, :])
        w2a = tl.load(anc2 + rv[:, None] * HD + (j0 + rh)[None, :])
        da1 = tl.load(sda + rc[:, None] * HD + (j0 + rh)[None, :]) + tl.dot(dpred, w2a, input_precision=PREC)
        dz1 = tl.load(sdz + rc[:, None] * HD + (j0 + rh)[None, :]) + da1 * act_grad(z1, ACT)
        dw2a = tl.dot(tl.trans(dpred), a1, input_precision=PREC)  # [V, BLOCK_H]
        dw1a = tl.dot(tl.trans(dz1), k, input_precision=PREC)  # [BLOCK_H, K]
        dk += tl.dot(dz1, w1a, input_precision=PREC)
        if use_a:
            pa2 = da2_ptr + pid * V * HD + rv[:, None] * HD + (j0 + rh)[None, :]
            tl.store(pa2, tl.load(pa2) + dw2a)
            tl.store(da1_ptr + pid * HD * K + (j0 + rh)[:, None] * K + rk[None, :], dw1a)
        else:
            p = dws2 + rv[:, None] * HD + (j0 + rh)[None, :]
            tl.store(p, tl.load(p) + dw2a)
            p = dws1 + (j0 + rh)[:, None] * K + rk[None, :]
            tl.store(p, tl.load(p) + dw1a)
        if HAS_DLAST:
            if c == nc - 1:  # the last chunk's starting W is an output of the forward too
                p = dws1 + (j0 + rh)[:, None] * K + rk[None, :]
                tl.store(p, tl.load(p) + tl.load(dl1_ptr + pid * HD * K + (j0 + rh)[:, None] * K + rk[None, :]))
                p = dws2 + rv[:, None] * HD + (j0 + rh)[None, :]
                tl.store(p, tl.load(p) + tl.load(dl2_ptr + pid * V * HD + rv[:, None] * HD + (j0 + rh)[None, :]))

    tl.store(dq_ptr + row * C * K + rc[:, None] * K + rk[None, :], dq)
    tl.store(dk_ptr + row * C * K + rc[:, None] * K + rk[None, :], dk)
    tl.store(dv_ptr + row * C * V + rc[:, None] * V + rv[None, :], dv)
    tl.store(db_ptr + row * C + rc, db)
    tl.store(df_ptr + row * C + rc, df)
    tl.store(dgl_ptr + row * C + rc, dgl)
    tl.store(dpl_ptr + row * C + rc, dpl)
    tl.store(dbl_ptr + row, dbl)
    tl.store(del_ptr + row, del_)
    tl.store(dfl_ptr + row, dfl)
    tl.debug_barrier()


def _sizes(q, v, WS):
    nc, B, H, C, K = q.shape
    V = v.shape[-1]
    HD = WS[0].shape[-2] // 2
    return nc, B * H, C, K, HD, V


def fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, residual, activation, loss, save,
        normalize: bool = False) -> ScanForward:
    nc, BH, C, K, HD, V = _sizes(q, v, WS)
    acc, dev = b.dtype, q.device
    every = triton_common.CHECKPOINT_EVERY
    ws1, ws2 = (w.to(acc).contiguous().clone() for w in WS)  # the workspace ends as the final state
    o = empty(*q.shape[:-1], V, dtype=acc, device=dev)
    last1 = empty(*WS[0].shape[:2], HD, K, dtype=acc, device=dev)
    last2 = empty(*WS[1].shape[:2], V, HD, dtype=acc, device=dev)
    ncp = -(-nc // every)
    ck1 = empty(ncp, *ws1.shape, dtype=acc, device=dev) if save else ws1
    ck2 = empty(ncp, *ws2.shape, dtype=acc, device=dev) if save else ws2
    zbuf = empty(BH, C, HD, dtype=acc, device=dev)
    a1, a2 = (a.to(acc).contiguous() for a in A) if A is not None else (ws1, ws2)
    opts = launch_opts(activation, loss, acc, HD)
    _fwd_kernel[(BH,)](
        q, k, v, o, b, f, G, bl, el, fl, gl, pl, ws1, ws2, a1, a2, ck1, ck2, last1, last2, zbuf, nc, BH,
        C=C, K=K, HD=HD, V=V, RESIDUAL=residual, NORM=normalize, HAS_A=A is not None, SAVE=save, EVERY=every, **opts,
    )
    # what the backward needs: the checkpoints, and their spacing carried as the length of an empty tensor
    saved = [ck1, ck2, torch.empty(every, 0, device=dev)] if save else None
    return ScanForward(o, [ws1, ws2], [last1, last2], saved)


def bwd(do, dWS, d_last, q, k, v, b, f, G, bl, el, fl, gl, pl, starts, A, *, residual, activation,
        loss, normalize: bool = False) -> ScanGrads:
    ck1, ck2, spacing = starts
    nc, BH, C, K, HD, V = _sizes(q, v, [ck1[0], ck2[0]])
    acc, dev = b.dtype, q.device
    every = spacing.shape[0]
    seg1 = empty(BH, every, *ck1.shape[-2:], dtype=acc, device=dev)
    seg2 = empty(BH, every, *ck2.shape[-2:], dtype=acc, device=dev)

    def owned(g, shape):  # a gradient the kernel may overwrite (zeros for None), in the compute dtype
        return torch.zeros(shape, dtype=acc, device=dev) if g is None else g.to(acc).contiguous().clone()

    dws1, dws2 = owned(dWS[0], ck1.shape[1:]), owned(dWS[1], ck2.shape[1:])  # the carry, in place
    has_dlast = any(g is not None for g in d_last)
    if has_dlast:
        dl1, dl2 = owned(d_last[0], (*ck1.shape[1:3], HD, K)), owned(d_last[1], (*ck2.shape[1:3], V, HD))
    else:
        dl1, dl2 = dws1, dws2  # unread placeholders
    if A is not None:
        a1, a2 = (a.to(acc).contiguous() for a in A)
        da1, da2 = (empty(*a.shape, dtype=acc, device=dev) for a in (a1, a2))
    else:
        a1, a2, da1, da2 = dws1, dws2, dws1, dws2
    scratch = [empty(BH, C, HD, dtype=acc, device=dev) for _ in range(3)]
    dq, dk, dv = (empty(*x.shape, dtype=acc, device=dev) for x in (q, k, v))
    db, df, dG, dbl, del_, dfl, dgl, dpl = (empty(*x.shape, dtype=acc, device=dev) for x in (b, f, G, bl, el, fl, gl, pl))
    opts = launch_opts(activation, loss, acc, HD)
    _bwd_kernel[(BH,)](
        q, k, v, do, b, f, G, bl, el, fl, gl, pl, ck1, ck2, seg1, seg2, a1, a2, dws1, dws2, dl1, dl2, da1, da2,
        *scratch, dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, nc, BH,
        C=C, K=K, HD=HD, V=V, RESIDUAL=residual, NORM=normalize, HAS_A=A is not None, HAS_DLAST=has_dlast,
        EVERY=every, **opts,
    )
    return ScanGrads(dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, [dws1, dws2],
                     [da1, da2] if A is not None else None)
