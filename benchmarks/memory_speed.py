"""Wall time and peak memory of the Titans neural-memory layer: mnemos vs titans-pytorch (lucidrains), side by side.

Rows (the registry ``IMPLS`` below), all at one shape ``x [B, T, dim]`` with H heads of D, an MLP memory of depth L
and hidden width E * D, chunk size C:

    mnemos          mnemos.layers.NeuralMemory(dim, heads=H, head_dim=D, depth=L, expansion=E, chunk_size=C)
                    gradients anchored at the end of the previous chunk (Titans §3.2, the paper's semantics)
    titans-default  titans_pytorch.NeuralMemory(dim, chunk_size=C, batch_size=None, dim_head=D, heads=H,
                    model=MemoryMLP(dim=D, depth=L, expansion_factor=E), default_step_transform_max_lr=0.1)
                    its default: every gradient of the call anchored at the weights at the start of the call
    titans-paper    the same with batch_size=C: the anchor moves to the end of every chunk (the paper's semantics)
    mnemos-torch    mnemos with NeuralMemory(..., impl="torch")   (the chunked torch path; --only)
    mnemos-triton   mnemos with NeuralMemory(..., impl="triton")  (the fused Triton kernels; --only)

titans-default and mnemos compute different things; only the anchors of titans-paper match mnemos (other
differences remain, printed with the table). titans-pytorch's inner learning-rate bound is set to 0.1
(--titans-max-lr; its own default 1.0 drives the titans-paper forward to NaN on random inputs); mnemos's layer keeps
its own bound, ``max_lr`` = 0.01 (recorded with the row).

Method: every row is built and warmed up first. One untimed fwd+bwd call at T = 2C pays one-time costs; the first
full-size call (fwd+bwd) is the sanity check: output [B, T, dim], finite output, finite input gradient. If that call
and one retry both take longer than --max-call-s, the row is measured at half the sequence length (repeatedly, until
it fits): the table says so, and a reference row (mnemos; op level: see below) is measured at that T for the ratios.
Then the timed calls are interleaved across rows (fwd for every row, then fwd+bwd for every row, --repeats times),
so that a busy machine slows every row alike, and the median is reported. "fwd" runs with autograd recording (a
training forward); "fwd+bwd" adds ``y.backward(g)`` with a fixed random g, x requiring grad. On CUDA every timing is
bracketed by torch.cuda.synchronize().

Peak memory is the extra memory above the resident model and input:
    cuda: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before the call, max over the repeats;
    cpu:  torch's CPU allocations are invisible to tracemalloc, so each (row, phase) runs once in a fresh subprocess.
          It makes one short warm-up call, builds the model and input, resets the kernel's RSS high-water mark
          (/proc/self/clear_refs, Linux) and reports VmHWM - VmRSS after one call (getrusage ru_maxrss deltas where
          procfs is unavailable). This counts every page the call touches, allocator slack included: an upper-bound
          style measure, comparable between rows measured the same way, not the bytes torch asked for.

Op level (--level op): the sequence-mixing operators alone, inputs built directly at [B, T, H, D] (K = V = D):

    op-triton-d2    mnemos.ops.neural_memory(q, k, v, theta, eta, alpha, (W1[H,E*D,D], W2[H,D,E*D]), impl="triton")
    op-torch-d2     the same with impl="torch"
    op-triton-d1    depth 1, (W[H,D,D],), residual=False, with the momentum and decay gates; impl="triton"
    op-torch-d1     the same with impl="torch"
    op-delta        mnemos.ops.delta_rule(q, k, v, beta): the same delta rule in mnemos's exact chunked torch form
    fla-delta       fla.ops.delta_rule.chunk_delta_rule(q, k, v, beta): the delta rule, depth 1 (flash-linear-attention)
    sdpa            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), [B, H, T, D]

q, k are l2-normalised like the layer's; theta = 0.01 sigmoid(randn), eta = sigmoid(randn), alpha = sigmoid(randn - 4),
weights 0.02 randn; everything requires grad and "fwd+bwd" backpropagates (o * g).sum() into all of it. Inputs are
--dtype (default bfloat16 on CUDA, float32 on CPU) except the gates and memory weights, float32 as in the layer. The op
level first measures the device's ceilings (a square matmul in that dtype, 8192 on CUDA, and a device-to-device copy
of 1 GiB, read + write counted) and reports each row's achieved TFLOP/s and GB/s against them, from the analytic
counts of benchmarks/flops.py. Triton rows need CUDA (on CPU only with TRITON_INTERPRET=1); fla-delta needs CUDA and
flash-linear-attention; a row that cannot run is listed as skipped or unavailable with the reason. Op-level ratios
are taken against op-triton-d2 when it ran, else op-torch-d2.

Usage:
    python benchmarks/memory_speed.py                       # CPU, B2 T2048 dim256 H4x64 L2 E4 C16
    python benchmarks/memory_speed.py --device cuda         # CUDA, B4 T4096 dim512 H8x64 L2 E4 C16
    python benchmarks/memory_speed.py --device cuda --level op
    python benchmarks/memory_speed.py --seq-len 256 --only mnemos titans-paper
Results are written as JSON (--out, default benchmarks/results/memory_speed-<device>.json, or
memory_speed-op-<device>.json with --level op).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]

try:
    import mnemos
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))
    import mnemos

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402  (benchmarks/flops.py: the analytic FLOP and byte counts)


# ----------------------------------------------------------------------------------------------------------------------
# Shapes and defaults


@dataclass(frozen=True)
class Shape:
    batch: int  # B
    seq_len: int  # T
    dim: int  # model width
    heads: int  # H
    head_dim: int  # D
    depth: int  # L, memory MLP depth
    expansion: int  # E, hidden width E * D
    chunk_size: int  # C, tokens per gradient anchor


SHAPES = {
    "cpu": Shape(batch=2, seq_len=2048, dim=256, heads=4, head_dim=64, depth=2, expansion=4, chunk_size=16),
    "cuda": Shape(batch=4, seq_len=4096, dim=512, heads=8, head_dim=64, depth=2, expansion=4, chunk_size=16),
}
# warmup/repeats as asked for; max_call_s: a row whose single fwd+bwd call takes longer is measured at a shorter T.
RUN_DEFAULTS = {
    "cpu": dict(warmup=1, repeats=3, max_call_s=120.0),
    "cuda": dict(warmup=3, repeats=10, max_call_s=30.0),
}

ANCHOR_NOTE = (
    "NOTE: titans-pytorch's default (batch_size=None) anchors EVERY gradient at the weights at the start of the call "
    "(one anchor for the whole sequence), while mnemos anchors at each chunk (gradient at the state after the previous "
    "chunk: the Titans paper's semantics). The two compute different things. titans-paper (batch_size = chunk size) "
    "moves titans-pytorch's anchor every chunk, as in the paper."
)
OTHER_DIFFERENCES_NOTE = (
    "Other differences remain even for titans-paper: titans-pytorch takes momentum and decay gates per chunk (from the "
    "chunk's mean input) and applies the summed gradient of a chunk once, so each token reads the memory as of the "
    "last completed chunk; mnemos steps momentum and decay per token and reads the per-token state after the token's "
    "own write. Blocks differ too (titans-pytorch: pre-RMSNorm, no conv, LayerNorm+residual around the memory MLP, "
    "mean-squared loss, sigmoid head gate; mnemos: causal conv + SiLU, l2-normalised q/k, summed squared loss, gated "
    "RMSNorm output)."
)


# ----------------------------------------------------------------------------------------------------------------------
# Implementations: each builds a module (and the constructor arguments, for the record), makes its inputs and calls it


def layer_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    """The layer rows' input: x [B, T, dim], requiring grad."""
    return (torch.randn(s.batch, s.seq_len, s.dim, device=device, requires_grad=True),)


