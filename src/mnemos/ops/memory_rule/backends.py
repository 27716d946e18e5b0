"""The seam between the memory rule's chunked driver and its two chunk-loop backends, and which backend can run a call.

The driver (``chunked.py``) validates a call, lays its tokens out chunk-major, computes the scalar coefficients of
every chunk (differentiated by autograd) and assembles the final :class:`~.common.MemoryState`. The sequential part,
every chunk's anchor forward, dual-form read and state carry and their reverse, is one autograd node per call, from
one of two backends:

- ``torch_scan.py``: :class:`~.torch_scan.TorchChunkScan`, the chunk loop in PyTorch with a hand-written backward
  (every device); on CPU tensors the torch path runs the same node compiled where it covers the call,
  :class:`~.cpu_scan.CpuChunkScan` (``cpu_scan.cpp``, built with the system's C++ compiler on first use);
- ``triton_scan.py``: :class:`~.triton_scan.TritonChunkScan`, the same loop in fused Triton kernels (CUDA; the CPU
  under ``TRITON_INTERPRET=1``), launched per memory depth by ``triton_d1.py`` (matrix memory) and ``triton_d2.py``
  (MLP memory).

Both nodes take and return the same::

    Node.apply(opts, q, k, v, b, f, G, bl, el, fl, gl, pl, *WS, *A) -> (o, *WS_final, *last_anchor)

- ``opts``: ``dict(L=depth, kw=dict(residual=..., activation=..., loss=...))`` (the torch node also takes
  ``normalize`` in ``kw``);
- tokens, chunk-major: q, k ``[nc, B, H, n, K]``, v ``[nc, B, H, n, V]`` (the torch node also takes a key side of
  m = n + window - 1 tokens per chunk, k ``[nc, B, H, m, K]``, v ``[nc, B, H, m, V]``, with G ``[nc, B, H, n, m]`` and
  gl, pl ``[nc, B, H, m]``: the Omega window, driver-side);
- the coefficients of :class:`Coefficients`;
- WS: L states ``[B, H, 2 D_out, D_in]`` at the first chunk's start, ``[W; S]`` stacked (:func:`split_state`);
  A: nothing, or L anchors ``[B, H, D_out, D_in]`` that chunk 0 takes its gradients at instead of its starting W
  (a stream continued mid-chunk);
- outputs: o ``[nc, B, H, n, V]``, the L final states ``[W; S]`` and the memory W at the last chunk's start (the
  anchor of a stream continued from there);
- gradients: a :class:`ScanGrads` (:meth:`ScanGrads.node_grads` puts it in the order of ``apply``'s inputs).

The Triton launchers (``triton_d1`` and ``triton_d2``, one pair per depth) share one signature::

    fwd(q, k, v, b, f, G, bl, el, fl, gl, pl, WS, A, *, residual, activation, loss, save) -> ScanForward
    bwd(do, dWS_final, d_last_anchor, q, k, v, b, f, G, bl, el, fl, gl, pl, starts, A, *, residual, activation,
        loss) -> ScanGrads

with contiguous chunk-major inputs padded to n = C tokens per chunk, WS and A as lists (A None when absent),
``starts`` what :class:`ScanForward` saved, and dWS_final / d_last_anchor entries None where their gradient is zero.
The state and every accumulation are float32 for float32 / bfloat16 inputs and float64 for float64 inputs.

This module imports neither triton nor a backend: the driver and ``dispatch.py`` ask it whether the kernels can run
(:func:`triton_unsupported_reason`) before anything imports them.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .common import MemoryState

HAS_TRITON = importlib.util.find_spec("triton") is not None  # optional: the torch path is the fallback everywhere


# ----------------------------------------------------------------------------------------------------------------------
# the contract of a chunk-loop backend


class Coefficients(NamedTuple):
    """The scalar coefficients a chunk loop reads (``chunked.chunk_coefficients`` per chunk, see its docstring).

    Per token, ``[nc, B, H, n]`` (G ``[nc, B, H, n, n]``): b (decay of the chunk's starting W), f (how much of the
    starting S has flowed into W), G (weight of token j's gradient in W_i). Per chunk, the values at its last real
    token, ``[nc, B, H]``: bl, el, fl; ``[nc, B, H, n]``: gl, pl (rows of G and of the momentum's P).
    """

    b: Tensor
    f: Tensor
    G: Tensor
    bl: Tensor
    el: Tensor
    fl: Tensor
    gl: Tensor
    pl: Tensor


class ScanForward(NamedTuple):
    """What a Triton launcher's forward returns."""

    o: Tensor  # [nc, B, H, C, V]
    WS: list[Tensor]  # L final states [W; S]
    last_start: list[Tensor]  # L tensors: W at the last chunk's start
    saved: list[Tensor] | None  # what the backward needs, opaque to the caller (None unless save)


class ScanGrads(NamedTuple):
    """The gradients of a chunk loop (of one chunk, in the torch backend's per-chunk step), by input.

    dq, dk, dv and the coefficients' gradients have their inputs' shapes; dWS is the gradient of the starting states
    ``[W; S]`` (of the anchor too when chunk 0 takes its gradients at its starting W); dA that of separate anchors
    A, None when there are none. ``del_`` is el's (``del`` is a Python keyword)."""

    dq: Tensor
    dk: Tensor
    dv: Tensor
    db: Tensor
    df: Tensor
    dG: Tensor
    dbl: Tensor
    del_: Tensor
    dfl: Tensor
    dgl: Tensor
    dpl: Tensor
    dWS: list[Tensor]
    dA: list[Tensor] | None

    PER_CHUNK = ("dq", "dk", "dv", "db", "df", "dG", "dbl", "del_", "dfl", "dgl", "dpl")  # a leading chunk dim

    def node_grads(self) -> tuple:
        """The gradients in the order an autograd node's ``apply`` takes its inputs (None for ``opts``)."""
        return (None, *(getattr(self, n) for n in self.PER_CHUNK), *self.dWS, *(self.dA or ()))


def split_state(ws: Tensor) -> tuple[Tensor, Tensor]:
    """``[W; S]`` -> (W, S), views."""
    d_out = ws.shape[-2] // 2
    return ws[..., :d_out, :], ws[..., d_out:, :]


# ----------------------------------------------------------------------------------------------------------------------
# which backend can run a call


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``), for correctness at small shapes."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def auto_opt_out_reason() -> str | None:
    """Why ``impl="auto"`` stays on the torch path whatever the kernels cover: ``MNEMOS_TRITON=0`` in the environment
    (None when it is not set)."""
    if os.environ.get("MNEMOS_TRITON", "1") == "0":
        return "MNEMOS_TRITON=0 keeps impl='auto' on the torch path"
    return None


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def kernel_tile(chunk_size: int) -> int:
    """Token rows of the kernels' chunk tile: the chunk size rounded up to a power of two, at least 16 (``tl.dot``'s
    smallest operand). A chunk of fewer tokens sits at the start of its tile, the rows after it zero, as a partial
    chunk does: padding after every real token of the chunk, so causality keeps it out of their results."""
    return max(16, 1 << (chunk_size - 1).bit_length())


def kernels_unsupported_reason(device: torch.device, dtype: torch.dtype, widths: Sequence[int],
                               chunk_size: int) -> str | None:
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
    if not 1 <= chunk_size <= 64:
        return f"kernels need chunk_size in 1..64, got {chunk_size}"
    if any(not _pow2(w) for w in widths) or max(widths[0], widths[-1]) > 128 or max(widths) > 512:
        return (f"kernels need every memory width to be a power of two >= 16, head dims K, V <= 128 and hidden widths "
                f"<= 512, got {list(widths)}")
    return None


def triton_unsupported_reason(q: Tensor, weights: Sequence[Tensor] | None, initial_state: MemoryState | None,
                              chunk_size: int) -> str | None:
    """Why :func:`~.dispatch.neural_memory_triton` cannot take these inputs (None when it can)."""
    ws = initial_state.weights if initial_state is not None else weights
    if not isinstance(q, Tensor) or q.ndim != 4 or not ws:
        return "malformed inputs"
    widths = [ws[0].shape[-1]] + [w.shape[-2] for w in ws]
    return kernels_unsupported_reason(q.device, q.dtype, widths, chunk_size)
