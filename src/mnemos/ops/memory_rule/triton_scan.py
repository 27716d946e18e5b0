"""The chunk loop of the memory rule as fused Triton kernels (CUDA; the CPU under ``TRITON_INTERPRET=1``): the Triton
backend of the chunked driver.

Same contract as ``torch_scan.TorchChunkScan`` (``backends.py``): the chunk layout, the scalar coefficients (b, f, G
and the rows bl, el, fl, gl, pl at each chunk's last real token) and the state assembly stay in ``chunked.py`` and
are differentiated by autograd; only the sequential part, every chunk's anchor forward, dual-form read and state carry
and their reverse, runs in the kernels. One program per (batch, head) walks the chunks in order (the chunk-to-chunk
dependency stays inside the kernel, not in a Python loop) with the state ``[W; S]`` in a float32 workspace.

Kernels per depth, each with a ``fwd`` / ``bwd`` launcher pair of the signature in ``backends.py``: ``triton_d1.py``
(matrix memory) and ``triton_d2.py`` (MLP memory, hidden width tiled). Their ``saved`` is every chunk's starting
``[W; S]`` (depth 1) or checkpoints every few chunks (depth 2).

Imports triton: the driver imports this module only once the kernels are asked for (``backends`` says whether they
can run without importing it).
"""

from __future__ import annotations

import torch

from . import triton_d1, triton_d2
from .backends import Coefficients, ScanForward, ScanGrads


def _launchers(depth: int):
    mod = triton_d1 if depth == 1 else triton_d2
    return mod.fwd, mod.bwd


class TritonChunkScan(torch.autograd.Function):
    """``torch_scan.TorchChunkScan`` with the chunk loop in Triton kernels: same inputs, outputs and gradients."""

    @staticmethod
    def forward(ctx, opts: dict, q, k, v, b, f, G, bl, el, fl, gl, pl, *states):
        L = opts["L"]
        WS, A = list(states[:L]), (list(states[L:]) or None)
        fwd, _ = _launchers(L)
        save = any(ctx.needs_input_grad)
        out: ScanForward = fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, save=save, **opts["kw"])
        if save:
            ctx.save_for_backward(q, k, v, b, f, G, bl, el, fl, gl, pl, *out.saved, *(A or ()))
        ctx.opts, ctx.has_A, ctx.n_saved = opts, A is not None, len(out.saved) if save else 0
        return (out.o, *out.WS, *out.last_start)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, *grads):
        L = ctx.opts["L"]
        _, bwd = _launchers(L)
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        coef = Coefficients(*saved[3:11])
        starts = list(saved[11 : 11 + ctx.n_saved])
        A = list(saved[11 + ctx.n_saved :]) if ctx.has_A else None
        out: ScanGrads = bwd(do.contiguous(), list(grads[:L]), list(grads[L:]), q, k, v, *coef, starts, A,
                             **ctx.opts["kw"])
        return out.node_grads()


def scan_forward_only(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, L: int, **kw):
    """The kernels' forward without saving anything (no_grad / inference): (o, final WS, last chunk's start)."""
    fwd, _ = _launchers(L)
    out: ScanForward = fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, save=False, **kw)
    return out.o, out.WS, out.last_start