def available(device: torch.device, args: argparse.Namespace) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    name: str
    semantics: str  # layer rows: which gradient anchor; op rows: what the row computes
    build: Callable[[Shape, argparse.Namespace], tuple[nn.Module, dict]]
    call: Callable[..., Tensor]  # (module, *inputs) -> output; layer rows: x [B, T, dim] -> y [B, T, dim]
    level: str = "layer"  # "layer" or "op"
    inputs: Callable[[Shape, argparse.Namespace, torch.device], tuple[Tensor, ...]] = layer_inputs  # leaves, with grad
    out_shape: Callable[[Shape], tuple[int, ...]] = lambda s: (s.batch, s.seq_len, s.dim)
    unavailable: Callable[[torch.device, argparse.Namespace], str | None] = available  # a reason to skip the row
    counts: Callable[[Shape, argparse.Namespace], dict] | None = None  # analytic FLOPs and bytes (benchmarks/flops.py)
    optional: bool = False  # an exception from it marks the row unavailable: expected, not a failure of the run


def build_mnemos(impl: str | None = None) -> Callable[[Shape, argparse.Namespace], tuple[nn.Module, dict]]:
    """mnemos's layer; ``impl`` is passed to NeuralMemory when given (None: its default, "auto")."""

    def build(s: Shape, args: argparse.Namespace) -> tuple[nn.Module, dict]:
        from mnemos.layers import NeuralMemory

        kwargs = dict(
            dim=s.dim, heads=s.heads, head_dim=s.head_dim, depth=s.depth, expansion=s.expansion, chunk_size=s.chunk_size
        )
        if impl is not None:
            kwargs["impl"] = impl
        layer = NeuralMemory(**kwargs)
        return layer, {"class": "mnemos.layers.NeuralMemory", **kwargs, "impl": layer.impl, "max_lr": layer.max_lr}

    return build


def build_titans(per_chunk: bool) -> Callable[[Shape, argparse.Namespace], tuple[nn.Module, dict]]:
    """titans-pytorch's layer; ``per_chunk``: batch_size = chunk size (anchor every chunk), else None (its default)."""

    def build(s: Shape, args: argparse.Namespace) -> tuple[nn.Module, dict]:
        from titans_pytorch import MemoryMLP, NeuralMemory

        kwargs = dict(
            dim=s.dim,
            chunk_size=s.chunk_size,
            batch_size=s.chunk_size if per_chunk else None,
            dim_head=s.head_dim,
            heads=s.heads,
            default_step_transform_max_lr=args.titans_max_lr,
        )
        model_kwargs = dict(dim=s.head_dim, depth=s.depth, expansion_factor=float(s.expansion))
        layer = NeuralMemory(**kwargs, model=MemoryMLP(**model_kwargs))
        record = {"class": "titans_pytorch.NeuralMemory", **kwargs, "model": f"MemoryMLP(**{model_kwargs})"}
        return layer, record

    return build


def triton_unavailable(device: torch.device, args: argparse.Namespace) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need CUDA; on CPU they run only in Triton's interpreter: set TRITON_INTERPRET=1 (slow)"
    return None


# ---- op level: the operators alone, inputs [B, T, H, D] built directly (no projections, no conv, no norm)


def op_dtype(args: argparse.Namespace) -> torch.dtype:
    return getattr(torch, args.op_dtype)


def _leaves(*xs: Tensor) -> tuple[Tensor, ...]:
    return tuple(x.detach().requires_grad_() for x in xs)


class MemoryRuleOp(nn.Module):
    """``mnemos.ops.neural_memory`` on given inputs; returns o [B, T, H, V]."""

    def __init__(self, chunk_size: int, residual: bool, impl: str):
        super().__init__()
        self.chunk_size, self.residual, self.impl = chunk_size, residual, impl

    def forward(self, q, k, v, theta, eta, alpha, *weights):
        from mnemos.ops import neural_memory

        o, _ = neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=self.chunk_size, residual=self.residual,
                             impl=self.impl)
        return o


