"""The torch backend's chunk loop compiled for the CPU (``cpu_scan.cpp``), with the torch loop as its fallback.

On CPU tensors the torch path's chunk loop (``torch_scan.py``) spends most of its time in PyTorch's per-op dispatch
and in passes over every row's state, not in arithmetic (docs/PERFORMANCE.md). ``cpu_scan.cpp`` runs the same three
stages and their reverse for a group of (sequence, head) rows at a time, one row per SIMD lane (a group is one vector:
16 float32 / 8 float64 rows on a CPU with AVX-512, 8 / 4 elsewhere), with the group's state kept in cache, and is what
the torch path runs on a CPU whenever it can:

- **built on first use** with the system's C++ compiler (``$CXX``, else ``c++`` / ``g++``; ~5 s), into
  ``$MNEMOS_CACHE_DIR`` (default ``~/.cache/mnemos``) under a name that hashes the source, the flags, the compiler
  and the CPU, and loaded with ctypes: no build step at install and no dependency but a compiler. Its vector width
  is the CPU's: 64 bytes with AVX-512, else 32 (a 64-byte build on an AVX2-only CPU ran 2-7x slower than the 32-byte
  one, slower than the torch loop: docs/PERFORMANCE.md); ``MNEMOS_VECTOR_BYTES`` (16, 32, 64) overrides it;
- **covers** window 1, the losses l2 and dot, the activations gelu and silu, with or without ``normalize_step``,
  float32 and float64, depth <= 8 and chunks <= 256 tokens; anything else, a missing compiler or a failed build runs
  the torch loop (the reason is in :func:`unavailable_reason`, and a failed build warns once);
- **off** with ``MNEMOS_CPU_KERNEL=0`` in the environment or inside ``with cpu_kernel(False):`` (what the tests use to
  compare the two loops).

The same library holds the per-token reads of every token's accumulator in a chunk, the recurrence stepped a block at
a time in cache instead of forming every token's state: Moneta's ``sum A_t^4`` for the torch loop's dual form
(:func:`lq4_rows` / :func:`lq4_rows_backward`, reading the halves of ``[A; S]`` in place; :func:`lq4_norms` is the
same kernel as an autograd node on its own tensors) and Memora's ``softmax(A_t) h_t`` for the dense path
(:func:`kl_row_read`).

The node has the torch loop's contract (``backends.py``) and is exact to it: tests/ops/test_cpu_scan.py compares
outputs, final states and every input's gradient in float64. float32 differs by rounding only (its GELU uses a
1.5e-7 erf), and every kernel reads and writes subnormal floats as zero (flush-to-zero for its own run only: a
decaying memory's tail cost a trained model 2.5x on x86; docs/PERFORMANCE.md, "Subnormal floats"). The node saves its
inputs and nothing per chunk (at most the few states where its backward's segments start, SAVED_BOUNDS_BYTES): its
backward runs each group's forward again, up to 32 chunks at a time, so training holds O(B H state) for a memory layer where the torch loop holds every chunk's state
and activations. That segment's buffers (64 MiB at most, unless one chunk needs more) stay with the calling thread
from one backward to the next instead of being mapped and zeroed afresh each time (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_scan.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread")
# On x86, gcc's tuning for recent Xeons vectorises the auto-vectorised loops (the per-token reads; the scan has explicit
# lanes) 256 bits wide on an AVX-512 CPU unless told otherwise: 512 made Moneta's lq4 read 1.2-1.45x faster forward
# and 1.1-1.35x backward on a Xeon with AVX-512 (docs/PERFORMANCE.md); a CPU without AVX-512 ignores it
X86_FLAGS = ("-mprefer-vector-width=512",)


def _flags() -> tuple[str, ...]:
    """The build's flags: :data:`FLAGS`, and the vector width in bytes when ``MNEMOS_VECTOR_BYTES`` (16, 32 or 64) is
    set; unset, the kernel takes 64 on a CPU with AVX-512 and 32 elsewhere (``cpu_scan.cpp``, "one vector of lanes")."""
    flags = FLAGS + (X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386") else ())
    width = os.environ.get("MNEMOS_VECTOR_BYTES", "").strip()
    if not width:
        return flags
    if width not in ("16", "32", "64"):
        raise ValueError(f"MNEMOS_VECTOR_BYTES must be 16, 32 or 64, got {width!r}")
    return (*flags, f"-DMNEMOS_VECTOR_BYTES={width}")


ACTIVATIONS = {"gelu": 0, "silu": 1}
LOSSES = {"l2": 0, "dot": 1}
MAX_DEPTH, MAX_CHUNK = 8, 256
# At chunks of 16 or more the torch loop's big products run near the machine's matmul rate and the compiled loop's
# passes over a group's state leave the L2: above this many bytes of state per real row's share of a group, the torch
# loop is at least as fast (measured, one thread: head dim 64, expansion 4, chunk 16, 4 MiB per group, all 16 lanes
# filled: compiled 1.13x faster; 8 rows in a group of 16: 0.72x, on an AVX-512 CPU; on an AVX2 one, groups of 8
# rows: 2 MiB at chunk 16 about even, 1.01-1.05x; docs/PERFORMANCE.md)
GROUP_STATE_LIMIT = 4 << 20

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_lanes: dict[torch.dtype, int] = {}  # rows per vector, as the loaded library was built
_reason: str | None = None  # why the library is unavailable (None: not tried yet, or loaded)
_tried = False
_enabled = [os.environ.get("MNEMOS_CPU_KERNEL", "1") != "0"]


@contextlib.contextmanager
def cpu_kernel(enabled: bool):
    """Within the block the torch path runs its chunk loop compiled (True, where it can) or in PyTorch (False)."""
    _enabled.append(bool(enabled))
    try:
        yield
    finally:
        _enabled.pop()


def _cache_dir() -> Path:
    root = os.environ.get("MNEMOS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mnemos")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build(cxx: str) -> Path:
    """Compile the source into the cache (once per source, flags, compiler and CPU); returns the library's path."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = _flags()
    key = hashlib.sha256("\0".join((SOURCE.read_text(), " ".join(flags), version, _cpu_id())).encode()).hexdigest()
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "mnemos-kernels"):
        target = directory / f"cpu_scan-{key[:16]}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        tmp = directory / f".cpu_scan-{key[:16]}-{os.getpid()}-{threading.get_ident()}.so"
        result = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders (test workers) each write their own file first
        return target
    raise RuntimeError(f"no writable directory for the compiled kernel ({_cache_dir()} or the temp dir)")


