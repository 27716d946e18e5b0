"""The chunk loop of the memory rule as fused Triton kernels (CUDA; the CPU under ``TRITON_INTERPRET=1``).

Same contract as ``chunked._ChunkScan``: the chunk layout, the scalar coefficients (b, f, G and the rows bl, el, fl,
gl, pl at each chunk's last real token) and the state assembly stay in ``chunked.py`` and are differentiated by
autograd; only the sequential part, every chunk's anchor forward, dual-form read and state carry and their reverse,
runs in the kernels. One program per (batch, head) walks the chunks in order (the chunk-to-chunk dependency stays
inside the kernel, not in a Python loop) with the state ``[W; S]`` in a float32 workspace.

Kernels per depth: ``triton_d1.py`` (matrix memory) and ``triton_d2.py`` (MLP memory, hidden width tiled). Both
launchers share one contract:

    fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, residual, activation, loss, save)
        -> (o, WS_final, last_start, starts)
    bwd(do, dWS_final, d_last_anchor, q, k, v, b, f, G, bl, el, fl, gl, pl, starts, A, *, residual, activation, loss)
        -> (dq, dk, dv, db, df, dG, dbl, del, dfl, dgl, dpl, dWS0, dA)

with chunk-major contiguous tensors: q, k ``[nc, B, H, C, K]``, v ``[nc, B, H, C, V]``, b, f ``[nc, B, H, C]``,
G ``[nc, B, H, C, C]``, bl, el, fl ``[nc, B, H]``, gl, pl ``[nc, B, H, C]``; WS a list of L states
``[B, H, 2 D_out, D_in]`` (``[W; S]`` stacked), A None or a list of L anchors ``[B, H, D_out, D_in]`` used by chunk
0 instead of its starting W. ``starts`` is what the backward needs, a list of tensors opaque to the caller (None
unless ``save``): every chunk's starting ``[W; S]`` (depth 1) or checkpoints every few chunks (depth 2);
``last_start`` the last chunk's starting W per layer. d_last_anchor / dWS_final entries may be None (zero). Gradients come back in the inputs' layouts (dA None when A is None). The state and every accumulation
are float32 for float32/bfloat16 inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None  # optional: the torch path is the fallback everywhere


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``), for correctness at small shapes."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def unsupported_reason(device: torch.device, dtype: torch.dtype, widths: Sequence[int], chunk_size: int) -> str | None:
    """Why the kernels cannot run this config (None when they can). ``widths``: the memory's layer widths
    ``[K, hidden..., V]``."""
    if not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if device.type != "cuda" and not interpreting():
        return f"the kernels run on CUDA (or on the CPU with TRITON_INTERPRET=1); the inputs are on {device}"
    if device.type == "cuda" and interpreting():
        return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
    depth = len(widths) - 1
    if depth not in (1, 2):
        return f"kernels exist for memory depth 1 and 2, got depth {depth}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) and not (dtype == torch.float64 and interpreting()):
        return f"kernels take float32, bfloat16 or float16 inputs (float64 only under TRITON_INTERPRET=1), got {dtype}"
    if not _pow2(chunk_size) or chunk_size > 64:
        return f"kernels need chunk_size in (16, 32, 64), got {chunk_size}"
    if any(not _pow2(w) for w in widths) or max(widths[0], widths[-1]) > 128 or max(widths) > 512:
        return (f"kernels need every memory width to be a power of two >= 16, head dims K, V <= 128 and hidden widths "
                f"<= 512, got {list(widths)}")
    return None


def _launchers(depth: int):
    if depth == 1:
        from . import triton_d1 as mod
    else:
        from . import triton_d2 as mod
    return mod.fwd, mod.bwd


class TritonChunkScan(torch.autograd.Function):
    """``chunked._ChunkScan`` with the chunk loop in Triton kernels: same inputs, outputs and gradients."""

    @staticmethod
    def forward(ctx, opts: dict, q, k, v, b, f, G, bl, el, fl, gl, pl, *states):
        L = opts["L"]
        WS, A = list(states[:L]), (list(states[L:]) or None)
        fwd, _ = _launchers(L)
        save = any(ctx.needs_input_grad)
        o, WS_out, last_start, starts = fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, save=save, **opts["kw"])
        if save:
            ctx.save_for_backward(q, k, v, b, f, G, bl, el, fl, gl, pl, *starts, *(A or ()))
        ctx.opts, ctx.has_A, ctx.n_saved = opts, A is not None, len(starts) if save else 0
        return (o, *WS_out, *last_start)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, *grads):
        L = ctx.opts["L"]
        _, bwd = _launchers(L)
        saved = ctx.saved_tensors
        q, k, v, b, f, G, bl, el, fl, gl, pl = saved[:11]
        starts = list(saved[11 : 11 + ctx.n_saved])
        A = list(saved[11 + ctx.n_saved :]) if ctx.has_A else None
        out = bwd(do.contiguous(), list(grads[:L]), list(grads[L:]), q, k, v, b, f, G, bl, el, fl, gl, pl, starts, A,
                  **ctx.opts["kw"])
        dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, dWS0, dA = out
        return (None, dq, dk, dv, db, df, dG, dbl, del_, dfl, dgl, dpl, *dWS0, *(dA or ()))


def scan_forward_only(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, L: int, **kw):
    """The kernels' forward without saving anything (no_grad / inference)."""
    fwd, _ = _launchers(L)
    o, WS_out, last_start, _ = fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, save=False, **kw)
    return o, WS_out, last_start