def build_memory_op(depth: int, impl: str) -> Callable[[Shape, argparse.Namespace], tuple[nn.Module, dict]]:
    def build(s: Shape, args: argparse.Namespace) -> tuple[nn.Module, dict]:
        residual = depth > 1  # depth 1 without the residual: a plain matrix memory, comparable to the delta rule
        layers = flops.memory_rule_layers(s.head_dim, depth, s.expansion)
        record = {"call": "mnemos.ops.neural_memory", "impl": impl, "chunk_size": s.chunk_size, "residual": residual,
                  "activation": "gelu", "loss": "l2", "weights": [f"[H, {o}, {i}]" for i, o in layers]}
        return MemoryRuleOp(s.chunk_size, residual, impl), record

    return build


def token_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (unit rows, as the layers make them) and v ``[B, T, H, D]`` in the op dtype."""
    B, T, H, D = s.batch, s.seq_len, s.heads, s.head_dim
    dt = op_dtype(args)
    q = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dt)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=device).to(dt)
    return q, k, v


def memory_op_inputs(depth: int) -> Callable[[Shape, argparse.Namespace, torch.device], tuple[Tensor, ...]]:
    def inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
        B, T, H, D = s.batch, s.seq_len, s.heads, s.head_dim
        q, k, v = token_inputs(s, args, device)
        theta = 0.01 * torch.sigmoid(torch.randn(B, T, H, device=device))  # gates and weights float32, as in the layer
        eta = torch.sigmoid(torch.randn(B, T, H, device=device))
        alpha = torch.sigmoid(torch.randn(B, T, H, device=device) - 4)
        weights = [0.02 * torch.randn(H, d_out, d_in, device=device)
                   for d_in, d_out in flops.memory_rule_layers(D, depth, s.expansion)]
        return _leaves(q, k, v, theta, eta, alpha, *weights)

    return inputs


def memory_op_counts(depth: int) -> Callable[[Shape, argparse.Namespace], dict]:
    def counts(s: Shape, args: argparse.Namespace) -> dict:
        layers = flops.memory_rule_layers(s.head_dim, depth, s.expansion)
        io = torch.finfo(op_dtype(args)).bits // 8
        return flops.memory_rule_counts(s.batch, s.seq_len, s.heads, layers, s.chunk_size, io_bytes=io,
                                        gate_bytes=flops.FP32, state_bytes=flops.FP32)

    return counts


class FlaDeltaOp(nn.Module):
    """flash-linear-attention's chunked delta rule; returns o [B, T, H, V]."""

    def __init__(self):
        super().__init__()
        from fla.ops.delta_rule import chunk_delta_rule  # lazily: optional, CUDA only

        self.fn = chunk_delta_rule

    def forward(self, q, k, v, beta):
        o, _ = self.fn(q, k, v, beta)
        return o


class DeltaOp(nn.Module):
    """mnemos's chunked delta rule (ops/delta_rule.py) on fla-delta's inputs; returns o [B, T, H, V]."""

    def forward(self, q, k, v, beta):
        from mnemos.ops import delta_rule

        return delta_rule(q, k, v, beta, chunk_size=flops.FLA_DELTA_CHUNK)[0]


def fla_unavailable(device: torch.device, args: argparse.Namespace) -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    if device.type != "cuda":
        return "fla's chunk_delta_rule runs Triton kernels on CUDA only"
    if args.op_dtype == "float32":
        return "fla's chunk_delta_rule does not take float32 inputs (--dtype bfloat16)"
    return None


def fla_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    q, k, v = token_inputs(s, args, device)
    beta = torch.sigmoid(torch.randn(s.batch, s.seq_len, s.heads, device=device)).to(op_dtype(args))
    return _leaves(q, k, v, beta)


def fla_counts(s: Shape, args: argparse.Namespace) -> dict:
    io = torch.finfo(op_dtype(args)).bits // 8
    return flops.delta_rule_counts(s.batch, s.seq_len, s.heads, s.head_dim, s.head_dim, io_bytes=io)