def library() -> ctypes.CDLL | None:
    """The compiled loop, built and loaded on first call; None where it cannot be (see :func:`unavailable_reason`)."""
    global _library, _reason, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        try:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
            lib = ctypes.CDLL(str(_build(cxx)))
            for name in ("mnemos_lanes_f32", "mnemos_lanes_f64"):
                fn = getattr(lib, name)
                fn.argtypes = (ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
                fn.restype = None
            for name in ("mnemos_scan_forward_f32", "mnemos_scan_forward_f64", "mnemos_scan_backward_f32",
                         "mnemos_scan_backward_f64", "mnemos_lq4_forward_f32", "mnemos_lq4_forward_f64",
                         "mnemos_lq4_backward_f32", "mnemos_lq4_backward_f64", "mnemos_kl_row_forward_f32",
                         "mnemos_kl_row_forward_f64", "mnemos_kl_row_backward_f32", "mnemos_kl_row_backward_f64"):
                fn = getattr(lib, name)
                fn.argtypes = (ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p))
                fn.restype = ctypes.c_int
            for name in ("mnemos_scan_bounds_f32", "mnemos_scan_bounds_f64"):
                fn = getattr(lib, name)
                fn.argtypes = (ctypes.POINTER(ctypes.c_int64),)
                fn.restype = ctypes.c_int64
            for dtype in (torch.float32, torch.float64):  # the layout this module writes is the one the kernel reads
                _lanes[dtype] = getattr(lib, f"mnemos_scan_lanes_{'f64' if dtype == torch.float64 else 'f32'}")()
            _library = lib
        except Exception as exc:  # a missing or failing compiler must never stop the torch path
            _reason = f"the compiled CPU loop could not be built: {exc}"
            warnings.warn(f"mnemos: {_reason}; the memory rule runs its PyTorch loop", RuntimeWarning, stacklevel=3)
        _tried = True
    return _library