class SdpaOp(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    shape = (s.batch, s.heads, s.seq_len, s.head_dim)
    return _leaves(*(torch.randn(shape, device=device).to(op_dtype(args)) for _ in range(3)))


def sdpa_counts(s: Shape, args: argparse.Namespace) -> dict:
    io = torch.finfo(op_dtype(args)).bits // 8
    return flops.sdpa_counts(s.batch, s.heads, s.seq_len, s.head_dim, io_bytes=io, causal=True)


def bthd(s: Shape) -> tuple[int, ...]:
    return (s.batch, s.seq_len, s.heads, s.head_dim)


def call_layer(m: nn.Module, x: Tensor) -> Tensor:
    return m(x)[0]


def call_op(m: nn.Module, *inputs: Tensor) -> Tensor:
    return m(*inputs)


def memory_op(name: str, depth: int, impl: str) -> Impl:
    kernel = "Triton kernels" if impl == "triton" else "chunked torch path"
    extra = "" if depth > 1 else ", no residual"
    return Impl(
        name,
        f"memory rule, depth {depth}{extra} ({kernel})",
        build_memory_op(depth, impl),
        call_op,
        level="op",
        inputs=memory_op_inputs(depth),
        out_shape=bthd,
        unavailable=triton_unavailable if impl == "triton" else available,
        counts=memory_op_counts(depth),
        optional=impl == "triton",
    )


IMPLS = {
    "mnemos": Impl("mnemos", "per chunk (paper)", build_mnemos(), call_layer),
    "titans-default": Impl("titans-default", "start of call (batch_size=None)", build_titans(per_chunk=False),
                           call_layer),
    "titans-paper": Impl("titans-paper", "per chunk (batch_size=C)", build_titans(per_chunk=True), call_layer),
    "mnemos-torch": Impl("mnemos-torch", "per chunk (paper)", build_mnemos("torch"), call_layer),
    "mnemos-triton": Impl("mnemos-triton", "per chunk (paper)", build_mnemos("triton"), call_layer,
                          unavailable=triton_unavailable, optional=True),
    "op-triton-d2": memory_op("op-triton-d2", 2, "triton"),
    "op-torch-d2": memory_op("op-torch-d2", 2, "torch"),
    "op-triton-d1": memory_op("op-triton-d1", 1, "triton"),
    "op-torch-d1": memory_op("op-torch-d1", 1, "torch"),
    "fla-delta": Impl("fla-delta", "delta rule, depth 1 (fla chunk_delta_rule)", lambda s, args: (FlaDeltaOp(), {
        "call": "fla.ops.delta_rule.chunk_delta_rule", "chunk_size": flops.FLA_DELTA_CHUNK, "scale": "1/sqrt(D)",
        "flash_linear_attention": version("flash-linear-attention")}), call_op, level="op", inputs=fla_inputs,
        out_shape=bthd, unavailable=fla_unavailable, counts=fla_counts, optional=True),
    "op-delta": Impl("op-delta", "delta rule, depth 1 (mnemos.ops.delta_rule, torch)", lambda s, args: (DeltaOp(), {
        "call": "mnemos.ops.delta_rule", "chunk_size": flops.FLA_DELTA_CHUNK}), call_op, level="op",
        inputs=fla_inputs, out_shape=bthd, counts=fla_counts),
    "sdpa": Impl("sdpa", "causal softmax attention (torch SDPA)", lambda s, args: (SdpaOp(), {
        "call": "torch.nn.functional.scaled_dot_product_attention", "is_causal": True, "layout": "[B, H, T, D]"}),
        call_op, level="op", inputs=sdpa_inputs, out_shape=lambda s: (s.batch, s.heads, s.seq_len, s.head_dim),
        counts=sdpa_counts),
}
ALIASES = {"titans": ["titans-default", "titans-paper"]}
LEVEL_ROWS = {  # the rows each --level runs when --only is not given
    "layer": ["mnemos", "titans-default", "titans-paper"],
    "op": ["op-triton-d2", "op-torch-d2", "op-triton-d1", "op-torch-d1", "op-delta", "fla-delta", "sdpa"],
}
REFERENCES = {"layer": ("mnemos",), "op": ("op-triton-d2", "op-torch-d2")}  # ratios: the first one measured


# ----------------------------------------------------------------------------------------------------------------------
# One call, timed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class Case:
    """One row's live objects: module, inputs (leaves requiring grad; layer rows: x [B, T, dim]), output gradient g."""

    impl: Impl
    shape: Shape
    module: nn.Module
    inputs: tuple[Tensor, ...]
    g: Tensor


def make_case(impl: Impl, shape: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Case, dict]:
    torch.manual_seed(args.seed)
    module, record = impl.build(shape, args)
    module = module.to(device)
    inputs = impl.inputs(shape, args, device)
    g = torch.randn(impl.out_shape(shape), device=device)
    return Case(impl, shape, module, inputs, g), record


def run_call(case: Case, backward: bool, device: torch.device, dtype: str) -> tuple[float, Tensor]:
    """One forward (and backward) call; returns (seconds, y). Gradients are cleared before, outside the timing.

    ``dtype`` applies to layer rows (autocast); op rows take their inputs in their own dtype."""
    case.module.zero_grad(set_to_none=True)
    for x in case.inputs:
        x.grad = None
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, dtype) if case.impl.level == "layer" else contextlib.nullcontext():
        y = case.impl.call(case.module, *case.inputs)
    if backward:
        y.backward(case.g.to(y.dtype))  # = backward of (y * g).sum()
    sync(device)
    return time.perf_counter() - t0, y


def cuda_peak_call(case: Case, backward: bool, device: torch.device, dtype: str) -> tuple[float, int]:
    """run_call with the CUDA peak above the memory allocated before it (bytes)."""
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    seconds, y = run_call(case, backward, device, dtype)
    peak = torch.cuda.max_memory_allocated(device) - base
    del y
    return seconds, peak


# ----------------------------------------------------------------------------------------------------------------------
# CPU peak memory: one call in a fresh subprocess, increase of the peak resident set size


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> tuple[int, str]:
    """Reset the kernel's RSS high-water mark to the current RSS; returns (baseline bytes, method)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return 1024 * _proc_status_kib("VmRSS"), "VmHWM"
    except OSError:  # no procfs, or not writable: the lifetime peak, which may hide a call smaller than the imports
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def peak_rss(method: str) -> int:
    if method == "VmHWM":
        return 1024 * _proc_status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def probe_main(spec: dict) -> None:
    """Subprocess entry: build one row, run one call, print the peak-RSS increase as JSON on the last line."""
    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec["args"])
    shape = Shape(**spec["shape"])
    device = torch.device("cpu")
    impl = IMPLS[spec["impl"]]
    # One fwd+bwd call at a short T first, so that one-time costs (thread pool, lazy imports, kernel workspaces) are
    # not counted; then hand freed heap back to the OS so the measured call cannot hide in it.
    short = dataclasses.replace(shape, seq_len=min(shape.seq_len, 2 * shape.chunk_size))
    tiny, _ = make_case(impl, short, args, device)
    run_call(tiny, True, device, spec["dtype"])
    del tiny
    case, _ = make_case(impl, shape, args, device)
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only
    except (AttributeError, OSError):
        pass
    base, method = reset_peak_rss()
    _, y = run_call(case, spec["phase"] == "fwdbwd", device, spec["dtype"])
    peak = peak_rss(method)
    print(json.dumps({"peak_bytes": peak - base, "baseline_rss_bytes": base, "method": method}))


def cpu_peak_subprocess(impl: str, phase: str, shape: Shape, args: argparse.Namespace, threads: int) -> dict:
    spec = dict(impl=impl, phase=phase, shape=dataclasses.asdict(shape), dtype=args.dtype, threads=threads,
                args=dict(seed=args.seed, titans_max_lr=args.titans_max_lr, dtype=args.dtype, op_dtype=args.op_dtype))
    env = dict(os.environ)
    src = str(Path(mnemos.__file__).resolve().parents[1])  # the mnemos this process imported
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_probe", json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=max(600.0, 10 * args.max_call_s),
    )
    if proc.returncode != 0:
        return {"error": f"probe exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> dict:
    out = {"commit": None, "dirty": None}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout.strip()
        status = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------------
# Ceilings: what this device reaches on a large matmul and a large copy, measured in the same run as the rows

CEILING_SIZES = {  # matmul n (an n x n x n product), copy tensor bytes, warm-up calls, timed calls (best one reported)
    "cuda": dict(matmul_n=8192, copy_bytes=2**30, warmup=3, repeats=10),
    "cpu": dict(matmul_n=1024, copy_bytes=2**27, warmup=1, repeats=3),
}
H100_REFERENCE = {"tflops_bf16_matmul": 776.0, "copy_gbps": 3000.0}  # what an H100 SXM reaches on these two tests


def _best_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return samples


def _matmul_samples(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int) -> list[float]:
    torch.manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return _best_seconds(lambda: torch.mm(a, b, out=c), device, warmup, repeats)


def _copy_samples(device: torch.device, nbytes: int, warmup: int, repeats: int) -> list[float]:
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), device, warmup, repeats)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """Matmul TFLOP/s (``torch.mm`` of two n x n matrices in ``dtype``) and copy GB/s (``dst.copy_(src)`` of one large
    tensor, read + write counted); each the best of the timed calls."""
    size = CEILING_SIZES[device.type]
    n, nbytes = size["matmul_n"], size["copy_bytes"]
    mm = _matmul_samples(device, dtype, n, size["warmup"], size["repeats"])
    cp = _copy_samples(device, nbytes, size["warmup"], size["repeats"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mm_flops, cp_bytes = flops.matmul_flops(n, n, n), flops.copy_bytes(nbytes)
    return {
        "matmul": {"m_n_k": [n, n, n], "dtype": str(dtype).removeprefix("torch."), "flops": mm_flops,
                   "samples_ms": [1e3 * t for t in mm], "tflops": mm_flops / min(mm) / 1e12},
        "copy": {"tensor_bytes": nbytes, "bytes_moved": cp_bytes, "samples_ms": [1e3 * t for t in cp],
                 "gbps": cp_bytes / min(cp) / 1e9},
        "method": f"best of {size['repeats']} calls after {size['warmup']} warm-up, each bracketed by a "
                  "device synchronise; copy counts read + write",
    }


def add_throughput(row: dict, impl: Impl, args: argparse.Namespace, ceilings: dict) -> None:
    """Achieved TFLOP/s and GB/s of a measured op row (median time), and their share of the ceilings."""
    counts = impl.counts(Shape(**row["shape"]), args)
    row["counts"] = counts
    for phase in ("fwd", "fwdbwd"):
        ms = row.get(f"{phase}_ms")
        tflops = counts[phase]["flops"] / (ms / 1e3) / 1e12 if ms else None
        gbps = counts[phase]["bytes"] / (ms / 1e3) / 1e9 if ms else None
        row[f"{phase}_tflops"], row[f"{phase}_gbps"] = tflops, gbps
        row[f"{phase}_pct_peak"] = 100 * tflops / ceilings["matmul"]["tflops"] if tflops is not None else None
        row[f"{phase}_pct_bw"] = 100 * gbps / ceilings["copy"]["gbps"] if gbps is not None else None


# ----------------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, help="B")
    p.add_argument("--seq-len", type=int, help="T")
    p.add_argument("--dim", type=int, help="model width")
    p.add_argument("--heads", type=int, help="H")
    p.add_argument("--head-dim", type=int, help="D (default: dim // heads)")
    p.add_argument("--depth", type=int, help="memory MLP depth L")
    p.add_argument("--expansion", type=int, help="memory MLP hidden width factor E")
    p.add_argument("--chunk-size", type=int, help="C, tokens per gradient anchor")
    p.add_argument("--warmup", type=int, help="warm-up calls per row, >= 1 (cpu 1, cuda 3)")
    p.add_argument("--repeats", type=int, help="timed calls per row and phase (cpu 3, cuda 10)")
    p.add_argument("--level", choices=list(LEVEL_ROWS), default="layer",
                   help="layer: the Titans memory layers (mnemos, titans-default, titans-paper); op: the operators "
                   "alone (memory rule Triton/torch at depth 2 and 1, fla delta rule, SDPA) with TFLOP/s and GB/s "
                   "against measured ceilings")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="layer rows: bfloat16 = torch.autocast with float32 parameters and input (default float32); "
                   "op rows: the dtype of q, k, v (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--only", nargs="+", choices=[*IMPLS, *ALIASES],
                   help="rows to run, of either level (default: the --level's rows)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: the CPUs this process may use)")
    p.add_argument("--max-call-s", type=float,
                   help="a row whose fwd+bwd call takes longer (best of 2) is measured at half the T, repeatedly "
                   "(cpu 120, cuda 30)")
    p.add_argument("--titans-max-lr", type=float, default=0.1,
                   help="titans-pytorch default_step_transform_max_lr (its default 1.0; mnemos's layer: max_lr 0.01)")
    p.add_argument("--no-cpu-memory", action="store_true", help="skip the per-row peak-RSS subprocesses on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/memory_speed-<device>.json; "
                   "--level op: memory_speed-op-<device>.json)")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._probe:
        return args
    args.op_dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.dtype = args.dtype or "float32"
    d = RUN_DEFAULTS[args.device]
    args.warmup = d["warmup"] if args.warmup is None else args.warmup
    args.repeats = d["repeats"] if args.repeats is None else args.repeats
    args.max_call_s = d["max_call_s"] if args.max_call_s is None else args.max_call_s
    if args.warmup < 1 or args.repeats < 1:
        p.error(f"--warmup and --repeats must be >= 1, got {args.warmup} and {args.repeats}")
    return args


def resolve_shape(args: argparse.Namespace) -> Shape:
    base = SHAPES[args.device]
    over = dict(batch=args.batch, seq_len=args.seq_len, dim=args.dim, heads=args.heads, depth=args.depth,
                expansion=args.expansion, chunk_size=args.chunk_size)
    shape = dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})
    if args.head_dim is not None:
        shape = dataclasses.replace(shape, head_dim=args.head_dim)
    elif args.dim is not None or args.heads is not None:
        if shape.dim % shape.heads:
            raise ValueError(f"--heads ({shape.heads}) must divide --dim ({shape.dim}) unless --head-dim is given")
        shape = dataclasses.replace(shape, head_dim=shape.dim // shape.heads)
    for k, v in dataclasses.asdict(shape).items():
        if v < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")
    return shape


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def fmt_seq_len(row: dict) -> str:
    T, asked = row["seq_len"], row["seq_len_requested"]
    return str(T) if T == asked or row["label"] != row["impl"] else f"{T} (of {asked})"


def fmt_load(load: tuple[float, ...] | None) -> str:
    return "-" if load is None else "/".join(f"{v:.2f}" for v in load)


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_num(x: float | None) -> str:
    """Three significant digits, no exponent for the usual range: 0.0123, 1.23, 123, 1234."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def measured(row: dict) -> bool:
    return not row["error"] and not row["skipped"]