def unavailable_reason() -> str | None:
    """Why the compiled loop is not in use (None when it is): switched off, or its build failed."""
    if not _enabled[-1]:
        return "switched off (MNEMOS_CPU_KERNEL=0 or cpu_kernel(False))"
    library()
    return _reason


def unsupported_reason(device: torch.device, dtype: torch.dtype, depth: int, n: int, opts: dict,
                       window: bool, delta: bool, rows: int = 0, state: int = 0) -> str | None:
    """Why the compiled loop cannot, or should not, run a chunk run of the torch path (None when it can). ``opts``: the
    torch loop's options (residual, activation, loss, normalize; lp's p is not covered); ``rows``: batch x heads;
    ``state``: the elements of one row's ``[W; S]`` over all layers (0: not known, no speed rule)."""
    if device.type != "cpu":
        return f"it runs on the CPU; the inputs are on {device}"
    if dtype not in (torch.float32, torch.float64):
        return f"it takes float32 or float64, got {dtype}"
    if opts.get("loss") not in LOSSES:
        return f"it covers the losses {tuple(LOSSES)}, got {opts.get('loss')!r}"
    if opts.get("activation") not in ACTIVATIONS:
        return f"it covers the activations {tuple(ACTIVATIONS)}, got {opts.get('activation')!r}"
    if window or delta:
        return "an Omega window or huber's thresholds run in the torch loop"
    if opts.get("lq"):
        return "Moneta's lq retention runs in the torch loop"
    if depth > MAX_DEPTH or n > MAX_CHUNK:
        return f"it covers depth <= {MAX_DEPTH} and chunks <= {MAX_CHUNK} tokens, got depth {depth}, chunk {n}"
    if n >= 16 and rows > 0 and state > 0:
        width = lanes(dtype)
        fill = rows / (-(-rows // width) * width)  # the share of the groups' lanes that hold a real row
        group_bytes = width * state * dtype.itemsize
        if group_bytes / fill > GROUP_STATE_LIMIT:
            return (f"at chunk {n}, a group state of {group_bytes / 2**20:.1f} MiB over {fill:.0%} of its lanes runs "
                    "faster in the torch loop (docs/PERFORMANCE.md, 'The compiled CPU loop')")
    return unavailable_reason()


# ----------------------------------------------------------------------------------------------------------------------
# calls


def lanes(dtype: torch.dtype) -> int:
    """Rows per SIMD vector (the kernel's group), as the library was built: 16 float32 / 8 float64 on a CPU with
    AVX-512, 8 / 4 elsewhere (``MNEMOS_VECTOR_BYTES`` overrides). Builds the library if it was not yet; 16 / 8 where it
    cannot be built (nothing is laid out then)."""
    library()
    return _lanes.get(dtype, 8 if dtype == torch.float64 else 16)


def _spec(nc: int, n: int, groups: int, dims: Sequence[int], opts: dict, has_A: bool) -> ctypes.Array:
    raw = [len(dims) - 1, n, nc, groups, int(opts["residual"]), ACTIVATIONS[opts["activation"]], LOSSES[opts["loss"]],
           int(has_A), torch.get_num_threads(), int(bool(opts.get("normalize"))), *dims]
    return (ctypes.c_int64 * len(raw))(*raw)


def _lanes_copy(src: Tensor, dst: Tensor, outer: int, rows: int, inner: int, width: int, forward: bool) -> Tensor:
    fn = getattr(library(), f"mnemos_lanes_{'f64' if src.dtype == torch.float64 else 'f32'}")
    fn((ctypes.c_int64 * 4)(outer, rows, inner, width), src.data_ptr(), dst.data_ptr(), int(forward))
    return dst


def to_lanes(x: Tensor, lead: int, width: int) -> Tensor:
    """``[*lead dims, rows, *rest]`` -> ``[*lead dims, groups, *rest, width]``: rows padded with zeros to whole groups
    of ``width``, each group's rows innermost (the kernel's layout). A new tensor, transposed by the library (PyTorch's
    copy of that permutation is ~8x slower than a plain copy)."""
    rows, groups = x.shape[lead], -(-x.shape[lead] // width)
    x = x.contiguous()
    dst = x.new_empty(*x.shape[:lead], groups, *x.shape[lead + 1:], width)
    return _lanes_copy(x, dst, math.prod(x.shape[:lead]), rows, math.prod(x.shape[lead + 1:]), width, True)


def from_lanes(x: Tensor, lead: int, rows: int) -> Tensor:
    """The reverse of :func:`to_lanes` (x contiguous), the padding rows dropped: a new tensor."""
    dst = x.new_empty(*x.shape[:lead], rows, *x.shape[lead + 1:-1])
    return _lanes_copy(x, dst, math.prod(x.shape[:lead]), rows, math.prod(x.shape[lead + 1:-1]), x.shape[-1], False)


def _pointers(tensors: Sequence[Tensor | None], aligned: bool = True, strided: Sequence[int] = ()) -> ctypes.Array:
    """The tensors' data pointers; each contiguous (but those at the positions ``strided``, whose layout the caller
    checked) and, with ``aligned``, 64-byte aligned."""
    for i, t in enumerate(tensors):
        assert t is None or ((i in strided or t.is_contiguous()) and (not aligned or t.data_ptr() % 64 == 0))
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


def _call(name: str, dtype: torch.dtype, spec, ptrs) -> None:
    lib = library()
    fn = getattr(lib, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")
    code = fn(spec, ptrs)
    if code == 2:
        raise MemoryError(f"the compiled CPU loop could not allocate its scratch (spec {list(spec)}); "
                          "MNEMOS_CPU_KERNEL=0 runs the PyTorch loop")
    if code != 0:
        raise RuntimeError(f"the compiled CPU loop rejected its inputs: {list(spec)}")


class _Layout:
    """A call's shapes and its tensors' conversions to and from the kernel's lanes. Tokens and coefficients are
    chunk-major ``[nc, B, H, ...]``, states ``[B, H, ...]``."""

    def __init__(self, q_shape: Sequence[int], dtype: torch.dtype, dims: Sequence[int]):
        self.nc, self.B, self.H, self.n, _ = q_shape
        self.rows = self.B * self.H
        self.width = lanes(dtype)
        self.groups = -(-self.rows // self.width)
        self.dims = list(dims)  # the memory's widths K, hidden..., V

    def chunked(self, x: Tensor) -> Tensor:  # [nc, B, H, ...] -> lanes
        return to_lanes(x.reshape(self.nc, self.rows, *x.shape[3:]), 1, self.width)

    def state(self, x: Tensor) -> Tensor:  # [B, H, ...] -> lanes
        return to_lanes(x.reshape(self.rows, *x.shape[2:]), 0, self.width)

    def chunked_back(self, x: Tensor) -> Tensor:
        y = from_lanes(x, 1, self.rows)
        return y.reshape(self.nc, self.B, self.H, *y.shape[2:])

    def state_back(self, x: Tensor) -> Tensor:
        y = from_lanes(x, 0, self.rows)
        return y.reshape(self.B, self.H, *y.shape[1:])

    def spec(self, opts: dict, has_A: bool):
        return _spec(self.nc, self.n, self.groups, self.dims, opts, has_A)


# The most bytes of segment-start states a training forward keeps for its backward (cpu_scan.cpp, scan_backward), per
# call (one memory layer's forward; held until its backward): with them the backward runs the forward once (a segment
# at a time) instead of twice, 8-17% of the op's fwd+bwd at the LM preset's memory shapes (docs/PERFORMANCE.md); over
# it the backward finds them itself. The backward's own per-thread buffers are as large (kSegmentBytes).
SAVED_BOUNDS_BYTES = 64 << 20


def forward(inputs: Sequence[Tensor], WS: Sequence[Tensor], A: Sequence[Tensor] | None, opts: dict, *,
            save: bool) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor] | None]:
    """Every chunk in order (``torch_scan.scan``). ``inputs``: q k v b f G bl el fl gl pl, chunk-major; WS: the L
    starting ``[W; S]`` (not modified); A: chunk 0's anchors or None. Returns o, the final states, the memory W at the
    last chunk's start and, with ``save``, what :class:`CpuChunkScan`'s backward reads, in lanes: the inputs, the
    starting states, the anchors and, where the backward runs in several segments and they fit in
    ``SAVED_BOUNDS_BYTES``, the states at the segments' starts (the backward runs each segment's forward again)."""
    lay = _Layout(inputs[0].shape, inputs[0].dtype, [inputs[0].shape[-1]] + [t.shape[-2] // 2 for t in WS])
    x = [lay.chunked(t) for t in inputs]
    ws0 = [lay.state(t) for t in WS]
    ws = [t.clone() for t in ws0] if save else ws0  # the kernel steps these to the final states in place
    a = None if A is None else [lay.state(t) for t in A]
    dt, nc, G = x[0].dtype, lay.nc, lay.groups
    o = x[0].new_empty(nc, G, lay.n, lay.dims[-1], lay.width)
    last = [x[0].new_empty(G, lay.dims[i + 1], lay.dims[i], lay.width) for i in range(len(ws))]
    L = len(ws)
    spec = lay.spec(opts, A is not None)
    bounds = None
    if save:
        size = getattr(library(), f"mnemos_scan_bounds_{'f64' if dt == torch.float64 else 'f32'}")(spec)
        if 0 < G * size * lay.width * x[0].element_size() <= SAVED_BOUNDS_BYTES:
            bounds = x[0].new_empty(G, size, lay.width)
    ptrs = _pointers([*x, o, *ws, *(a or [None] * L), *last, bounds])
    _call("mnemos_scan_forward", dt, spec, ptrs)
    saved = [*x, *ws0, *(a or ()), *(() if bounds is None else (bounds,))] if save else None
    return lay.chunked_back(o), [lay.state_back(t) for t in ws], [lay.state_back(t) for t in last], saved


class CpuChunkScan(torch.autograd.Function):
    """The compiled chunk loop as one autograd node, with ``torch_scan.TorchChunkScan``'s contract (``backends.py``):
    ``apply(opts, q, k, v, b, f, G, bl, el, fl, gl, pl, *WS, *A) -> (o, *WS_final, *last_anchor)``. Saves its inputs
    only (in lanes) and, where they fit, the states at the backward's segment starts; the backward runs each group's
    forward again, a segment (up to 32 chunks) at a time."""

    @staticmethod
    def forward(ctx, opts: dict, q, k, v, b, f, G, bl, el, fl, gl, pl, *states):
        L = opts["L"]
        inputs = (q, k, v, b, f, G, bl, el, fl, gl, pl)
        WS, A = list(states[:L]), (list(states[L:]) or None)
        o, WS_out, last, saved = forward(inputs, WS, A, opts["kw"], save=True)
        ctx.opts, ctx.has_A = opts, A is not None
        ctx.has_bounds = len(saved) > 11 + L * (2 if A is not None else 1)
        ctx.dims = [q.shape[-1]] + [t.shape[-2] // 2 for t in WS]
        ctx.q_shape = q.shape
        ctx.save_for_backward(*saved)  # in lanes: converted once
        return (o, *WS_out, *last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, *grads):
        L, kw = ctx.opts["L"], ctx.opts["kw"]
        saved = ctx.saved_tensors
        x, ws0 = list(saved[:11]), list(saved[11:11 + L])
        a = list(saved[11 + L:11 + 2 * L]) if ctx.has_A else None
        bounds = saved[-1] if ctx.has_bounds else None
        lay = _Layout(ctx.q_shape, x[0].dtype, ctx.dims)
        if do is None:
            do = x[0].new_zeros(*ctx.q_shape[:-1], lay.dims[-1])
        do = lay.chunked(do)  # held here: the kernel reads it through a raw pointer
        carry = [lay.state(x[0].new_zeros(lay.B, lay.H, 2 * o, i) if g is None else g)  # new: the kernel writes it
                 for o, i, g in zip(lay.dims[1:], lay.dims[:-1], grads[:L], strict=True)]
        dlast = [None if g is None else lay.state(g) for g in grads[L:]]
        outs = [torch.empty_like(t) for t in x]  # dq dk dv db df dG dbl del dfl dgl dpl, in lanes
        dA = None if a is None else [torch.empty_like(t) for t in a]
        ptrs = _pointers([*x, do, *outs, *carry, *(dlast or [None] * L), *ws0, *(a or [None] * L),
                          *(dA or [None] * L), bounds])
        _call("mnemos_scan_backward", x[0].dtype, lay.spec(kw, a is not None), ptrs)
        grads_in = [lay.chunked_back(t) for t in outs]
        dWS = [lay.state_back(t) for t in carry]
        dA = None if dA is None else [lay.state_back(t) for t in dA]
        return (None, *grads_in, *dWS, *(dA or ()))


def scan(inputs: Sequence[Tensor], WS: Sequence[Tensor], A: Sequence[Tensor] | None, opts: dict, L: int):
    """The chunk loop of a torch-path run (``chunked._run_torch``): the autograd node when a gradient is wanted, else
    the forward alone. Returns o ``[nc, B, H, n, V]``, the final states and the last chunk's starting memory W."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *WS, *(A or ()))):
        o, *rest = CpuChunkScan.apply(dict(L=L, kw=opts), *inputs, *WS, *(A or ()))
        return o, list(rest[:L]), list(rest[L:])
    o, WS_out, last, _ = forward(inputs, WS, A, opts, save=False)
    return o, WS_out, last


# ----------------------------------------------------------------------------------------------------------------------
# the per-token reads of Moneta and Memora for dense_scan.py


def state_reads_unsupported_reason(x: Tensor) -> str | None:
    """Why :func:`lq4_norms` and :func:`kl_row_read` cannot take a call on tensors like x (None when they can)."""
    if x.device.type != "cpu":
        return f"it runs on the CPU; the inputs are on {x.device}"
    if x.dtype not in (torch.float32, torch.float64):
        return f"it takes float32 or float64, got {x.dtype}"
    return unavailable_reason()


class _StateRead(torch.autograd.Function):
    """A read of every token's accumulator in a chunk, the accumulators never formed (``cpu_scan.cpp``, "Every
    token's state of a chunk, read without being formed"). ``apply(name, A0, S0, d, a, beta, eta, Wb, *extra)``:
    A0, S0 ``[B, H, P, Q]`` the chunk's starting accumulator and momentum, d ``[B, H, m, P]`` and a ``[B, H, m, Q]``
    the factors of the key-side tokens' gradients (``U_e = d_e a_e^T``), beta = 1 - alpha and eta ``[B, H, n]``,
    Wb ``[B, H, n, w]`` the weight of key-side token t + k in token t's write (theta_t gamma_{t+k}; m = n + w - 1),
    with ``S_t = eta_t S_{t-1} - sum_k Wb[t, k] U_{t+k}`` and ``A_t = beta_t A_{t-1} + S_t``; ``extra``: the read's
    own inputs. name ``"lq4"``: ``N_t = sum A_t^4`` ``[B, H, n]``; ``"kl_row"`` (extra: h ``[B, H, n, Q]``):
    ``(y, A_n, S_n)``, ``y_t = softmax(A_t, rows) h_t`` ``[B, H, n, P]`` and the accumulator and momentum after the
    chunk's last token (its backward also takes y and each row's max and 1 / sum of exps, kept from the forward)."""

    @staticmethod
    def forward(ctx, name, A0, S0, d, a, beta, eta, Wb, *extra):
        xs = [t.contiguous() for t in (A0, S0, d, a, beta, eta, Wb, *extra)]
        outs = state_read_forward(name, xs)
        ctx.name, ctx.n_in = name, len(xs)
        if name == "lq4":
            ctx.save_for_backward(*xs)
            return outs[0]
        y, stats, A_n, S_n = outs
        ctx.save_for_backward(*xs, y, stats)
        return y, A_n, S_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        return (None, *state_read_backward(ctx.name, saved[:ctx.n_in], grads, saved[ctx.n_in:]))


def state_read_forward(name: str, xs: Sequence[Tensor], rs: int | None = None) -> list[Tensor]:
    """:class:`_StateRead`'s forward without autograd: ``xs = (A0, S0, d, a, beta, eta, Wb, *extra)``, contiguous, but
    A0 and S0 may have their rows ``rs`` elements apart (:func:`_row_stride`; lq4 only). Returns ``[N]`` (lq4) or
    ``[y, stats, A_n, S_n]`` (kl_row; stats ``[B, H, 2, n, P]``: each row's max and 1 / sum of exps, for the
    backward)."""
    A0, Wb = xs[0], xs[6]
    B, H, P, Q = A0.shape
    n = Wb.shape[2]
    if name == "lq4":
        outs = [A0.new_empty(B, H, n)]
    else:
        outs = [A0.new_empty(B, H, n, P), A0.new_empty(B, H, 2, n, P), A0.new_empty(B, H, P, Q),
                A0.new_empty(B, H, P, Q)]
    _call(f"mnemos_{name}_forward", A0.dtype, _recur_spec(A0, Wb, rs),
          _pointers([*xs, *outs], aligned=False, strided=(0, 1) if rs is not None else ()))
    return outs


def state_read_backward(name: str, xs: Sequence[Tensor], grads: Sequence[Tensor],
                        kept: Sequence[Tensor] = ()) -> list[Tensor]:
    """:class:`_StateRead`'s backward without autograd: the gradients of ``xs`` (contiguous, as given to
    :func:`state_read_forward`) for the outputs' gradients ``grads`` (lq4: ``(gN,)``; kl_row: ``(gy, gA_n, gS_n)``;
    autograd passes zeros for an output that took none), in the order of xs. ``kept``: kl_row's ``(y, stats)`` from the forward."""
    outs = [torch.empty_like(t) for t in xs]
    grads = [g.contiguous() for g in grads]  # held here: the kernel reads them by pointer
    _call(f"mnemos_{name}_backward", xs[0].dtype, _recur_spec(xs[0], xs[6]),
          _pointers([*xs, *kept, *grads, *outs], aligned=False))
    return outs


def _row_stride(A0: Tensor, S0: Tensor) -> int | None:
    """The elements from one (sequence, head) row's matrix to the next when A0 and S0 ``[B, H, P, Q]`` are laid out
    alike, each matrix contiguous, the rows at one step (contiguous tensors, or the halves of ``[A; S]``); else None."""
    B, H, P, Q = A0.shape
    st = A0.stride()
    if S0.stride() != st or st[3] != 1 or st[2] != Q:
        return None
    if B > 1 and H > 1 and st[0] != H * st[1]:
        return None
    rs = st[1] if H > 1 else (st[0] if B > 1 else P * Q)
    return rs if rs >= P * Q else None


def lq4_rows(A0: Tensor, S0: Tensor, d: Tensor, a: Tensor, beta: Tensor, eta: Tensor, Wb: Tensor) -> Tensor:
    """Moneta's ``N_t = sum(A_t ** 4)`` ``[B, H, n]`` like :func:`lq4_norms`, without autograd, A0 and S0 read where
    they lie (the halves of the torch loop's ``[A; S]``: :func:`_row_stride`) instead of copied."""
    rs = _row_stride(A0, S0)
    if rs is None:
        A0, S0 = A0.contiguous(), S0.contiguous()
    return state_read_forward("lq4", [A0, S0, *(t.contiguous() for t in (d, a, beta, eta, Wb))], rs)[0]


def lq4_rows_backward(A0: Tensor, S0: Tensor, d: Tensor, a: Tensor, beta: Tensor, eta: Tensor, Wb: Tensor,
                      gN: Tensor, dA0: Tensor, dS0: Tensor) -> list[Tensor]:
    """The backward of :func:`lq4_rows` for ``gN`` ``[B, H, n]``: adds the gradients of A0 and S0 into dA0 and dS0
    (laid out like A0 and S0, e.g. the halves of the state gradient ``[dA; dS]``; copies added back where they are not
    :func:`_row_stride`-compatible) and returns those of ``(d, a, beta, eta, Wb)``."""
    rs = _row_stride(A0, S0)
    direct = rs is not None and _row_stride(dA0, dS0) == rs
    if not direct:
        A0, S0 = A0.contiguous(), S0.contiguous()
        rs = A0.shape[-2] * A0.shape[-1]
        gA, gS = torch.zeros_like(A0), torch.zeros_like(S0)
    else:
        gA, gS = dA0, dS0
    rest = [t.contiguous() for t in (d, a, beta, eta, Wb)]
    outs = [torch.empty_like(t) for t in rest]
    gN = gN.contiguous()  # held here: the kernel reads it through a raw pointer
    _call("mnemos_lq4_backward", A0.dtype, _recur_spec(A0, Wb, rs, accumulate=True),
          _pointers([A0, S0, *rest, gN, gA, gS, *outs], aligned=False, strided=(0, 1, 8, 9)))
    if not direct:
        dA0 += gA
        dS0 += gS
    return outs


def _recur_spec(A0: Tensor, Wb: Tensor, rs: int | None = None, accumulate: bool = False) -> ctypes.Array:
    """``cpu_scan.cpp``'s RecurSpec: rows, n, w, P, Q, threads, the rows' step in A0 / S0 (rs; contiguous: P Q) and
    whether lq4's backward adds dA0 / dS0 into tensors laid out like them."""
    B, H, P, Q = A0.shape
    raw = [B * H, Wb.shape[2], Wb.shape[3], P, Q, torch.get_num_threads(), P * Q if rs is None else rs,
           int(accumulate)]
    return (ctypes.c_int64 * len(raw))(*raw)


def lq4_norms(A0: Tensor, S0: Tensor, d: Tensor, a: Tensor, beta: Tensor, eta: Tensor, Wb: Tensor) -> Tensor:
    """Moneta's ``N_t = sum(A_t ** 4)`` ``[B, H, n]`` of every token's accumulator in a chunk (:class:`_StateRead`;
    inputs in one dtype on the CPU: :func:`state_reads_unsupported_reason` says when not)."""
    return _StateRead.apply("lq4", A0, S0, d, a, beta, eta, Wb)


def kl_row_read(A0: Tensor, S0: Tensor, d: Tensor, a: Tensor, beta: Tensor, eta: Tensor, Wb: Tensor,
                h: Tensor, *, final: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Memora's read ``y_t = softmax(A_t) h_t`` (softmax over each row of A_t) ``[B, H, n, P]`` of every token's
    accumulator in a chunk at its own input h ``[B, H, n, Q]`` (:class:`_StateRead`); with ``final``, ``(y, A_n,
    S_n)``: also the accumulator and momentum after the chunk's last token ``[B, H, P, Q]`` (the kernel steps them
    anyway; their gradients enter its backward)."""
    y, A_n, S_n = _StateRead.apply("kl_row", A0, S0, d, a, beta, eta, Wb, h)
    return (y, A_n, S_n) if final else y


__all__ = ["CpuChunkScan", "cpu_kernel", "forward", "kl_row_read", "library", "lq4_norms", "lq4_rows",
           "lq4_rows_backward", "scan", "state_read_backward", "state_read_forward", "state_reads_unsupported_reason",
           "unavailable_reason", "unsupported_reason"]