def print_table(rows: list[dict], level: str, reference: str | None) -> None:
    """The layer table (as before) or the op table with achieved TFLOP/s and GB/s and their share of the ceilings."""
    ref = reference or "-"
    if level == "layer":
        header = ["impl", "semantics (gradient anchor)", "T", "fwd ms", "fwd+bwd ms", "fwd peak", "fwd+bwd peak",
                  "fwd vs mnemos", "f+b vs mnemos", "peak vs mnemos", "finite"]
    else:
        header = ["impl", "computes", "T", "fwd ms", "fwd+bwd ms", "fwd peak", "fwd+bwd peak",
                  "fwd TFLOP/s", "%peak", "GB/s", "%bw", "f+b TFLOP/s", "%peak", "GB/s", "%bw",
                  f"fwd vs {ref}", f"f+b vs {ref}", "finite"]
    lines = []
    for row in rows:
        if row["skipped"]:
            lines.append([row["label"], row["semantics"], str(row["seq_len_requested"]), f"skipped: {row['skipped']}"])
            continue
        if row["error"]:
            what = "unavailable" if row["unavailable"] else "ERROR"
            lines.append([row["label"], row["semantics"], str(row["seq_len_requested"]), f"{what}: {row['error']}"])
            continue
        finite = "yes" if row["output_finite"] and row["input_grad_finite"] and row["shape_ok"] else "NO"
        common = [row["label"], row["semantics"], fmt_seq_len(row), fmt_ms(row["fwd_ms"]), fmt_ms(row["fwdbwd_ms"]),
                  fmt_mib(row.get("fwd_peak_bytes")), fmt_mib(row.get("fwdbwd_peak_bytes"))]
        if level == "layer":
            lines.append([*common, fmt_ratio(row["ratio_fwd"]), fmt_ratio(row["ratio_fwdbwd"]),
                          fmt_ratio(row["ratio_peak_fwdbwd"]), finite])
        else:
            rates = [fmt_num(row.get(f"{phase}_{key}")) for phase in ("fwd", "fwdbwd")
                     for key in ("tflops", "pct_peak", "gbps", "pct_bw")]
            lines.append([*common, *rates, fmt_ratio(row["ratio_fwd"]), fmt_ratio(row["ratio_fwdbwd"]), finite])
    widths = [max(len(h), *(len(line[i]) for line in lines if i < len(line) - 1 or len(line) == len(header)))
              for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._probe:
        probe_main(json.loads(args._probe))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise SystemExit(f"error: --device cuda: CUDA is not available (torch {torch.__version__}, built with {build})")
    device = torch.device(args.device)
    try:
        shape = resolve_shape(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    names = list(dict.fromkeys(n for o in (args.only or LEVEL_ROWS[args.level]) for n in ALIASES.get(o, [o])))
    levels = [lv for lv in LEVEL_ROWS if any(IMPLS[n].level == lv for n in names)]

    if device.type == "cuda":
        memory_method = "torch.cuda.max_memory_allocated() minus memory allocated before the call, max over repeats"
    elif args.no_cpu_memory:
        memory_method = "not measured (--no-cpu-memory)"
    else:
        memory_method = (
            "increase of the process's peak RSS over one call (VmHWM after resetting it through /proc/self/clear_refs; "
            "getrusage ru_maxrss where that is unavailable), in a fresh subprocess per row and phase"
        )

    env = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "titans_pytorch": version("titans-pytorch"),
        "triton": version("triton"),
        "flash_linear_attention": version("flash-linear-attention"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "mnemos": getattr(mnemos, "__version__", None),
        "mnemos_path": str(Path(mnemos.__file__).resolve().parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        **git_commit(),
    }
    config = {
        "level": args.level,
        "rows": names,
        "shape": dataclasses.asdict(shape),
        "dtype": args.dtype if args.dtype == "float32" else "bfloat16 (torch.autocast; parameters and input float32)",
        "state_dtype": "float32",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median",
        "fwd": "forward with autograd recording (training forward)",
        "fwdbwd": "forward + y.backward(g), x requires grad",
        "max_call_s": args.max_call_s,
        "titans_max_lr": args.titans_max_lr,
        "memory_method": memory_method,
        "seed": args.seed,
    }
    if "op" in levels:
        config["op"] = {
            "dtype": f"{args.op_dtype} q, k, v (fla-delta: beta too); memory-rule gates and weights float32",
            "inputs": "q, k l2-normalised randn; v randn; theta = 0.01 sigmoid(randn), eta = sigmoid(randn), "
                      "alpha = sigmoid(randn - 4); memory weights 0.02 randn; fla beta = sigmoid(randn); "
                      "sdpa q, k, v randn [B, H, T, D]",
            "fwdbwd": "forward + o.backward(g) (the backward of (o * g).sum()) into every input",
            "depths": "op-*-d2: depth 2, expansion E, residual; op-*-d1: depth 1, no residual (--depth is for layer "
                      "rows)",
            "counts": "benchmarks/flops.py: matmul FLOPs of the algorithm, compulsory bytes (inputs read once, "
                      "outputs written once); achieved rates use the median time",
        }
    print(f"device: {env['device']} ({env['device_name']}), torch {env['torch']}, threads {env['torch_threads']} "
          f"(torch.set_num_threads; {env['logical_cpus']} logical CPUs), titans-pytorch {env['titans_pytorch']}, "
          f"mnemos {env['mnemos']} from {env['mnemos_path']}, "
          f"commit {env['commit']}{' (dirty)' if env['dirty'] else ''}")
    print(f"shape: B={shape.batch} T={shape.seq_len} dim={shape.dim} H={shape.heads} D={shape.head_dim} "
          f"L={shape.depth} E={shape.expansion} C={shape.chunk_size}; dtype {config['dtype']}; "
          f"warmup {args.warmup}, median of {args.repeats}")
    if "op" in levels:
        print(f"op rows: q, k, v {args.op_dtype} (memory-rule gates and weights float32), depth 2 (E={shape.expansion})"
              f" and 1; triton {env['triton'] or 'not installed'}, flash-linear-attention "
              f"{env['flash_linear_attention'] or 'not installed'}, "
              f"TRITON_INTERPRET={env['triton_interpret'] or 'unset'}")
    print(f"peak memory: {memory_method}")

    ceilings = None
    if "op" in levels:  # before any row, on an idle device
        ceilings = measure_ceilings(device, op_dtype(args))
        mm, cp = ceilings["matmul"], ceilings["copy"]
        n = mm["m_n_k"][0]
        print(f"ceilings (this run, {ceilings['method']}): matmul {mm['dtype']} {n}x{n}x{n} "
              f"{fmt_num(mm['tflops'])} TFLOP/s; copy of {cp['tensor_bytes'] / 2**20:.0f} MiB "
              f"{fmt_num(cp['gbps'])} GB/s")
        if device.type == "cuda":
            ref = H100_REFERENCE
            print(f"  (an H100 SXM reaches about {ref['tflops_bf16_matmul']:.0f} TFLOP/s bf16 and "
                  f"{ref['copy_gbps'] / 1e3:.0f} TB/s on these)")

    # Build and warm up every row; the first call is fwd+bwd, checks the output and may shorten T.
    rows: dict[str, dict] = {}  # by label: the impl name, or "<reference>@T=..." for a reference at a shortened T
    cases: dict[str, Case] = {}

    def warm_up(label: str, impl: Impl, s: Shape, may_shrink: bool) -> None:
        row = {"label": label, "impl": impl.name, "level": impl.level, "semantics": impl.semantics,
               "seq_len_requested": s.seq_len, "skipped": None, "error": None, "unavailable": False, "notes": []}
        rows[label] = row
        row["skipped"] = impl.unavailable(device, args)
        if row["skipped"]:
            print(f"SKIP {label}: {row['skipped']}")
            return
        try:
            # pay one-time costs (lazy imports, thread pools, kernel workspaces) before the call that may shorten T
            tiny, _ = make_case(impl, dataclasses.replace(s, seq_len=min(s.seq_len, 2 * s.chunk_size)), args, device)
            run_call(tiny, True, device, args.dtype)
            del tiny
            while True:
                case, row["constructor"] = make_case(impl, s, args, device)
                seconds, y = run_call(case, True, device, args.dtype)
                if may_shrink and seconds > args.max_call_s:  # one more try, so that a passing stall cannot shrink T
                    del y
                    retry, y = run_call(case, True, device, args.dtype)
                    seconds = min(seconds, retry)
                if not may_shrink or seconds <= args.max_call_s or s.seq_len // 2 < 2 * s.chunk_size:
                    break
                note = (f"{label}: fwd+bwd at T={s.seq_len} took {seconds:.1f} s (best of 2 calls) > --max-call-s "
                        f"{args.max_call_s:g}; measuring at T={s.seq_len // 2} instead")
                print("NOTE: " + note)
                row["notes"].append(note)
                del case, y
                s = dataclasses.replace(s, seq_len=s.seq_len // 2)
            row["seq_len"] = s.seq_len
            row["shape"] = dataclasses.asdict(s)
            row["first_call_ms"] = 1e3 * seconds
            row["output_shape"] = list(y.shape)
            row["shape_ok"] = tuple(y.shape) == tuple(impl.out_shape(s))
            row["output_finite"] = bool(torch.isfinite(y).all())
            row["input_grad_finite"] = all(x.grad is not None and bool(torch.isfinite(x.grad).all())
                                           for x in case.inputs)
            row["params"] = sum(p.numel() for p in case.module.parameters())
            row["params_with_grad"] = sum(p.numel() for p in case.module.parameters() if p.grad is not None)
            del y
            for _ in range(args.warmup - 1):
                run_call(case, True, device, args.dtype)
            cases[label] = case
        except Exception as e:  # record the failure, keep the other rows
            row["error"] = f"{type(e).__name__}: {e}"
            row["unavailable"] = impl.optional
            print(f"{'UNAVAILABLE' if impl.optional else 'ERROR in'} {label}: {row['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for name in names:
        warm_up(name, IMPLS[name], shape, may_shrink=True)
    # Ratios are taken against a reference row per level (layer: mnemos; op: op-triton-d2, else op-torch-d2). A row
    # measured at a shortened T gets a reference at that T, so that its ratios still mean something.
    references = {lv: next((n for n in REFERENCES[lv] if n in rows and measured(rows[n])), None) for lv in levels}
    for lv, ref in references.items():
        if ref is None:
            continue
        shortened = {r["seq_len"] for r in list(rows.values()) if r["level"] == lv and measured(r)}
        for T in sorted(shortened - {rows[ref]["seq_len"]}):
            warm_up(f"{ref}@T={T}", IMPLS[ref], dataclasses.replace(shape, seq_len=T), may_shrink=False)

    # Timed repeats, interleaved across rows.
    for phase, backward in (("fwd", False), ("fwdbwd", True)):
        samples = {n: [] for n in cases}
        peaks = {n: [] for n in cases}
        for _ in range(args.repeats):
            for name, case in cases.items():
                if rows[name]["error"]:
                    continue
                try:
                    if device.type == "cuda":
                        seconds, peak = cuda_peak_call(case, backward, device, args.dtype)
                        peaks[name].append(peak)
                    else:
                        seconds, y = run_call(case, backward, device, args.dtype)
                        del y
                    samples[name].append(seconds)
                except Exception as e:
                    rows[name]["error"] = f"{type(e).__name__} in {phase}: {e}"
                    print(f"ERROR in {name}: {rows[name]['error']}")
        for name in cases:
            rows[name][f"{phase}_ms_samples"] = [1e3 * t for t in samples[name]]
            rows[name][f"{phase}_ms"] = 1e3 * statistics.median(samples[name]) if samples[name] else None
            if device.type == "cuda":
                rows[name][f"{phase}_peak_bytes"] = max(peaks[name]) if peaks[name] else None
    cases.clear()
    gc.collect()

    # CPU peak memory, one fresh subprocess per row and phase.
    if device.type == "cpu" and not args.no_cpu_memory:
        for name, row in rows.items():
            if not measured(row):
                continue
            for phase in ("fwd", "fwdbwd"):
                res = cpu_peak_subprocess(row["impl"], phase, Shape(**row["shape"]), args, threads)
                row[f"{phase}_peak_bytes"] = res.get("peak_bytes")
                row[f"{phase}_peak_method"] = res.get("method")
                if "error" in res:
                    row["notes"].append(f"memory probe {phase}: {res['error']}")
                    print(f"WARNING: {name} memory probe {phase}: {res['error']}")

    # Ratios against the level's reference row at the same T; achieved rates of the op rows.
    refs = {(r["level"], r["seq_len"]): r for r in rows.values()
            if measured(r) and r["impl"] == references.get(r["level"])}
    for row in rows.values():
        ref = refs.get((row["level"], row.get("seq_len")))
        row["ratio_reference"] = ref["label"] if ref is not None and measured(row) else None
        pairs = (("ratio_fwd", "fwd_ms"), ("ratio_fwdbwd", "fwdbwd_ms"), ("ratio_peak_fwdbwd", "fwdbwd_peak_bytes"))
        for key, src in pairs:
            a, b = (row.get(src), ref.get(src)) if row["ratio_reference"] else (None, None)
            row[key] = a / b if a is not None and b else None
        if ceilings is not None and measured(row) and IMPLS[row["impl"]].counts is not None:
            add_throughput(row, IMPLS[row["impl"]], args, ceilings)

    # Tables, one per level.
    for lv in levels:
        print_table([r for r in rows.values() if r["level"] == lv], lv, references[lv])
        if lv == "layer":
            print("ratios: row / the mnemos row at the same T (> 1 = slower or more memory than mnemos); "
                  "peak = extra memory above "
                  "model and input")
        else:
            ratios = (f"row / the {references[lv]} row at the same T" if references[lv] else
                      f"none (no reference row measured: {' or '.join(REFERENCES[lv])})")
            print(f"ratios: {ratios}; peak = extra memory above the inputs; TFLOP/s and GB/s = analytic counts "
                  "(benchmarks/flops.py) / median time; %peak and %bw: shares of the ceilings above")
    for row in rows.values():
        for note in row["notes"]:
            print("NOTE: " + note)
        if measured(row) and not (row["output_finite"] and row["input_grad_finite"] and row["shape_ok"]):
            print(f"WARNING: {row['label']} sanity check failed: output shape {row['output_shape']}, finite output "
                  f"{row['output_finite']}, finite input grad {row['input_grad_finite']}")
    for row in rows.values():
        for phase, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            xs = row.get(f"{phase}_ms_samples") or []
            if len(xs) > 1 and max(xs) > 1.5 * min(xs):
                print(f"WARNING: noisy timings, {row['label']} {label} samples range {min(xs):.0f}-{max(xs):.0f} ms "
                      f"(another process on the machine?); all samples are in the JSON")
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at start {fmt_load(env['loadavg_start'])}, at end {fmt_load(env['loadavg_end'])} "
          f"({env['logical_cpus']} logical CPUs)")
    if any(n.startswith("titans") for n in rows):
        print(ANCHOR_NOTE)
        print(OTHER_DIFFERENCES_NOTE)

    level = "" if args.level == "layer" else f"{args.level}-"
    out = args.out or REPO / "benchmarks" / "results" / f"memory_speed-{level}{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "memory_speed",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "env": env,
        "config": config,
        "notes": [ANCHOR_NOTE, OTHER_DIFFERENCES_NOTE],
        "rows": list(rows.values()),
    }
    if ceilings is not None:
        result["ceilings"] = {**ceilings, "h100_reference": H100_REFERENCE}
        result["references"] = references
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
